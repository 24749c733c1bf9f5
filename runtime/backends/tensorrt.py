"""Native TensorRT backend: engines built on this GPU by rmt-build, memory in device buffers.

TensorRT 10/11 name-based API (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``); device memory and one non-blocking stream through cuda-python (no
PyTorch). Every CUDA and TensorRT call is checked; a failure is a BackendError naming the
call and the CUDA error (``cudaErrorInsufficientDriver``), or what TensorRT logged on the
calling thread while the call failed (it returns None or False and says why only there).

Engines: loading never builds (minutes on an Orin; that is rmt-build's job). It takes the
engines valid for this machine, with the build options their metadata records (max batch,
fp16, TF32), or the ``engine_options`` given (``rmt_runtime.engines.find_engines``).

Buffers: each state holds two device buffers per state pair, written alternately
(ping-pong: TensorRT gives wrong results when an input and an output share an address).
Token ids, masks and outputs nobody keeps live in one buffer per (graph, tensor, batch),
allocated at full segment size: a partial segment binds a smaller shape at the same address,
so device memory is bounded by the batch sizes used, not by the lengths seen.

Contexts: every execution context of the runner shares one user-managed activation buffer
(one stream, one lock: they never run at once). Uncaptured runs use one plain context per
graph. With ``cuda_graphs=True`` each full-segment arrangement (graph, batch, addresses)
gets a context of its own, runs plainly once (TensorRT's setup, and this segment's result),
is captured, and from then on replays; that context is never rebound, as TensorRT requires
of a captured context. Partial segments always run on the plain context. When a capture
fails (before TensorRT 10.8, ONNX ``CumSum`` becomes a loop, which cannot be captured), the
capture is ended, the CUDA error cleared, the graph marked uncapturable (said once on stderr
and in ``notes``, which ``RMTRuntime.picked`` shows) and it runs plainly from then on.

Threads: one lock around all stream and device-memory work (uploads, read-outs, runs,
captures), so nothing is enqueued while a graph is captured. Buffers dropped from any thread
are freed later, by the runner, under that lock.

Runs only where a GPU, ``tensorrt`` and ``cuda-python`` are present: its GPU tests are in
tests/gpu (scripts/gpu_checks.sh); its control flow is pinned on the CPU against the fake
modules in tests/fakes.
"""
from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..engines import (TRT_DTYPES, BuildOptions, EngineSet, checked, cuda_error_name, find_engines, import_builder,
                       import_cudart, read_plan, stderr_logger)
from ..errors import BackendError
from ..spec import BATCH, SEQ, TensorSpec, bind_symbols
from .base import Runner, RunResult

CAPTURE_HINT = ("TensorRT before 10.8 imports ONNX CumSum as a loop, which a CUDA graph cannot capture; "
                "graphs exported by this rmt-edge have none (re-export an older bundle)")


class _Device:
    """cuda-python's runtime API for one runner: checked calls, and frees deferred to a safe moment.

    A buffer can be dropped on any thread, at any time (garbage collection), even while the
    runner captures a CUDA graph; ``cudaFree`` then would break the capture. So dropped
    buffers are queued here and freed by ``collect``, which the runner calls under its lock.
    """

    def __init__(self, cudart) -> None:
        self.cudart = cudart
        self._pending: list[int] = []
        self._pending_lock = threading.Lock()

    def check(self, result, what: str):
        """cuda-python returns (error, *values): raise on an error, return the value(s)."""
        error, *values = result if isinstance(result, tuple) else (result,)
        if int(error) != int(self.cudart.cudaError_t.cudaSuccess):
            raise BackendError(f"{what} failed: {cuda_error_name(self.cudart, error)}")
        return values[0] if len(values) == 1 else values or None

    def succeeded(self, error) -> bool:
        return int(error) == int(self.cudart.cudaError_t.cudaSuccess)

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.cudart.cudaMalloc(nbytes), f"cudaMalloc ({nbytes} bytes)"))

    def release(self, ptr: int) -> None:
        with self._pending_lock:
            self._pending.append(ptr)

    def collect(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for ptr in pending:
            self.cudart.cudaFree(ptr)

    def __del__(self) -> None:
        self.collect()


class DeviceBuffer:
    """Device memory with a shape and dtype. Owners (``allocate``) free it when dropped;
    views (``view``) bind a smaller shape at the same address and keep their owner alive."""

    def __init__(self, device: _Device, ptr: int, shape: tuple[int, ...], dtype, owner: "DeviceBuffer | None") -> None:
        self._device, self.ptr, self.shape, self.dtype = device, ptr, tuple(int(d) for d in shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self._owner = owner

    @classmethod
    def allocate(cls, device: _Device, shape: tuple[int, ...], dtype) -> "DeviceBuffer":
        nbytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        return cls(device, device.malloc(nbytes), shape, dtype, None)

    @property
    def capacity(self) -> int:
        return self._owner.capacity if self._owner is not None else max(1, self.nbytes)

    def view(self, shape: tuple[int, ...]) -> "DeviceBuffer":
        view = DeviceBuffer(self._device, self.ptr, shape, self.dtype, self._owner or self)
        if view.nbytes > self.capacity:
            raise BackendError(f"a {tuple(shape)} {self.dtype} view does not fit a buffer of {self.capacity} bytes")
        return view

    def __del__(self) -> None:
        if getattr(self, "_owner", True) is None and getattr(self, "ptr", None) is not None:
            self._device.release(self.ptr)


class _CapturedGraph:
    """An instantiated CUDA graph with the execution context it was captured from (never rebound)."""

    def __init__(self, device: _Device, graph, executable, context) -> None:
        self._device, self.graph, self.executable, self.context = device, graph, executable, context

    def launch(self, stream) -> None:
        self._device.check(self._device.cudart.cudaGraphLaunch(self.executable, stream), "cudaGraphLaunch")

    def __del__(self) -> None:
        executable, self.executable = getattr(self, "executable", None), None
        if executable is not None:
            self._device.cudart.cudaGraphExecDestroy(executable)
            self._device.cudart.cudaGraphDestroy(self.graph)


class TensorRTRunner(Runner):
    """Runs the bundle's engines with TensorRT on the current CUDA device."""

    state_on_host = False
    #: Captured graphs kept (least recently used dropped): two per stream of full segments.
    max_captured_graphs = 32

    def __init__(self, bundle: Bundle, builder: str = "tensorrt", engine_options: BuildOptions | None = None,
                 cuda_graphs: bool = False) -> None:
        super().__init__(bundle)
        self._trt = import_builder(builder)
        self._logger = stderr_logger(self._trt)
        self._device = _Device(import_cudart())
        self.builder, self.engine_options, self.cuda_graphs = builder, engine_options, cuda_graphs
        self.engines: EngineSet | None = None
        self.max_batch = engine_options.max_batch if engine_options is not None else None
        self._stream_lock = threading.RLock()
        self._runtime = None
        self._engines: dict[str, Any] = {}
        self._plain: dict[str, Any] = {}                 # graph -> its context for uncaptured runs
        self._bound: dict[str, tuple] = {}               # graph -> the arrangement its plain context holds
        self._io: dict[tuple[str, str, int], DeviceBuffer] = {}
        self._captured: OrderedDict[tuple, _CapturedGraph] = OrderedDict()
        self._uncapturable: dict[str, str] = {}          # graph -> why its capture failed
        self._scratch: DeviceBuffer | None = None
        self._stream = None

    @property
    def name(self) -> str:
        return f"tensorrt/{self._trt.__version__}" + (" (CUDA graphs)" if self.cuda_graphs else "")

    @property
    def captured_graphs(self) -> int:
        """CUDA graphs captured and replayable now."""
        return len(self._captured)

    @property
    def uncapturable(self) -> frozenset[str]:
        """Graphs whose capture failed and that run without CUDA graphs."""
        return frozenset(self._uncapturable)

    @property
    def notes(self) -> list[str]:
        return [f"CUDA graphs off for the {graph} graph: {reason}" for graph, reason in self._uncapturable.items()]

    # ---- lifecycle -----------------------------------------------------------------------
    def _activate(self) -> None:
        cuda = self._device.cudart
        engines = find_engines(self.bundle, self.builder, self.engine_options)
        recent = self._logger.recent
        # kept: engines need their runtime
        self._runtime = checked(recent, lambda: self._trt.Runtime(self._logger), "TensorRT could not create a runtime",
                                error=BackendError)
        for graph, path in engines.paths.items():
            plan = read_plan(path)
            engine = checked(recent, lambda: self._runtime.deserialize_cuda_engine(plan),
                             f"TensorRT could not deserialize {path}", f"rebuild it with rmt-build --bundle "
                             f"{self.bundle.path}", error=BackendError)
            self._check_engine_io(graph, engine, path)
            self._engines[graph] = engine
        with self._stream_lock:
            size = max(self._activation_bytes(engine) for engine in self._engines.values())
            self._scratch = DeviceBuffer.allocate(self._device, (max(1, size),), np.uint8)
            for graph in self._engines:
                self._plain[graph] = self._new_context(graph)
            self._stream = self._device.check(cuda.cudaStreamCreateWithFlags(cuda.cudaStreamNonBlocking),
                                              "cudaStreamCreateWithFlags (non-blocking)")
        self.engines = engines
        self.max_batch = engines.options.max_batch

    def _deactivate(self) -> None:
        with self._stream_lock:
            if self._stream is not None:
                self._device.cudart.cudaStreamSynchronize(self._stream)
            self._captured.clear()
            self._plain.clear()
            self._bound.clear()
            self._io.clear()
            self._engines.clear()
            self._scratch = None
            self._runtime = None
            if self._stream is not None:
                self._device.cudart.cudaStreamDestroy(self._stream)
                self._stream = None
            self._device.collect()

    def _check_engine_io(self, graph: str, engine, path) -> None:
        """The engine's tensors are the spec's: names, direction and dtype (an engine of another
        graph or export is refused at load, not met as garbage at run time)."""
        spec = self.specs[graph]
        have = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        want = {t.name for t in (*spec.inputs, *spec.outputs)}
        problems = [f"missing {sorted(want - have)}"] if want - have else []
        problems += [f"unknown {sorted(have - want)}"] if have - want else []
        for tensors, mode in ((spec.inputs, self._trt.TensorIOMode.INPUT), (spec.outputs, self._trt.TensorIOMode.OUTPUT)):
            for t in tensors:
                if t.name not in have:
                    continue
                if engine.get_tensor_mode(t.name) != mode:
                    problems.append(f"{t.name} is not an {mode.name.lower()}")
                dtype = engine.get_tensor_dtype(t.name).name
                if dtype != TRT_DTYPES.get(t.dtype, t.dtype.upper()):
                    problems.append(f"{t.name}: engine {dtype}, spec {t.dtype}")
        if problems:
            raise BackendError(f"{path} does not match the {graph} graph's spec: " + "; ".join(problems)
                               + f"; rebuild it with rmt-build --bundle {self.bundle.path}")

    @staticmethod
    def _activation_bytes(engine) -> int:
        size = getattr(engine, "device_memory_size_v2", None)  # TensorRT 10.1+
        return int(size if size is not None else engine.device_memory_size)

    def _new_context(self, graph: str):
        """A context of ``graph`` using the runner's one activation buffer (user-managed memory)."""
        strategy = self._trt.ExecutionContextAllocationStrategy.USER_MANAGED
        context = checked(self._logger.recent, lambda: self._engines[graph].create_execution_context(strategy),
                          f"TensorRT could not create an execution context for the {graph} engine",
                          error=BackendError)
        if hasattr(context, "set_device_memory"):  # TensorRT 10.1+
            context.set_device_memory(int(self._scratch.ptr), self._scratch.capacity)
        else:
            context.device_memory = int(self._scratch.ptr)
        return context

    # ---- handles -----------------------------------------------------------------------------
    def _upload(self, buffer: DeviceBuffer, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=buffer.dtype)
        if array.shape != buffer.shape:
            raise BackendError(f"upload of {array.shape} into a device buffer of {buffer.shape}")
        cuda = self._device.cudart
        # From pageable memory, cudaMemcpyAsync returns once the source is staged (CUDA's API
        # synchronisation notes), so ``array`` may go; the stream orders the copy before the launch.
        self._device.check(cuda.cudaMemcpyAsync(buffer.ptr, array.ctypes.data, array.nbytes,
                                                cuda.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream),
                           "cudaMemcpyAsync (host to device)")

    def _download(self, buffer: DeviceBuffer) -> np.ndarray:
        cuda = self._device.cudart
        out = np.empty(buffer.shape, buffer.dtype)
        self._device.check(cuda.cudaMemcpyAsync(out.ctypes.data, buffer.ptr, out.nbytes,
                                                cuda.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream),
                           "cudaMemcpyAsync (device to host)")
        self._synchronize()
        return out

    def _synchronize(self) -> None:
        self._device.check(self._device.cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def to_device(self, array: np.ndarray) -> Any:
        self.activate()
        with self._stream_lock:
            self._device.collect()
            buffer = DeviceBuffer.allocate(self._device, array.shape, array.dtype)
            self._upload(buffer, array)
            self._synchronize()
            return buffer

    def to_host(self, handle: Any) -> np.ndarray:
        with self._stream_lock:
            return self._download(handle)

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        self.activate()
        with self._stream_lock:
            self._device.collect()
            return DeviceBuffer.allocate(self._device, shape, dtype)

    def shape_of(self, handle: Any) -> tuple[int, ...]:
        return handle.shape

    # ---- running -----------------------------------------------------------------------------
    def _io_buffer(self, graph: str, tensor: TensorSpec, batch: int) -> DeviceBuffer:
        """The one buffer of ``tensor`` for this graph and batch, at full segment size."""
        key = (graph, tensor.name, batch)
        if key not in self._io:
            full = tensor.resolve({BATCH: batch, SEQ: self.bundle.segment_size})
            self._io[key] = DeviceBuffer.allocate(self._device, full, tensor.dtype)
        return self._io[key]

    @staticmethod
    def _arrangement(inputs: dict[str, DeviceBuffer], outputs: dict[str, DeviceBuffer]) -> tuple:
        return tuple((name, b.shape, int(b.ptr)) for name, b in [*inputs.items(), *outputs.items()])

    def _bind(self, context, inputs: dict[str, DeviceBuffer], outputs: dict[str, DeviceBuffer]) -> None:
        recent = self._logger.recent
        for name, buffer in inputs.items():
            checked(recent, lambda: context.set_input_shape(name, buffer.shape),
                    f"TensorRT refused shape {buffer.shape} for {name}", f"the engine's profile takes batch "
                    f"1..{self.max_batch}, length 1..{self.bundle.segment_size}", error=BackendError)
        for name, buffer in [*inputs.items(), *outputs.items()]:
            checked(recent, lambda: context.set_tensor_address(name, int(buffer.ptr)),
                    f"TensorRT refused the device address of {name}", error=BackendError)

    def _execute(self, graph: str, context) -> None:
        checked(self._logger.recent, lambda: context.execute_async_v3(int(self._stream)),
                f"TensorRT execute_async_v3 of the {graph} graph failed", error=BackendError)

    def _run(self, graph, spec, inputs, want, into):
        with self._stream_lock:
            self._device.collect()
            shapes = {name: (v.shape if isinstance(v, np.ndarray) else self.shape_of(v)) for name, v in inputs.items()}
            sizes = bind_symbols(spec.inputs, shapes)
            batch = sizes.get(BATCH, 1)
            bound: dict[str, DeviceBuffer] = {}
            for tensor in spec.inputs:
                value = inputs[tensor.name]
                if isinstance(value, np.ndarray):  # token ids, masks: into the graph's buffer for this batch
                    value = self._io_buffer(graph, tensor, batch).view(value.shape)
                    self._upload(value, inputs[tensor.name])
                bound[tensor.name] = value
            outputs = {t.name: into[t.name] if t.name in into else
                       self._io_buffer(graph, t, batch).view(t.resolve(sizes)) for t in spec.outputs}
            full = sizes.get(SEQ, self.bundle.segment_size) == self.bundle.segment_size
            if self.cuda_graphs and full and graph not in self._uncapturable:
                self._run_captured(graph, bound, outputs)
            else:
                arrangement = self._arrangement(bound, outputs)
                if self._bound.get(graph) != arrangement:
                    self._bind(self._plain[graph], bound, outputs)
                    self._bound[graph] = arrangement
                self._execute(graph, self._plain[graph])
            self._synchronize()
            host = {name: self._download(outputs.pop(name)) for name in want}
            return RunResult(host=host, device=outputs)

    def _run_captured(self, graph: str, inputs: dict[str, DeviceBuffer], outputs: dict[str, DeviceBuffer]) -> None:
        """Replay this arrangement's graph; the first time, run it plainly on a new context and capture that."""
        key = (graph, self._arrangement(inputs, outputs))
        captured = self._captured.get(key)
        if captured is not None:
            self._captured.move_to_end(key)
            captured.launch(self._stream)
            return
        context = self._new_context(graph)
        self._bind(context, inputs, outputs)
        self._execute(graph, context)  # this segment's result, and TensorRT's setup before capture
        self._synchronize()
        captured = self._capture(graph, context)
        if captured is not None:
            self._captured[key] = captured
            while len(self._captured) > self.max_captured_graphs:
                self._captured.popitem(last=False)

    def _capture(self, graph: str, context) -> _CapturedGraph | None:
        """Capture one execution of ``context``; on failure end the capture, clear the error and
        mark the graph uncapturable (None), as trtexec does."""
        device, cuda = self._device, self._device.cudart
        mode = cuda.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        (error,) = _errors(cuda.cudaStreamBeginCapture(self._stream, mode))
        if not device.succeeded(error):
            return self._not_capturable(graph, f"cudaStreamBeginCapture: {cuda_error_name(cuda, error)}")
        mark = self._logger.recent.mark()
        launched = context.execute_async_v3(int(self._stream))
        error, captured = cuda.cudaStreamEndCapture(self._stream)  # always ended, whatever happened inside
        ended = device.succeeded(error)
        if not ended:
            problem = f"cudaStreamEndCapture: {cuda_error_name(cuda, error)}"
        elif not launched:
            problem = f"execute_async_v3 failed while capturing: {self._logger.recent.reason_since(mark)}"
        else:
            error, executable = cuda.cudaGraphInstantiate(captured, 0)
            if device.succeeded(error):
                return _CapturedGraph(device, captured, executable, context)
            problem = f"cudaGraphInstantiate: {cuda_error_name(cuda, error)}"
        if ended:
            cuda.cudaGraphDestroy(captured)
        cuda.cudaGetLastError()  # the failed capture's error must not surface in the next call
        return self._not_capturable(graph, problem)

    def _not_capturable(self, graph: str, problem: str) -> None:
        self._uncapturable[graph] = f"capture failed ({problem}); it runs without them. {CAPTURE_HINT}"
        print(f"[rmt] CUDA graphs off for the {graph} graph: {self._uncapturable[graph]}", file=sys.stderr, flush=True)
        return None


def _errors(result) -> tuple:
    """The error of a cuda-python call that returns only one, as a 1-tuple."""
    return (result[0],) if isinstance(result, tuple) else (result,)
