"""Native TensorRT backend: engines built on this GPU (rmt-build), memory in device buffers.

TensorRT 10/11 name-based API: ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``. Device memory and streams through cuda-python (no PyTorch). Each
state holds two device buffers for memory, written alternately (ping-pong: TensorRT gives
wrong results when an input and an output share an address). Token ids are uploaded once
per segment; outputs come back to the host only when asked for. Every CUDA and TensorRT
call is checked and turned into a BackendError.

Runs only where a GPU, ``tensorrt`` and ``cuda-python`` are present: its tests are in
tests/gpu and run through scripts/gpu_checks.sh.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import BackendError
from .base import Runner


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
        _check(self._cudart, self._cudart.cudaMemcpyAsync(self.ptr, array.ctypes.data, array.nbytes, kind, stream),
               "cudaMemcpyAsync (host to device)")
        _check(self._cudart, self._cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

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


class TensorRTRunner(Runner):
    """Runs the bundle's engines with TensorRT on the current CUDA device."""

    memory_on_host = False

    def __init__(self, bundle: Bundle, builder: str = "tensorrt", build: bool = True, max_batch: int = 8) -> None:
        super().__init__(bundle)
        from rmt_export.engines import import_builder  # torch-free module of the same distribution

        self._trt = import_builder(builder)
        self._cuda = _cudart()
        self.builder, self.build, self.max_batch = builder, build, max_batch
        self._contexts: dict[str, Any] = {}
        self._engines: dict[str, Any] = {}
        self._context_locks = {graph: threading.Lock() for graph in self.specs}
        self._stream = None

    @property
    def name(self) -> str:
        return f"tensorrt/{self._trt.__version__}"

    def _activate(self) -> None:
        from rmt_export.engines import BuildOptions, build_engine, cached_engine

        options = BuildOptions(builder=self.builder, max_batch=self.max_batch)
        runtime = self._trt.Runtime(self._trt.Logger(self._trt.Logger.WARNING))
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
        self._contexts.clear()
        self._engines.clear()
        if self._stream is not None:
            self._cuda.cudaStreamDestroy(self._stream)
            self._stream = None

    def memory_from_host(self, memory: np.ndarray) -> Any:
        self.activate()
        buffer = DeviceBuffer(self._cuda, memory.shape, np.float32)
        buffer.upload(memory, self._stream)
        return buffer

    def memory_to_host(self, handle: Any) -> np.ndarray:
        return handle.download(self._stream)

    def empty_memory(self, batch: int) -> Any:
        self.activate()
        return DeviceBuffer(self._cuda, (batch, self.bundle.num_mem_tokens, self.bundle.hidden_size), np.float32)

    def _run(self, graph, input_ids, attention_mask, memory, new_memory, want):
        spec = self.specs[graph]
        batch, length = input_ids.shape
        inputs = {"input_ids": DeviceBuffer(self._cuda, input_ids.shape, np.int64),
                  "attention_mask": DeviceBuffer(self._cuda, attention_mask.shape, np.int64)}
        inputs["input_ids"].upload(input_ids, self._stream)
        inputs["attention_mask"].upload(attention_mask, self._stream)
        outputs = {t.name: DeviceBuffer(self._cuda, t.shape(batch, length), np.float32)
                   for t in spec.outputs if t.name != "new_memory"}
        with self._context_locks[graph]:
            context = self._contexts[graph]
            for name, buffer in (*inputs.items(), ("memory", memory)):
                if not context.set_input_shape(name, buffer.shape):
                    raise BackendError(f"TensorRT refused shape {buffer.shape} for {name} (outside the profile?)")
                context.set_tensor_address(name, int(buffer.ptr))
            context.set_tensor_address("new_memory", int(new_memory.ptr))
            for name, buffer in outputs.items():
                context.set_tensor_address(name, int(buffer.ptr))
            if not context.execute_async_v3(int(self._stream)):
                raise BackendError(f"TensorRT execute_async_v3 of {graph} failed")
            _check(self._cuda, self._cuda.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return {name: outputs[name].download(self._stream) for name in want}
