"""The PyTorch reference backend: rmt_model's step behind the runtime's runner interface.

It lives in rmt_export, the one package that sees both rmt_model and rmt_runtime, so that
the runtime never imports torch. It needs the checkpoint the bundle was exported from (a
bundle holds ONNX graphs, not PyTorch weights), refuses a checkpoint whose config differs
from the bundle's, and runs in the bundle's precision. RMT bundles run rmt_model.step's
StepModule (one ``memory`` state); ARMT bundles (``architecture: armt``) run
export/armt_graphs.py's ARMTStepModule, the module their graphs were traced from, with every
named state pair (``W_mem.{l}``, ``z.{l}``) passed by its spec name. Use it to compare a
backend with PyTorch on the same bundle:

    from rmt_export.reference_backend import reference_runtime
    rt = reference_runtime("model-fp32", "model.pt")        # an RMTRuntime running PyTorch
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from rmt_model import ARMTDecoder, load_checkpoint
from rmt_model.step import PRECISION_DTYPES, StepModule, model_in_precision
from rmt_runtime import Bundle, RMTRuntime
from rmt_runtime.backends.base import Runner, RunResult
from rmt_runtime.errors import BackendError
from rmt_runtime.spec import INGEST

from .armt_graphs import NEW, ARMTStepModule

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
        self._modules: dict[str, StepModule | ARMTStepModule] = {}

    @property
    def name(self) -> str:
        return f"torch/{self.device}"

    def _activate(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        model = load_checkpoint(self.checkpoint)
        if model.config.to_dict() != self.bundle.rmt_config:
            raise BackendError(f"checkpoint {self.checkpoint} does not hold the model of bundle "
                               f"{self.bundle.path} (their RMT configs differ)")
        armt = isinstance(model, ARMTDecoder)  # its config's kind "armt" matched the bundle's rmt_config
        model = model_in_precision(model, self.bundle.precision).to(self.device)
        dtype = PRECISION_DTYPES[self.bundle.precision]
        for graph in self.specs:
            if armt:  # the module the graph was traced from: step "all", ingest "last"
                self._modules[graph] = ARMTStepModule(model, "last" if graph == INGEST else "all").eval()
                continue
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

    def _tensor(self, value: Any) -> torch.Tensor:
        return torch.from_numpy(value).to(self.device) if isinstance(value, np.ndarray) else value

    def _run(self, graph, spec, inputs, want, into):
        module = self._modules[graph]
        with torch.no_grad():
            if isinstance(module, ARMTStepModule):  # (ids, mask, state in the model's order) by spec name
                state = tuple(self._tensor(inputs[name]) for name in module.names)
                values = module(self._tensor(inputs["input_ids"]), self._tensor(inputs["attention_mask"]), state)
                names = [spec.outputs[0].name, *(NEW + name for name in module.names)]
            else:
                values = module(*(self._tensor(inputs[name]) for name in spec.input_names))
                names = spec.output_names
            outputs = dict(zip(names, values))
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
