"""Native TensorRT backend: engines built on this GPU (rmt-build), memory in device buffers.

TensorRT 10/11 name-based API: ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``. Device memory and streams through cuda-python (no PyTorch). Each
state holds two device buffers for memory, written alternately (ping-pong: TensorRT gives
wrong results when an input and an output share an address). Token ids are uploaded once
per segment into buffers kept per shape (no allocation per segment); outputs come back to
the host only when asked for. Every CUDA and TensorRT call is checked and turned into a
BackendError.

The runner knows no tensor by name: it binds every input and output the graph's spec
declares, so each state pair (RMT memory, per-layer state) is a pair of device buffers the
caller passes in (``inputs`` and ``into``), whatever the model.

``cuda_graphs=True`` captures each full-segment launch as a CUDA graph and replays it: one
graph per (graph, bound addresses and shapes), so a state's two ping-pong arrangements give
two graphs; partial segments (once per input) run uncaptured. TensorRT
needs one plain execution after a shape change before capture, which is also the first
segment's result.

Runs only where a GPU, ``tensorrt`` and ``cuda-python`` are present: its tests are in
tests/gpu and run through scripts/gpu_checks.sh.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from collections import OrderedDict

from ..bundle import Bundle
from ..engines import BuildOptions, build_engine, cached_engine, import_builder, stderr_logger
from ..errors import BackendError
from ..spec import SEQ, bind_symbols
from .base import Runner, RunResult


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise BackendError("the tensorrt backend needs cuda-python: pip install cuda-python") from None
    return cudart


class DeviceBuffer:
    """cudaMalloc'd memory with a shape and dtype; freed when dropped."""

    def __init__(self, cudart, shape: tuple[int, ...], dtype) -> None:
        self._cudart = cudart
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.nbytes = max(1, int(np.prod(self.shape)) * self.dtype.itemsize)
        self.ptr = _check(cudart, cudart.cudaMalloc(self.nbytes), "cudaMalloc")

    def upload(self, array: np.ndarray, stream) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.shape != self.shape:
            raise BackendError(f"upload of {array.shape} into a device buffer of {self.shape}")
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        # From pageable memory, cudaMemcpyAsync returns once the source is staged (CUDA's API
        # synchronisation notes), so ``array`` may go; the stream orders the copy before the
        # launch, and the caller synchronises once after it.
        _check(self._cudart, self._cudart.cudaMemcpyAsync(self.ptr, array.ctypes.data, array.nbytes, kind, stream),
               "cudaMemcpyAsync (host to device)")

    def download(self, stream) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(self._cudart, self._cudart.cudaMemcpyAsync(out.ctypes.data, self.ptr, out.nbytes, kind, stream),
               "cudaMemcpyAsync (device to host)")
        _check(self._cudart, self._cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return out

    def __del__(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr is not None:
            self._cudart.cudaFree(ptr)


def _check(cudart, result, what: str):
    """cuda-python returns (error, *values): raise on an error, return the value(s)."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != int(cudart.cudaError_t.cudaSuccess):
        raise BackendError(f"{what} failed: {error}")
    return values[0] if len(values) == 1 else values or None


class _CapturedGraph:
    """An instantiated CUDA graph (and the graph it came from), destroyed when dropped."""

    def __init__(self, cudart, graph, executable) -> None:
        self._cudart, self.graph, self.executable = cudart, graph, executable

    def launch(self, stream) -> None:
        _check(self._cudart, self._cudart.cudaGraphLaunch(self.executable, stream), "cudaGraphLaunch")

    def __del__(self) -> None:
        executable, self.executable = getattr(self, "executable", None), None
        if executable is not None:
            self._cudart.cudaGraphExecDestroy(executable)
            self._cudart.cudaGraphDestroy(self.graph)


class TensorRTRunner(Runner):
    """Runs the bundle's engines with TensorRT on the current CUDA device."""

    state_on_host = False
    #: Captured graphs kept (least recently used dropped): two per stream of full segments.
    max_captured_graphs = 32

    def __init__(self, bundle: Bundle, builder: str = "tensorrt", build: bool = True, max_batch: int = 8,
                 cuda_graphs: bool = False) -> None:
        super().__init__(bundle)
        self._trt = import_builder(builder)
        self._cuda = _cudart()
        self.builder, self.build, self.max_batch, self.cuda_graphs = builder, build, max_batch, cuda_graphs
        self._contexts: dict[str, Any] = {}
        self._engines: dict[str, Any] = {}
        self._context_locks = {graph: threading.Lock() for graph in self.specs}
        self._io: dict[tuple[str, str, tuple[int, ...]], DeviceBuffer] = {}
        self._bound: dict[str, tuple] = {}  # graph -> the (shape, addresses) its context holds now
        self._captured: OrderedDict[tuple, _CapturedGraph] = OrderedDict()
        self._stream = None

    @property
    def name(self) -> str:
        return f"tensorrt/{self._trt.__version__}" + (" (CUDA graphs)" if self.cuda_graphs else "")

    def _activate(self) -> None:
        options = BuildOptions(builder=self.builder, max_batch=self.max_batch)
        runtime = self._trt.Runtime(stderr_logger(self._trt))
        for graph in self.specs:
            path = build_engine(self.bundle, graph, options) if self.build else cached_engine(self.bundle, graph, options)
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BackendError(f"TensorRT could not deserialize {path}")
            context = engine.create_execution_context()
            if context is None:
                raise BackendError(f"TensorRT could not create an execution context for {path}")
            self._engines[graph], self._contexts[graph] = engine, context
        self._stream = _check(self._cuda, self._cuda.cudaStreamCreate(), "cudaStreamCreate")

    def _deactivate(self) -> None:
        self._captured.clear()
        self._io.clear()
        self._bound.clear()
        self._contexts.clear()
        self._engines.clear()
        if self._stream is not None:
            self._cuda.cudaStreamDestroy(self._stream)
            self._stream = None

    def to_device(self, array: np.ndarray) -> Any:
        self.activate()
        buffer = DeviceBuffer(self._cuda, array.shape, array.dtype)
        buffer.upload(array, self._stream)
        return buffer

    def to_host(self, handle: Any) -> np.ndarray:
        return handle.download(self._stream)

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        self.activate()
        return DeviceBuffer(self._cuda, shape, dtype)

    def shape_of(self, handle: Any) -> tuple[int, ...]:
        return handle.shape

    def _buffer(self, graph: str, name: str, shape: tuple[int, ...], dtype: str) -> DeviceBuffer:
        """An I/O buffer for one tensor and shape, allocated once and reused every segment."""
        key = (graph, name, tuple(shape))
        if key not in self._io:
            self._io[key] = DeviceBuffer(self._cuda, shape, dtype)
        return self._io[key]

    def _bind(self, graph: str, context, inputs: dict[str, DeviceBuffer], outputs: dict[str, DeviceBuffer]) -> tuple:
        """Shapes and addresses of every tensor on the graph's context (skipped when unchanged)."""
        arrangement = tuple((name, b.shape, int(b.ptr)) for name, b in [*inputs.items(), *outputs.items()])
        if self._bound.get(graph) == arrangement:
            return arrangement
        for name, buffer in inputs.items():
            if not context.set_input_shape(name, buffer.shape):
                raise BackendError(f"TensorRT refused shape {buffer.shape} for {name} (outside the profile?)")
        for name, buffer in [*inputs.items(), *outputs.items()]:
            context.set_tensor_address(name, int(buffer.ptr))
        self._bound[graph] = arrangement
        return arrangement

    def _execute(self, graph: str, context) -> None:
        if not context.execute_async_v3(int(self._stream)):
            raise BackendError(f"TensorRT execute_async_v3 of {graph} failed")

    def _capture(self, graph: str, context) -> _CapturedGraph:
        cuda = self._cuda
        mode = cuda.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        _check(cuda, cuda.cudaStreamBeginCapture(self._stream, mode), "cudaStreamBeginCapture")
        try:
            self._execute(graph, context)
        finally:
            captured = _check(cuda, cuda.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
        executable = _check(cuda, cuda.cudaGraphInstantiate(captured, 0), "cudaGraphInstantiate")
        return _CapturedGraph(cuda, captured, executable)

    def _run(self, graph, spec, inputs, want, into):
        with self._context_locks[graph]:
            context = self._contexts[graph]
            bound: dict[str, DeviceBuffer] = {}
            for tensor in spec.inputs:
                value = inputs[tensor.name]
                if isinstance(value, np.ndarray):  # token ids, masks: uploaded into reused buffers
                    buffer = self._buffer(graph, tensor.name, value.shape, tensor.dtype)
                    buffer.upload(value, self._stream)
                    value = buffer
                bound[tensor.name] = value
            sizes = bind_symbols(spec.inputs, {name: b.shape for name, b in bound.items()})
            outputs = {t.name: into[t.name] if t.name in into else self._buffer(graph, t.name, t.resolve(sizes), t.dtype)
                       for t in spec.outputs}
            arrangement = self._bind(graph, context, bound, outputs)
            key = (graph, arrangement)
            captured = self._captured.get(key) if self.cuda_graphs else None
            if captured is not None:
                self._captured.move_to_end(key)
                captured.launch(self._stream)
            else:
                self._execute(graph, context)  # this segment's result, and TensorRT's setup for capture
                if self.cuda_graphs and sizes.get(SEQ) == self.bundle.segment_size:
                    _check(self._cuda, self._cuda.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
                    self._captured[key] = self._capture(graph, context)
                    while len(self._captured) > self.max_captured_graphs:
                        self._captured.popitem(last=False)
            _check(self._cuda, self._cuda.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            host = {name: outputs.pop(name).download(self._stream) for name in want}
            return RunResult(host=host, device=outputs)
