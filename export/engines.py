"""TensorRT engines built on the machine that runs them, cached in the bundle.

Engines are not portable across GPUs or TensorRT versions, so each is keyed by what makes
it valid: the builder (``tensorrt`` 10/11, or ``tensorrt_rtx``) and its version, the GPU
name and compute capability, the precision and builder flags, the optimisation profile
(batch 1..max, seq 1..segment_size, tuned for full segments) and the graph's sha256. A
cached engine whose key differs is stale: it is rebuilt, or refused when building is off,
and never run. Layout, inside the bundle:

    engines/<graph>-<key>.plan    the serialized engine
    engines/<graph>-<key>.json    the key's fields (what it was built for)
    engines/timing.cache          TensorRT's timing cache, shared by every build (not for RTX)

Torch-free; ``tensorrt``/``tensorrt_rtx`` and ``cuda-python`` are imported when needed.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rmt_runtime.atomic import write_atomically
from rmt_runtime.bundle import Bundle

from .errors import ExportError
from .trt_gate import profile_shapes

BUILDERS = ("tensorrt", "tensorrt_rtx")
ENGINE_DIR = "engines"
TIMING_CACHE = "timing.cache"


class EngineError(ExportError):
    """An engine that cannot be built, or a cached one that does not fit this machine."""


@dataclass(frozen=True)
class BuildOptions:
    """How to build: the builder module, profile limits, workspace cap, the TensorRT 10 fp16 flag."""

    builder: str = "tensorrt"
    max_batch: int = 8
    opt_batch: int = 1
    workspace_mb: int = 1024      # capped: on Jetson the GPU shares memory with the CPU
    fp16_flag: bool = False       # TensorRT 10 only: let an fp32 graph run layers in fp16


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str       # "8.7" for Orin; "aot" for a GPU-less ahead-of-time build


def import_builder(name: str):
    """The TensorRT Python module ``name``, or an EngineError saying how to get it."""
    if name not in BUILDERS:
        raise EngineError(f"builder must be one of {BUILDERS}, got {name!r}")
    try:
        return __import__(name)
    except (ImportError, OSError):
        hint = ("TensorRT comes with JetPack on Jetson (apt), or from NVIDIA's pip index on x86 GPUs"
                if name == "tensorrt" else "pip install tensorrt-rtx-cu12")
        raise EngineError(f"the {name} module is not importable here: {hint}") from None


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def current_device(builder: str) -> DeviceInfo:
    """The GPU engines are built for (through cuda-python); an AOT marker for TensorRT-RTX without one."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6 layout
        except ImportError:
            cudart = None
    if cudart is not None:
        error, count = cudart.cudaGetDeviceCount()
        if int(error) == 0 and count > 0:
            error, props = cudart.cudaGetDeviceProperties(0)
            if int(error) == 0:
                name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
                return DeviceInfo(name.strip("\x00 "), f"{props.major}.{props.minor}")
    if builder == "tensorrt_rtx":
        return DeviceInfo("none", "aot")
    raise EngineError("no CUDA GPU is visible (cuda-python found none): TensorRT engines are built on the "
                      "GPU that runs them")


def engine_fields(bundle: Bundle, graph: str, trt_name: str, trt_version: str, device: DeviceInfo,
                  options: BuildOptions) -> dict[str, Any]:
    """Everything an engine's validity depends on."""
    spec = bundle.graph_spec(graph)
    profile = profile_shapes(spec, bundle.segment_size, options.max_batch, options.opt_batch,
                             bundle.num_mem_tokens)
    return {
        "builder": trt_name, "trt_version": trt_version, "gpu": device.name,
        "compute_capability": device.compute_capability, "precision": bundle.precision,
        "fp16_flag": options.fp16_flag, "graph": graph,
        "graph_sha256": bundle.manifest["files"][bundle.manifest["graphs"][graph]["file"]],
        "profile": {name: [list(s) for s in shapes] for name, shapes in profile.items()},
    }


def engine_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def engine_path(bundle: Bundle, fields: dict[str, Any]) -> Path:
    return bundle.path / ENGINE_DIR / f"{fields['graph']}-{engine_key(fields)}.plan"


def stale_engines(bundle: Bundle, fields: dict[str, Any]) -> list[str]:
    """Cached engines of this graph built for something else, each with the first field that differs."""
    found = []
    for meta in sorted((bundle.path / ENGINE_DIR).glob(f"{fields['graph']}-*.json")):
        try:
            theirs = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            found.append(f"{meta.name}: unreadable")
            continue
        differs = [k for k in fields if theirs.get(k) != fields[k]]
        if differs:
            k = differs[0]
            found.append(f"{meta.stem}.plan was built for {k}={theirs.get(k)!r}, this machine needs {fields[k]!r}")
    return found


INT8_FOR_TENSORRT = ("int8 bundles hold ONNX Runtime's dynamic quantization (MatMulInteger), which TensorRT does "
                     "not take: run them on ONNX Runtime's CPU provider, and build TensorRT engines from the fp16 or "
                     "fp32 bundle")


def _check_precision(trt, bundle: Bundle, options: BuildOptions) -> None:
    if bundle.precision == "int8":
        raise EngineError(f"{bundle.path}: {INT8_FOR_TENSORRT}")
    if options.fp16_flag and bundle.precision == "fp16":
        raise EngineError("the bundle is already fp16 inside the graph; the fp16 builder flag adds nothing")
    if options.fp16_flag and (not hasattr(trt, "BuilderFlag") or not hasattr(trt.BuilderFlag, "FP16")):
        raise EngineError(f"this TensorRT ({trt.__version__}) has no FP16 builder flag (TensorRT 11 and RTX "
                          "build strongly typed networks): export the bundle with --fp16 instead")


def build_engine(bundle: Bundle, graph: str, options: BuildOptions = BuildOptions(),
                 progress: Callable[[str], None] | None = None) -> Path:
    """Build (or reuse) the engine of ``graph`` for this machine; return the .plan path."""
    trt = import_builder(options.builder)
    _check_precision(trt, bundle, options)
    device = current_device(options.builder)
    fields = engine_fields(bundle, graph, options.builder, str(trt.__version__), device, options)
    path = engine_path(bundle, fields)
    if path.is_file():
        return path
    say = progress or (lambda message: None)
    say(f"building the TensorRT engine of {graph} for {device.name} (sm {device.compute_capability}), "
        f"{bundle.precision}; this can take minutes (9.5 min reported on an Orin)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = bundle.precision == "fp16" or trt_major(trt) >= 11 or options.builder == "tensorrt_rtx"
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(bundle.graph_path(graph))):
        errors = [f"{parser.get_error(i).node_name() or '?'}: {parser.get_error(i).desc()}"
                  for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT cannot parse {graph}: " + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    cache_file = bundle.path / ENGINE_DIR / TIMING_CACHE
    keep_timing = options.builder == "tensorrt"  # timing caches are no-ops in TensorRT-RTX
    if keep_timing:
        timing_cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in fields["profile"].items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build the {graph} engine (see the builder's messages above)")
    (bundle.path / ENGINE_DIR).mkdir(exist_ok=True)
    _write_atomically(path, bytes(serialized))
    _write_atomically(path.with_suffix(".json"), json.dumps(fields, indent=2, sort_keys=True).encode())
    if keep_timing:
        _write_atomically(cache_file, bytes(config.get_timing_cache().serialize()))
    say(f"built {path.name} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f}s")
    return path


def cached_engine(bundle: Bundle, graph: str, options: BuildOptions = BuildOptions()) -> Path:
    """The engine valid for this machine; never builds. A stale or missing one is an EngineError."""
    trt = import_builder(options.builder)
    fields = engine_fields(bundle, graph, options.builder, str(trt.__version__),
                           current_device(options.builder), options)
    path = engine_path(bundle, fields)
    if path.is_file():
        return path
    stale = stale_engines(bundle, fields)
    detail = ("; ".join(stale) + "; ") if stale else ""
    raise EngineError(f"no TensorRT engine of {graph} for this machine in {bundle.path / ENGINE_DIR}: {detail}"
                      f"build one with rmt-build --bundle {bundle.path}")


def _write_atomically(path: Path, data: bytes) -> None:
    write_atomically(path, lambda handle: handle.write(data))


__all__ = ["BuildOptions", "DeviceInfo", "EngineError", "build_engine", "cached_engine", "engine_fields",
           "engine_key", "stale_engines", "current_device"]
