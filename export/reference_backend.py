"""The PyTorch reference backend: rmt_model's step behind the runtime's runner interface.

It lives in rmt_export, the one package that sees both rmt_model and rmt_runtime, so that
the runtime never imports torch. It needs the checkpoint the bundle was exported from (a
bundle holds ONNX graphs, not PyTorch weights), refuses a checkpoint whose config differs
from the bundle's, and runs in the bundle's precision. Use it to compare a backend with
PyTorch on the same bundle:

    from rmt_export.reference_backend import reference_runtime
    rt = reference_runtime("model-fp32", "model.pt")        # an RMTRuntime running PyTorch
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from rmt_model import load_checkpoint
from rmt_model.step import PRECISION_DTYPES, StepModule, model_in_precision
from rmt_runtime import Bundle, RMTRuntime
from rmt_runtime.backends.base import Runner, RunResult
from rmt_runtime.errors import BackendError
from rmt_runtime.spec import INGEST

DEVICES = ("cpu", "cuda")


class PyTorchRunner(Runner):
    """Runs rmt_model's ``step`` in PyTorch (CPU, or CUDA when ``device='cuda'``)."""

    def __init__(self, bundle: Bundle, checkpoint: str | os.PathLike, device: str = "cpu",
                 threads: int | None = None) -> None:
        super().__init__(bundle)
        if device not in DEVICES:
            raise BackendError(f"the torch backend runs on {DEVICES}, not {device!r}")
        if bundle.precision == "int8":
            raise BackendError(f"bundle {bundle.path} is int8 (ONNX Runtime's quantized MatMuls), which the torch "
                               "reference backend cannot run; run it with backend='onnxruntime' and compare with an "
                               "fp32 bundle")
        self.checkpoint, self.device, self.threads = checkpoint, device, threads
        self.state_on_host = device == "cpu"
        self._modules: dict[str, StepModule] = {}

    @property
    def name(self) -> str:
        return f"torch/{self.device}"

    def _activate(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        model = load_checkpoint(self.checkpoint)
        if model.config.to_dict() != self.bundle.manifest.get("rmt_config"):
            raise BackendError(f"checkpoint {self.checkpoint} does not hold the model of bundle "
                               f"{self.bundle.path} (their RMT configs differ)")
        model = model_in_precision(model, self.bundle.precision).to(self.device)
        dtype = PRECISION_DTYPES[self.bundle.precision]
        for graph in self.specs:
            logits = "all" if graph != INGEST else "none" if model.config.kind == "encoder" else "last"
            self._modules[graph] = StepModule(model, logits, dtype).eval()

    def _deactivate(self) -> None:
        self._modules.clear()

    def to_device(self, array: np.ndarray) -> Any:
        return torch.tensor(np.asarray(array), device=self.device)

    def to_host(self, handle: Any) -> np.ndarray:
        return handle.detach().cpu().numpy().copy()

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        return torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)

    def shape_of(self, handle: Any) -> tuple[int, ...]:
        return tuple(handle.shape)

    def _run(self, graph, spec, inputs, want, into):
        args = [torch.from_numpy(value).to(self.device) if isinstance(value, np.ndarray) else value
                for value in (inputs[name] for name in spec.input_names)]
        with torch.no_grad():
            outputs = dict(zip(spec.output_names, self._modules[graph](*args)))
        for name, buffer in into.items():
            buffer.copy_(outputs[name])
            outputs[name] = buffer
        return RunResult(host={name: outputs.pop(name).cpu().numpy() for name in want}, device=outputs)


def reference_runtime(bundle: str | os.PathLike | Bundle, checkpoint: str | os.PathLike, device: str = "cpu",
                      threads: int | None = None) -> RMTRuntime:
    """An RMTRuntime over ``bundle`` that runs the PyTorch model of ``checkpoint`` instead of the graphs."""
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    runner = PyTorchRunner(bundle, checkpoint, device=device, threads=threads).activate()
    return RMTRuntime(bundle, runner, f"{runner.name} (the PyTorch reference, from {checkpoint})")
