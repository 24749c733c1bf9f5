"""One ARMT segment as an ONNX graph that follows the step spec (issue 18: ARMT export).

The ARMT's state is not one ``memory`` tensor but two per layer, ``W_mem.{l}`` [batch, H, F,
D/H] and ``z.{l}`` [batch, H, F] (rmt_model/armt.py), so the graphs carry 2 x L named state
pairs ``W_mem.{l} -> new_W_mem.{l}``, ``z.{l} -> new_z.{l}``. The runtime's runners bind every
pair a spec declares, so nothing in the runtime is ARMT-specific.

step:   input_ids, attention_mask [batch, seq], W_mem.0, z.0, W_mem.1, ... ->
        logits [batch, seq, vocab], new_W_mem.0, new_z.0, ...
ingest: the same inputs -> last_logits [batch, vocab] (each row's last real token, the LM
        head on that one position only, as the RMT's ingest), new_W_mem.0, new_z.0, ...

The state is float32 in every precision (the ARMT computes its memory in float32 even when
the backbone is fp16); tracing reuses export/graphs.py's ``trace_and_save``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from rmt_model.armt import ARMTDecoder
from rmt_model.step import PRECISION_DTYPES
from rmt_runtime.spec import BATCH, INGEST, SEQ, STEP, GraphSpec, TensorSpec

from .errors import ExportError
from .graphs import DEFAULT_OPSET, trace_and_save

NEW = "new_"  # a state input's output is its name with this prefix


def state_names(model: ARMTDecoder) -> list[str]:
    """The state inputs in spec order: W_mem.0, z.0, W_mem.1, z.1, ... (the model's own order)."""
    return list(model.state_shapes(1))


def armt_specs(model: ARMTDecoder) -> dict[str, GraphSpec]:
    """The step and ingest specs of an ARMT, with one named state pair per state tensor."""
    config = model.config
    state = [TensorSpec(name, "float32", (BATCH, *shape[1:])) for name, shape in model.state_shapes(1).items()]
    new_state = tuple(TensorSpec(NEW + t.name, t.dtype, t.dims) for t in state)
    inputs = (TensorSpec("input_ids", "int64", (BATCH, SEQ)),
              TensorSpec("attention_mask", "int64", (BATCH, SEQ)), *state)
    pairs = {t.name: NEW + t.name for t in state}
    return {STEP: GraphSpec(STEP, inputs, (TensorSpec("logits", "float32", (BATCH, SEQ, config.vocab_size)),
                                           *new_state), pairs),
            INGEST: GraphSpec(INGEST, inputs, (TensorSpec("last_logits", "float32", (BATCH, config.vocab_size)),
                                               *new_state), pairs)}


class ARMTStepModule(nn.Module):
    """(input_ids, attention_mask, (W_mem.0, z.0, ...)) -> (logits, new_W_mem.0, new_z.0, ...).

    logits "all": [B, L, V] at every token; "last": [B, V] at each row's last real token, the
    LM head applied to that position's final (post-norm) hidden state only. The state enters
    and leaves as float32; the model inside may be fp16.
    """

    def __init__(self, model: ARMTDecoder, logits: str) -> None:
        super().__init__()
        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
        self.model, self.logits = model, logits
        self.names = state_names(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: tuple[torch.Tensor, ...]):
        model = self.model
        named = dict(zip(self.names, state))
        logits, new_state = model.step(input_ids, attention_mask, named, logits=self.logits)
        return (logits.float(), *(new_state[name].float() for name in self.names))


def _example(model: ARMTDecoder, batch: int) -> tuple:
    config = model.config
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, config.segment_size), generator=generator)
    # A non-zero state, so that no branch is traced only for an empty memory.
    state = tuple(torch.rand(shape, generator=generator) for shape in model.state_shapes(batch).values())
    return ids, torch.ones(batch, config.segment_size, dtype=torch.int64), state


def export_armt_graph(model: ARMTDecoder, spec: GraphSpec, precision: str, path: str | os.PathLike,
                      opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None) -> Path:
    """Trace the ARMT's ``spec.name`` graph (step or ingest) in ``precision`` and save it at ``path``.

    ``model`` must already compute in the precision (rmt_model.step.model_in_precision).
    Batch is dynamic (1..1024) and seq 1..segment_size; the state's other dims are fixed.
    The saved graph is checked against the spec (names, dtypes, dims) before returning.
    """
    if not isinstance(model, ARMTDecoder):
        raise ExportError(f"export_armt_graph needs an ARMTDecoder, got {type(model).__name__}")
    if spec.name not in (STEP, INGEST):
        raise ExportError(f"an ARMT has the graphs {STEP!r} and {INGEST!r}, not {spec.name!r}")
    model_dtype = next(model.parameters()).dtype
    if model_dtype != PRECISION_DTYPES[precision]:
        raise ExportError(f"the model computes in {model_dtype}, precision {precision} needs "
                          f"{PRECISION_DTYPES[precision]} (use model_in_precision)")
    module = ARMTStepModule(model, "all" if spec.name == STEP else "last").eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=model.config.segment_size)
    example = _example(model, 2)
    dynamic_shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq},
                      "state": tuple({0: batch} for _ in example[2])}
    geometry = {"rmt.kind": "armt", "rmt.family": model.config.family,
                "rmt.segment_size": str(model.config.segment_size),
                "rmt.num_mem_tokens": str(model.config.num_mem_tokens)}
    return trace_and_save(module, model, example, dynamic_shapes, spec, precision, opset, path,
                           {**geometry, **(metadata or {})})
