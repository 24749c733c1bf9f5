"""FAKE cuda-python runtime module (``cuda.bindings.runtime``) for CPU tests of the TensorRT
runner's control flow. Not CUDA: "device" memory is host memory from ctypes, and a stream runs
its work at once unless it is capturing, when the work is recorded and a graph launch replays
it. It records every call, flags what real CUDA would reject or corrupt (a copy on a capturing
stream, a free during a capture, an out-of-bounds copy), and can be told to fail a call with a
given error. It pins logic; it never stands in for a GPU result.

Only the API surface the runner and rmt_runtime.engines use.
"""
from __future__ import annotations

import ctypes
import enum
import itertools
import threading
from types import SimpleNamespace


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidResourceHandle = 400
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


OK = cudaError_t.cudaSuccess


class FakeCudart:
    """One fake CUDA device and its runtime API; installed as ``cuda.bindings.runtime``."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamCaptureMode = cudaStreamCaptureMode
    cudaStreamNonBlocking = 1

    def __init__(self, name: str = "Fake Orin", capability: tuple[int, int] = (8, 7), driver: int = 12060) -> None:
        self.device_name, self.capability, self.driver = name, capability, driver
        self.device_count_error = OK
        self.fail: dict[str, cudaError_t] = {}      # call name -> error it returns (until removed)
        self.calls: list[str] = []
        self.violations: list[str] = []
        self.allocations: dict[int, ctypes.Array] = {}
        self.freed: list[int] = []                   # pointers freed, in order (addresses are reused)
        self.stream_flags: dict[int, int] = {}
        self.capturing: dict[int, dict] = {}        # stream -> {"work": [...], "invalid": reason, "thread": id}
        self.graphs: dict[int, list] = {}
        self.executables: dict[int, list] = {}
        self.last_error = OK
        self.on_begin_capture = None                 # called right after a capture begins
        self._ids = itertools.count(1)
        self.lock = threading.Lock()

    # ---- bookkeeping -------------------------------------------------------------------------
    def _call(self, name: str):
        self.calls.append(name)
        return self.fail.get(name)

    def _in_bounds(self, ptr: int, nbytes: int) -> bool:
        for start, buffer in self.allocations.items():
            if start <= ptr and ptr + nbytes <= start + ctypes.sizeof(buffer):
                return True
        return False

    def live_bytes(self) -> int:
        return sum(ctypes.sizeof(b) for b in self.allocations.values())

    def enqueue(self, stream: int, work, capturable: bool = True, what: str = "kernel") -> None:
        """Device work on ``stream``: run now, or record it when the stream captures."""
        capture = self.capturing.get(stream)
        if capture is None:
            work()
            return
        capture["work"].append(work)
        if not capturable:  # e.g. a TensorRT loop: capture is invalidated, as on a real GPU
            capture["invalid"] = f"{what} cannot be captured"

    def _check_capture(self, stream: int, what: str) -> None:
        if stream in self.capturing:
            self.violations.append(f"{what} on a stream that is capturing")
        elif self.capturing and what == "cudaFree":
            self.violations.append("cudaFree while a stream is capturing")

    # ---- device ------------------------------------------------------------------------------
    def cudaGetDeviceCount(self):
        error = self._call("cudaGetDeviceCount") or self.device_count_error
        return (error, 0 if error else 1)

    def cudaGetDeviceProperties(self, index):
        error = self._call("cudaGetDeviceProperties") or OK
        props = SimpleNamespace(name=self.device_name.encode(), major=self.capability[0], minor=self.capability[1])
        return (error, props)

    def cudaDriverGetVersion(self):
        return (self._call("cudaDriverGetVersion") or OK, self.driver)

    def cudaGetErrorName(self, error):
        return (OK, cudaError_t(int(error)).name.encode())

    def cudaGetLastError(self):
        self.calls.append("cudaGetLastError")
        error, self.last_error = self.last_error, OK
        return (error,)

    # ---- memory ------------------------------------------------------------------------------
    def cudaMalloc(self, nbytes):
        error = self._call("cudaMalloc")
        if error:
            return (error, 0)
        buffer = ctypes.create_string_buffer(int(nbytes))
        ptr = ctypes.addressof(buffer)
        self.allocations[ptr] = buffer
        return (OK, ptr)

    def cudaFree(self, ptr):
        self.calls.append("cudaFree")
        self._check_capture(-1, "cudaFree")
        if self.allocations.pop(int(ptr), None) is None:
            self.violations.append(f"cudaFree of unknown pointer {ptr}")
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        self.freed.append(int(ptr))
        return (OK,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        error = self._call("cudaMemcpyAsync")
        if error:
            return (error,)
        self._check_capture(int(stream), "cudaMemcpyAsync")
        device_side = dst if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else src
        if not self._in_bounds(int(device_side), int(nbytes)):
            self.violations.append(f"cudaMemcpyAsync of {nbytes} bytes outside any allocation")
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        ctypes.memmove(int(dst), int(src), int(nbytes))
        return (OK,)

    # ---- streams and graphs --------------------------------------------------------------------
    def cudaStreamCreateWithFlags(self, flags):
        stream = next(self._ids)
        self.stream_flags[stream] = int(flags)
        return (OK, stream)

    def cudaStreamDestroy(self, stream):
        self.stream_flags.pop(int(stream), None)
        return (OK,)

    def cudaStreamSynchronize(self, stream):
        if int(stream) in self.capturing:  # illegal while capturing: it invalidates the capture
            self.capturing[int(stream)]["invalid"] = "cudaStreamSynchronize during capture"
            self.violations.append("cudaStreamSynchronize on a stream that is capturing")
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        return (OK,)

    def cudaStreamBeginCapture(self, stream, mode):
        error = self._call("cudaStreamBeginCapture")
        if error:
            return (error,)
        self.capturing[int(stream)] = {"work": [], "invalid": None, "mode": mode}
        if self.on_begin_capture is not None:
            self.on_begin_capture()
        return (OK,)

    def cudaStreamEndCapture(self, stream):
        self.calls.append("cudaStreamEndCapture")
        capture = self.capturing.pop(int(stream), None)
        if capture is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle, None)
        if capture["invalid"] or self.fail.get("cudaStreamEndCapture"):
            self.last_error = cudaError_t.cudaErrorStreamCaptureInvalidated
            return (cudaError_t.cudaErrorStreamCaptureInvalidated, None)
        graph = next(self._ids)
        self.graphs[graph] = capture["work"]
        return (OK, graph)

    def cudaGraphInstantiate(self, graph, flags):
        error = self._call("cudaGraphInstantiate")
        if error:
            return (error, None)
        executable = next(self._ids)
        self.executables[executable] = self.graphs[graph]
        return (OK, executable)

    def cudaGraphLaunch(self, executable, stream):
        self.calls.append("cudaGraphLaunch")
        work = self.executables.get(executable)
        if work is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        for item in work:
            self.enqueue(int(stream), item)
        return (OK,)

    def cudaGraphDestroy(self, graph):
        self.calls.append("cudaGraphDestroy")
        self.graphs.pop(graph, None)
        return (OK,)

    def cudaGraphExecDestroy(self, executable):
        self.calls.append("cudaGraphExecDestroy")
        self.executables.pop(executable, None)
        return (OK,)
