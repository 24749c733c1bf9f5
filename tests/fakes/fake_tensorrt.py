"""FAKE ``tensorrt`` module for CPU tests of rmt-build and the TensorRT runner's control flow.

Not TensorRT. The "builder" reads the ONNX graph's inputs and outputs with ``onnx`` and
serializes what it was asked (flags, profile, the graph's path) as the "plan"; the "engine"
runs that ONNX graph with ONNX Runtime's CPU provider on the fake device memory of
tests/fakes/fake_cudart.py, at the addresses and shapes bound on its execution context. So
a runner that binds the wrong buffer, shape or context gives wrong numbers here, and what
TensorRT forbids (changing a context after it was captured, running without device memory,
a shape outside the profile) is recorded in ``state.violations``. Knobs on ``state`` make
calls fail (a rejected timing cache, no timing cache back, an uncapturable engine), and
``state.fail`` makes a call fail as TensorRT does: its logger is given an error message,
then it returns None, False or -1. It pins logic; it never stands in for a GPU result.

Only the API surface rmt_runtime.engines and runtime/backends/tensorrt.py use.
"""
from __future__ import annotations

import ctypes
import enum
import json
from types import SimpleNamespace

import numpy as np

__version__ = "10.3.0"

state = SimpleNamespace()


def reset(cudart, version: str = "10.3.0") -> None:
    """Fresh knobs and records; ``cudart`` is the fake device the engines run on."""
    global __version__
    __version__ = version
    state.__dict__.clear()
    state.__dict__.update(
        cudart=cudart, violations=[], builds=[], contexts=[],
        reject_timing_cache=False,      # set_timing_cache returns False (another GPU / version)
        no_timing_cache_back=False,     # get_timing_cache returns None
        uncapturable=False,             # every engine holds a loop (CumSum before 10.8)
        engine_dtype_override={},       # tensor name -> DataType the engine reports instead
        refuse_address=set(),           # tensor names set_tensor_address refuses
        fail={},                        # call name (see _failed) -> the error its logger is given
        logger=None,                    # the last logger a Builder, Runtime or OnnxParser got
    )


def _failed(call: str) -> bool:
    """Whether ``call`` is to fail: if so, its error goes to the logger first, as TensorRT's does.
    Calls: Runtime, Builder, create_network, OnnxParser, parse_from_file, create_builder_config,
    set_timing_cache, create_optimization_profile, add_optimization_profile, build_serialized_network,
    deserialize_cuda_engine, create_execution_context, set_input_shape, set_tensor_address, execute_async_v3,
    and "execute_async_v3 while capturing" (on a capturing stream only)."""
    if call not in state.fail:
        return False
    if state.logger is not None:
        state.logger.log(ILogger.Severity.INFO, f"{call}: an info line that is not the reason")
        state.logger.log(ILogger.Severity.ERROR, state.fail[call])
    return True


def _logger_of(logger):
    state.logger = logger
    return logger


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    BF16 = "bfloat16"
    INT64 = "int64"
    INT32 = "int32"
    INT8 = "int8"
    UINT8 = "uint8"
    BOOL = "bool"


_ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 16: DataType.BF16, 7: DataType.INT64, 6: DataType.INT32,
               3: DataType.INT8, 2: DataType.UINT8, 9: DataType.BOOL}


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    TF32 = 7


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 5


# ---- building ----------------------------------------------------------------------------------
class _Tensor:
    def __init__(self, name: str, dtype: DataType, shape: tuple[int, ...]) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags, self.path, self.inputs, self.outputs, self.op_types = flags, None, [], [], set()

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


class OnnxParser:
    def __new__(cls, network: _Network, logger):
        _logger_of(logger)
        return None if _failed("OnnxParser") else super().__new__(cls)

    def __init__(self, network: _Network, logger) -> None:
        self.network = network
        self.num_errors = 0

    def parse_from_file(self, path: str) -> bool:
        import onnx

        if _failed("parse_from_file"):
            return False

        model = onnx.load(path, load_external_data=False)

        def tensors(values):
            return [_Tensor(v.name, _ONNX_TYPES[v.type.tensor_type.elem_type],
                            tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim))
                    for v in values]
        self.network.path = path
        self.network.inputs, self.network.outputs = tensors(model.graph.input), tensors(model.graph.output)
        self.network.op_types = {node.op_type for node in model.graph.node}
        return True


class _TimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data or f"fake timing cache of TensorRT {__version__}".encode()


class _Profile:
    def __init__(self) -> None:
        self.shapes = {}

    def set_shape(self, name, low, opt, high) -> None:
        self.shapes[name] = (tuple(low), tuple(opt), tuple(high))


class _Config:
    def __init__(self) -> None:
        self.flags = {BuilderFlag.TF32}  # TensorRT's default: TF32 on
        self.timing_cache = None
        self.profiles = []
        self.workspace = None

    def set_memory_pool_limit(self, pool, size) -> None:
        self.workspace = size

    def set_flag(self, flag) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag) -> None:
        self.flags.discard(flag)

    def get_flag(self, flag) -> bool:
        return flag in self.flags

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        if cache.data and _failed("set_timing_cache"):
            return False
        if cache.data and state.reject_timing_cache:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self):
        return None if state.no_timing_cache_back else self.timing_cache

    def add_optimization_profile(self, profile: _Profile) -> int:
        if _failed("add_optimization_profile"):
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1


class _HostMemory(bytes):
    @property
    def nbytes(self) -> int:
        return len(self)


class Builder:
    def __new__(cls, logger):
        _logger_of(logger)
        return None if _failed("Builder") else super().__new__(cls)

    def __init__(self, logger) -> None:
        self.logger = logger

    def create_network(self, flags: int) -> _Network | None:
        return None if _failed("create_network") else _Network(flags)

    def create_builder_config(self) -> _Config | None:
        return None if _failed("create_builder_config") else _Config()

    def create_optimization_profile(self) -> _Profile | None:
        return None if _failed("create_optimization_profile") else _Profile()

    def build_serialized_network(self, network: _Network, config: _Config) -> _HostMemory | None:
        if _failed("build_serialized_network"):
            return None
        plan = {"onnx": network.path, "tf32": BuilderFlag.TF32 in config.flags,
                "fp16": BuilderFlag.FP16 in config.flags, "profile": config.profiles[0].shapes,
                "loop": "CumSum" in network.op_types and tuple(map(int, __version__.split(".")[:2])) < (10, 8)}
        state.builds.append(plan)
        return _HostMemory(json.dumps(plan).encode())


# ---- running -----------------------------------------------------------------------------------
class _Engine:
    device_memory_size_v2 = 1 << 12

    def __init__(self, plan: dict) -> None:
        import onnxruntime

        self.plan = plan
        self.session = onnxruntime.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
        types = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(int64)": DataType.INT64,
                 "tensor(int32)": DataType.INT32, "tensor(bool)": DataType.BOOL}
        self.io = {t.name: (TensorIOMode.INPUT, types[t.type]) for t in self.session.get_inputs()}
        self.io.update({t.name: (TensorIOMode.OUTPUT, types[t.type]) for t in self.session.get_outputs()})
        self.names = list(self.io)

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.io[name][0]

    def get_tensor_dtype(self, name: str) -> DataType:
        return state.engine_dtype_override.get(name, self.io[name][1])

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC) -> "_Context | None":
        if _failed("create_execution_context"):
            return None
        context = _Context(self, strategy)
        state.contexts.append(context)
        return context

    def compute(self, shapes: dict, addresses: dict) -> None:
        """Run the graph on the fake device memory at the bound addresses and shapes."""
        cudart = state.cudart
        feeds = {}
        for name, (mode, dtype) in self.io.items():
            if mode is TensorIOMode.INPUT:
                shape = shapes[name]
                nbytes = int(np.prod(shape)) * np.dtype(dtype.value).itemsize
                if not cudart._in_bounds(addresses[name], nbytes):
                    state.violations.append(f"input {name} read outside its allocation")
                    return
                raw = (ctypes.c_char * nbytes).from_address(addresses[name])
                feeds[name] = np.frombuffer(raw, dtype=dtype.value).reshape(shape).copy()
        outputs = self.session.run(None, feeds)
        for meta, value in zip(self.session.get_outputs(), outputs):
            value = np.ascontiguousarray(value)
            if not cudart._in_bounds(addresses[meta.name], value.nbytes):
                state.violations.append(f"output {meta.name} written outside its allocation")
                return
            ctypes.memmove(addresses[meta.name], value.ctypes.data, value.nbytes)


class _Context:
    def __init__(self, engine: _Engine, strategy) -> None:
        self.engine, self.strategy = engine, strategy
        self.shapes, self.addresses, self.device_memory_ptr = {}, {}, None
        self.captured = False
        self.executions = 0

    def _changed(self, what: str) -> None:
        if self.captured:
            state.violations.append(f"{what} on a context after it was captured")

    def set_input_shape(self, name: str, shape) -> bool:
        self._changed(f"set_input_shape({name})")
        if _failed("set_input_shape"):
            return False
        low, _, high = self.engine.plan["profile"][name]
        shape = tuple(shape)
        if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self._changed(f"set_tensor_address({name})")
        if _failed("set_tensor_address"):
            return False
        if name not in self.engine.io or name in state.refuse_address:
            return False
        self.addresses[name] = int(ptr)
        return True

    def set_device_memory(self, ptr: int, size: int) -> None:
        self._changed("set_device_memory")
        if size < self.engine.device_memory_size_v2 or not state.cudart._in_bounds(int(ptr), int(size)):
            state.violations.append("device memory smaller than the engine needs")
        self.device_memory_ptr = int(ptr)

    def execute_async_v3(self, stream: int) -> bool:
        capturing = int(stream) in state.cudart.capturing
        if _failed("execute_async_v3") or (capturing and _failed("execute_async_v3 while capturing")):
            return False
        if self.strategy is ExecutionContextAllocationStrategy.USER_MANAGED and self.device_memory_ptr is None:
            state.violations.append("execute without device memory on a user-managed context")
            return False
        if set(self.addresses) != set(self.engine.names) or any(
                n not in self.shapes for n, (m, _) in self.engine.io.items() if m is TensorIOMode.INPUT):
            return False
        self.executions += 1
        shapes, addresses = dict(self.shapes), dict(self.addresses)  # what a captured kernel launch keeps
        cudart = state.cudart
        if int(stream) in cudart.capturing:
            self.captured = True
        cudart.enqueue(int(stream), lambda: self.engine.compute(shapes, addresses),
                       capturable=not (self.engine.plan["loop"] or state.uncapturable), what="a TensorRT loop")
        return True


class Runtime:
    def __new__(cls, logger):
        _logger_of(logger)
        return None if _failed("Runtime") else super().__new__(cls)

    def __init__(self, logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes):
        if _failed("deserialize_cuda_engine"):
            return None
        plan = json.loads(bytes(data))
        plan["profile"] = {k: tuple(tuple(s) for s in v) for k, v in plan["profile"].items()}
        return _Engine(plan)
