"""PyTorch backend: the rmt_model reference behind the runner interface.

Available only where torch and transformers are installed; it needs the checkpoint the
bundle was exported from (a bundle holds ONNX graphs, not PyTorch weights) and refuses a
checkpoint whose config differs from the bundle's. Runs in the bundle's precision.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import BackendError
from .base import Runner


class PyTorchRunner(Runner):
    """Runs rmt_model's ``step`` in PyTorch (CPU, or CUDA when ``device='cuda'``)."""

    def __init__(self, bundle: Bundle, checkpoint: str | os.PathLike | None, device: str = "cpu",
                 threads: int | None = None) -> None:
        super().__init__(bundle)
        if checkpoint is None:
            raise BackendError("the torch backend needs the checkpoint the bundle was exported from "
                               "(checkpoint=..., rmt-run --checkpoint)")
        try:
            import torch  # noqa: F401
        except ImportError:
            raise BackendError("the torch backend needs PyTorch: pip install rmt-edge[export]") from None
        self.checkpoint = checkpoint
        self.device = device
        self.threads = threads
        self.memory_on_host = device == "cpu"
        self._modules: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return f"torch/{self.device}"

    def _activate(self) -> None:
        import torch

        from rmt_export.graphs import DTYPES, StepModule, model_in_precision
        from rmt_model import load_checkpoint

        if self.bundle.precision == "int8":
            raise BackendError(f"bundle {self.bundle.path} is int8 (ONNX Runtime's quantized MatMuls), which the torch "
                               "reference backend cannot run; run it with backend='onnxruntime' and compare with an "
                               "fp32 bundle")
        if self.threads:
            torch.set_num_threads(self.threads)
        model = load_checkpoint(self.checkpoint)
        if model.config.to_dict() != self.bundle.manifest.get("rmt_config"):
            raise BackendError(f"checkpoint {self.checkpoint} does not hold the model of bundle "
                               f"{self.bundle.path} (their RMT configs differ)")
        traced = model_in_precision(model, self.bundle.precision).to(self.device)
        self._modules = {graph: StepModule(traced, graph, DTYPES[self.bundle.precision]).eval()
                         for graph in self.specs}

    def _deactivate(self) -> None:
        self._modules.clear()

    def memory_from_host(self, memory: np.ndarray) -> Any:
        import torch

        return torch.tensor(np.asarray(memory, dtype=np.float32), device=self.device)

    def memory_to_host(self, handle: Any) -> np.ndarray:
        return handle.detach().cpu().numpy().copy()

    def empty_memory(self, batch: int) -> Any:
        import torch

        return torch.empty(batch, self.bundle.num_mem_tokens, self.bundle.hidden_size, device=self.device)

    def _run(self, graph, input_ids, attention_mask, memory, new_memory, want):
        import torch

        with torch.no_grad():
            ids = torch.from_numpy(input_ids).to(self.device)
            mask = torch.from_numpy(attention_mask).to(self.device)
            outputs = dict(zip(self.specs[graph].output_names, self._modules[graph](ids, mask, memory)))
            new_memory.copy_(outputs["new_memory"])
        return {name: outputs[name].cpu().numpy() for name in want}
