"""OpenVINO backend: a bundle's fp32 graphs on the CPU, computed in fp32 or in bf16.

Why a second CPU backend: ONNX Runtime's CPU provider computes fp32 graphs in fp32 only, while
OpenVINO's CPU plugin reads the same ONNX file and, asked for ``bf16``, runs its matmuls
and convolutions with the CPU's bf16 instructions (AVX-512 BF16, AMX): about 2x the fp32
rate on such CPUs (docs/BENCHMARKS.md). The graph's inputs and outputs stay float32, so the
memory state is exactly the one every other backend carries: bf16 is how it is computed,
not how it is stored.

Precision is what the caller asks for, never the plugin's default (which is bf16 on AMX
CPUs and fp32 elsewhere): the compiled model's ``INFERENCE_PRECISION_HINT`` is read back,
and a bf16 request that OpenVINO turns into fp32 (a CPU without bf16 instructions) is an
error. Only fp32 bundles run here: an fp16 bundle is made for GPUs, and an int8 bundle's
dynamic quantization (MatMulInteger) runs in float in OpenVINO, at fp32 speed.

State handles are ``openvino.Tensor`` objects owned by the caller. Each thread has its own
infer request per graph (a request is not safe to share between threads); outputs that stay
on the "device" are copied out of the request, whose own buffers the next call overwrites.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import BackendError, library_message
from .base import Runner, RunResult, check_declared_io

#: Precisions the backend computes in (``precision=``), with OpenVINO's name for each.
PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
DEVICE = "CPU"


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise BackendError("the openvino backend needs OpenVINO: pip install openvino "
                           "(or pip install 'rmt-edge[openvino]')") from None
    return openvino


def _check_known(precision: str) -> None:
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r} for the openvino backend: expected one of "
                           f"{sorted(PRECISIONS)}")


def check_precision_available(precision: str, core=None) -> None:
    """A BackendError, before any graph is compiled, when OpenVINO is missing or this CPU cannot
    compute in ``precision`` (bf16 needs AVX-512 BF16 or AMX; OpenVINO says ``BF16``)."""
    _check_known(precision)
    core = core or import_openvino().Core()
    capabilities = core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")
    if precision.upper() not in capabilities:
        raise BackendError(f"this CPU cannot compute in {precision} with OpenVINO (its capabilities: "
                           f"{', '.join(capabilities)}; bf16 needs AVX-512 BF16 or AMX)")


def compile_graph(core, path, precision: str, threads: int | None = None):
    """``path`` (an ONNX graph) compiled for OpenVINO's CPU plugin to compute in ``precision``
    (PRECISIONS' keys), for one request at a time (latency); a precision the plugin does not
    run on this CPU is a BackendError. Shared by the runner and rmt_export's validation."""
    config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = core.compile_model(str(path), DEVICE, config)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own types
        raise BackendError(f"{path}: OpenVINO cannot compile it: {library_message(exc)}") from None
    running = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    if running != PRECISIONS[precision]:
        capabilities = core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")
        raise BackendError(
            f"asked for {precision}, but OpenVINO compiles {Path(path).name} in "
            f"{running} on this CPU (its capabilities: {', '.join(capabilities)}; bf16 needs AVX-512 BF16 or AMX): "
            "refusing to run another precision")
    return compiled


class OpenVinoRunner(Runner):
    """Runs an fp32 bundle's graphs with OpenVINO's CPU plugin, in ``precision`` (fp32 or bf16)."""

    supports_generation = True

    def __init__(self, bundle: Bundle, precision: str = "fp32", threads: int | None = None) -> None:
        super().__init__(bundle)
        _check_known(precision)
        if bundle.precision != "fp32":
            raise BackendError(
                f"the openvino backend runs fp32 bundles (computed in fp32 or bf16); the bundle {bundle.path} is "
                f"{bundle.precision}: " + ("OpenVINO runs its dynamic int8 (MatMulInteger) in float, at fp32 speed; "
                                           "run it with --backend onnxruntime" if bundle.precision == "int8" else
                                           "fp16 bundles are for GPUs; export fp32 and ask for --precision bf16"))
        self.precision = precision
        self.threads = threads
        self._ov = import_openvino()
        self._core = self._ov.Core()
        if DEVICE not in self._core.available_devices:
            raise BackendError(f"OpenVINO has no {DEVICE} device here (devices: {self._core.available_devices})")
        check_precision_available(precision, self._core)
        self._compiled: dict[str, Any] = {}
        self._local = threading.local()  # per thread: graph -> infer request

    @property
    def name(self) -> str:
        return f"openvino/{DEVICE} ({self.precision})"

    @property
    def notes(self) -> list[str]:
        """bf16 on a bundle whose export did not validate it (rmt-export --bf16 does)."""
        if self.precision == "bf16" and not self.bundle.validated_bf16:
            return ["bf16 was not validated when this bundle was exported (rmt-export --bf16 validates it)"]
        return []

    def _compile(self, graph: str):
        compiled = compile_graph(self._core, self.bundle.graph_path(graph), self.precision, self.threads)
        declared = {port.get_any_name(): [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
                    for port in [*compiled.inputs, *compiled.outputs]}
        check_declared_io(self.bundle, graph, declared)
        return compiled

    def _activate(self) -> None:
        for graph in self.specs:
            self._compiled[graph] = self._compile(graph)

    def _deactivate(self) -> None:
        self._compiled.clear()
        self._local = threading.local()

    def _request(self, graph: str, into: dict[str, Any]):
        """This thread's infer request for ``graph`` (generation graphs compile on first use).

        An output given a caller's tensor stays bound to it in the request; a call that binds
        fewer outputs than the last one gets a new request, so that it never writes into a
        buffer the caller may now be reading from (a state handed back as the next input)."""
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = {}
        request, bound = requests.get(graph, (None, set()))
        if request is None or not bound <= set(into):
            compiled = self._compiled.get(graph)
            if compiled is None:
                with self._lock:
                    if graph not in self._compiled:
                        self._compiled[graph] = self._compile(graph)
                    compiled = self._compiled[graph]
            request = compiled.create_infer_request()
        requests[graph] = (request, set(into))
        return request

    # ---- handles: openvino.Tensor on the host ------------------------------------------------
    def to_device(self, array: np.ndarray) -> Any:
        return self._ov.Tensor(np.ascontiguousarray(array))  # Tensor(ndarray) copies it

    def to_host(self, handle: Any) -> np.ndarray:
        return np.array(handle.data, copy=True)

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        return self._ov.Tensor(np.empty(shape, np.dtype(dtype)))

    def shape_of(self, handle: Any) -> tuple[int, ...]:
        return tuple(handle.shape)

    def _run(self, graph, spec, inputs, want, into):
        request = self._request(graph, into)
        try:  # set_tensor checks shapes and types against the graph: its refusals are errors of this run too
            for name, value in inputs.items():
                if isinstance(value, np.ndarray):  # shared, not copied: it lives until the call returns
                    value = self._ov.Tensor(np.ascontiguousarray(value), shared_memory=True)
                request.set_tensor(name, value)
            for name, handle in into.items():
                request.set_tensor(name, handle)
            request.infer()
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own types
            raise BackendError(f"OpenVINO could not run the {graph} graph of {self.bundle.path}: "
                               f"{library_message(exc)}") from None
        host, device = {}, {}
        for name in spec.output_names:
            if name in into:  # written into that Tensor (resized in place if its shape was another)
                device[name] = into[name]
                continue
            # One copy out of the request, which reuses its buffers (a decode step's caches: every token).
            data = request.get_tensor(name).data
            if name in want:
                host[name] = np.array(data, copy=True)
            else:
                device[name] = self._ov.Tensor(data)  # a copy, owned by the handle
        return RunResult(host=host, device=device)


__all__ = ["PRECISIONS", "OpenVinoRunner", "check_precision_available", "compile_graph", "import_openvino"]
