"""One segment as a module with float32 memory I/O: what export traces and what the PyTorch
reference backend runs, so both compute exactly the same function."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .model import RMTBase

# The dtype each bundle precision computes in; int8 is traced in fp32 and quantized afterwards.
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float32}
LOGITS = ("all", "last", "none")


class StepModule(nn.Module):
    """(input_ids, attention_mask, memory) -> (logits, new_memory) of one segment.

    logits: "all" (every position; encoders: the class logits), "last" (decoders: each
    row's last real token, no per-token LM head) or "none" (encoders: memory only).
    Memory enters and leaves as float32 in every precision; the model inside may be fp16.
    """

    def __init__(self, model: RMTBase, logits: str, dtype: torch.dtype) -> None:
        super().__init__()
        if logits not in LOGITS:
            raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
        self.model, self.logits, self.dtype = model, logits, dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor):
        memory = memory.to(self.dtype)
        if self.model.config.kind == "encoder":
            logits, new_memory = self.model.step(input_ids, attention_mask, memory)
            return (new_memory.float(),) if self.logits == "none" else (logits.float(), new_memory.float())
        logits, new_memory = self.model.step(input_ids, attention_mask, memory, logits=self.logits)
        return logits.float(), new_memory.float()


def model_in_precision(model: RMTBase, precision: str) -> RMTBase:
    """The model that computes a precision: the model itself for fp32 and int8, an fp16 copy for fp16."""
    if PRECISION_DTYPES[precision] == torch.float32:
        return model
    return copy.deepcopy(model).to(PRECISION_DTYPES[precision]).eval()
