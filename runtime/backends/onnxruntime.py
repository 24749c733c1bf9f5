"""ONNX Runtime backend: CPU, CUDA or TensorRT execution provider, memory kept in OrtValues.

Memory never leaves the provider's device between segments: each state holds two
OrtValues (ping-pong) bound with IOBinding; only requested host outputs are copied out.
The provider asked for must be the one the session really uses: onnxruntime-gpu falls
back to CPU silently when CUDA is missing, which is an error here.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import BackendError
from .base import Runner, RunResult

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
# Where each provider keeps tensors: OrtValue device names.
_DEVICE = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "cuda"}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendError("the onnxruntime backend needs ONNX Runtime: pip install onnxruntime "
                           "(or onnxruntime-gpu for CUDA/TensorRT)") from None
    return onnxruntime


class OnnxRuntimeRunner(Runner):
    """Runs a bundle's graphs with one ONNX Runtime execution provider."""

    def __init__(self, bundle: Bundle, provider: str = "cpu", threads: int | None = None,
                 engine_cache: str | os.PathLike | None = None) -> None:
        super().__init__(bundle)
        if provider not in PROVIDERS:
            raise BackendError(f"unknown provider {provider!r}: expected one of {sorted(PROVIDERS)}")
        self.provider = provider
        self.threads = threads
        self.engine_cache = engine_cache
        self.device = _DEVICE[provider]
        self.state_on_host = self.device == "cpu"
        self._ort = import_onnxruntime()
        available = self._ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            raise BackendError(f"provider {provider!r} ({PROVIDERS[provider]}) is not in this onnxruntime build "
                               f"(available: {available}); for GPUs install onnxruntime-gpu")
        self._sessions: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return f"onnxruntime/{PROVIDERS[self.provider]}"

    def _provider_list(self) -> list:
        if self.provider == "tensorrt":
            options = {"trt_fp16_enable": self.bundle.precision == "fp16"}
            if self.engine_cache is not None:
                options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(self.engine_cache),
                               trt_timing_cache_enable=True)
            # Nodes TensorRT cannot take run on CUDA, never on the CPU.
            return [(PROVIDERS["tensorrt"], options), PROVIDERS["cuda"]]
        return [PROVIDERS[self.provider]]

    def _open_session(self, graph: str):
        ort = self._ort
        options = ort.SessionOptions()
        options.log_severity_level = 4  # errors come back as exceptions (BackendError); no second copy on stderr
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        try:
            session = ort.InferenceSession(str(self.bundle.graph_path(graph)), options,
                                           providers=self._provider_list())
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"{self.bundle.graph_path(graph)}: onnxruntime cannot load the "
                               f"{graph} graph: {first}") from None
        self._check_declared_shapes(graph, session)
        actual = session.get_providers()
        if actual[0] != PROVIDERS[self.provider]:
            raise BackendError(f"asked for {PROVIDERS[self.provider]}, but the {graph} session runs on "
                               f"{actual} (a missing CUDA/TensorRT library makes onnxruntime fall back "
                               "silently); refusing to run on another provider")
        return session

    supports_generation = True

    def _check_declared_shapes(self, graph: str, session) -> None:
        """The graph file's own I/O agrees with the spec the manifest gives for it (names and every
        fixed dim): a manifest edited to another vocabulary or memory size is refused at load."""
        spec = self.bundle.graph_spec(graph)
        declared = {t.name: t.shape for t in [*session.get_inputs(), *session.get_outputs()]}
        problems = []
        for tensor in (*spec.inputs, *spec.outputs):
            shape = declared.get(tensor.name)
            if shape is None:
                problems.append(f"{tensor.name} is not in the graph")
            elif len(shape) != len(tensor.dims) or any(
                    isinstance(d, int) and isinstance(g, int) and d != g for d, g in zip(tensor.dims, shape)):
                problems.append(f"{tensor.name}: graph {list(shape)}, manifest {list(tensor.dims)}")
        if problems:
            raise BackendError(f"{self.bundle.graph_path(graph)}: the graph does not match its manifest spec: "
                               + "; ".join(problems))

    def _activate(self) -> None:
        for graph in self.specs:
            self._sessions[graph] = self._open_session(graph)

    def _session(self, graph: str):
        """The graph's session: segment graphs from activation, generation graphs opened on first use."""
        session = self._sessions.get(graph)
        if session is None:
            with self._lock:
                if graph not in self._sessions:
                    self._sessions[graph] = self._open_session(graph)
                session = self._sessions[graph]
        return session

    def _deactivate(self) -> None:
        self._sessions.clear()

    # ---- handles: OrtValues on the provider's device ----------------------------------------
    def to_device(self, array: np.ndarray) -> Any:
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def to_host(self, handle: Any) -> np.ndarray:
        # A CPU OrtValue's numpy() can be a view of its buffer, which dies with the OrtValue.
        return np.array(handle.numpy(), copy=True)

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        return self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype), self.device, 0)

    def shape_of(self, handle: Any) -> tuple[int, ...]:
        return tuple(handle.shape())

    def _run(self, graph, spec, inputs, want, into):
        session = self._session(graph)
        binding = session.io_binding()
        for name, value in inputs.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in spec.output_names:  # in spec order; get_outputs() returns them in binding order
            if name in into:
                binding.bind_ortvalue_output(name, into[name])
            else:  # copied to the host only when asked for; ORT's arena reuses device memory
                binding.bind_output(name, "cpu" if name in want else self.device)
        try:
            session.run_with_iobinding(binding)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"onnxruntime could not run the {graph} graph of {self.bundle.path}: {first}") from None
        values = dict(zip(spec.output_names, binding.get_outputs()))
        host = {name: np.array(values.pop(name).numpy(), copy=True) for name in want}
        return RunResult(host=host, device=values)
