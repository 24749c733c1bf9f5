"""TensorRT engines built on the machine that runs them, cached in the bundle.

Engines are not portable across GPUs or TensorRT versions, so each is keyed by what makes
it valid: the builder (``tensorrt`` 10/11, or ``tensorrt_rtx``) and its version, the GPU
name and compute capability, the precision and builder flags (fp16, TF32), the optimisation
profile (batch 1..max, seq 1..segment_size, tuned for full segments) and the sha256 of the
graph and of its external weights. A cached engine whose key differs is stale: rmt-build
rebuilds it, loading refuses it, and it never runs. Layout, inside the bundle:

    engines/<graph>-<key>.plan    the serialized engine
    engines/<graph>-<key>.json    the key's fields (what it was built for) and when it was built
    engines/timing-<builder>-<version>-<gpu>-sm<cc>.cache
                                  TensorRT's timing cache, one per TensorRT version and GPU
                                  (another's is rejected by the builder; none for RTX)

Loading never builds (``find_engines``): it takes the engines built for this machine,
reading the build options from their metadata, or the options it is given.

This is the one TensorRT build path: ``parse_and_build`` parses an ONNX graph, checks it
against its spec, sets the optimisation profile and builds; ``build_engine`` (rmt-build, the
deployment build) and the CPU gate (``rmt_export.trt_gate``, rmt-check-trt) both call it.
It lives in the runtime because the deploying device builds its own engines.

Torch-free; ``tensorrt``/``tensorrt_rtx`` and ``cuda-python`` are imported when needed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections import deque
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .atomic import write_atomically
from .bundle import ENGINE_DIR, Bundle, sha256_file
from .errors import EngineError, one_line
from .schema import (ENGINE_METADATA_LIMIT, DocumentError, EngineMetadataDoc, check_engine_metadata, parse_json,
                     read_document)
from .spec import GraphSpec

BUILDERS = ("tensorrt", "tensorrt_rtx")


@dataclass(frozen=True)
class BuildOptions:
    """How to build: the builder module, profile limits, workspace cap, the TensorRT 10 fp16 flag."""

    builder: str = "tensorrt"
    max_batch: int = 8
    opt_batch: int = 1
    workspace_mb: int = 1024      # capped: on Jetson the GPU shares memory with the CPU; not in the key
    fp16_flag: bool = False       # TensorRT 10 only: let an fp32 graph run layers in fp16
    tf32: bool = False            # TensorRT turns TF32 on by default; off, an fp32 engine is fp32

    def flags(self) -> str:
        """These options as rmt-build flags (the defaults left out)."""
        default = BuildOptions()
        parts = [f"--builder {self.builder}" if self.builder != default.builder else "",
                 f"--max-batch {self.max_batch}" if self.max_batch != default.max_batch else "",
                 "--fp16" if self.fp16_flag else "", "--tf32" if self.tf32 else ""]
        return " ".join(p for p in parts if p)


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str       # "8.7" for Orin; "aot" for a GPU-less ahead-of-time build


class RecentErrors:
    """The last error messages a TensorRT logger was given, kept per thread.

    TensorRT reports a failed call by returning None, False or -1, and says why only to its
    logger, on the thread that made the call. So a caller marks (``mark``) before the call and,
    when it failed, takes what its own thread was told since (``since``, ``reason_since``):
    never another thread's messages, and at most the last ``limit`` of them."""

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self._local = threading.local()  # per thread: count of messages so far, deque of (number, message)

    def _kept(self) -> deque:
        kept = getattr(self._local, "kept", None)
        if kept is None:
            kept = self._local.kept = deque(maxlen=self.limit)
            self._local.count = 0
        return kept

    def add(self, message: str) -> None:
        kept = self._kept()
        self._local.count += 1
        kept.append((self._local.count, str(message)))

    def mark(self) -> int:
        """A point in this thread's messages: ``since`` takes those after it."""
        self._kept()
        return self._local.count

    def since(self, mark: int) -> list[str]:
        """This thread's messages after ``mark`` (the last ``limit`` of them), repeats left out."""
        found: list[str] = []
        for number, message in self._kept():
            if number > mark and message not in found:
                found.append(message)
        return found

    def reason_since(self, mark: int) -> str:
        """What TensorRT said since ``mark``, on one line; says so when it said nothing."""
        said = one_line("\n".join(self.since(mark)))
        return f"TensorRT said: {said}" if said else "TensorRT logged no reason"


@functools.lru_cache(maxsize=None)
def stderr_logger(trt):
    """The process's one TensorRT logger for module ``trt`` (tensorrt or tensorrt_rtx): warnings
    and errors as ``[TRT] [W] message`` lines on stderr, and errors kept in ``recent`` (a
    ``RecentErrors``) for the error that a failed call raises. TensorRT's own ``trt.Logger``
    prints to stdout, where it would corrupt a command's ``--json`` document. One instance per
    module, kept alive here: TensorRT holds on to the logger and keeps the first one a builder got."""
    severity = trt.ILogger.Severity
    letters = {int(severity.INTERNAL_ERROR): "F", int(severity.ERROR): "E", int(severity.WARNING): "W",
               int(severity.INFO): "I", int(severity.VERBOSE): "V"}
    shown, kept = int(severity.WARNING), int(severity.ERROR)

    class StderrLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.recent = RecentErrors()

        def log(self, sev, msg):  # called by TensorRT for every message, verbose included
            if int(sev) <= kept:
                self.recent.add(msg)
            if int(sev) <= shown:
                print(f"[TRT] [{letters.get(int(sev), '?')}] {msg}", file=sys.stderr, flush=True)

    return StderrLogger()


def checked(recent: RecentErrors, call: Callable[[], Any], failure: str, hint: str = "",
            error: type[Exception] = EngineError) -> Any:
    """``call()``'s result; when TensorRT returned None or False, ``error`` saying ``failure``,
    what TensorRT logged on this thread meanwhile, then ``hint``."""
    mark = recent.mark()
    result = call()
    if result is None or result is False:
        raise error(f"{failure}: {recent.reason_since(mark)}" + (f"; {hint}" if hint else ""))
    return result


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


# ---- the one build path ------------------------------------------------------------------------
# The spec's numpy dtype names, as TensorRT names them.
TRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64",
               "int32": "INT32", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}

Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def profile_shapes(spec: GraphSpec, segment_size: int, max_batch: int, opt_batch: int, cache_prefix: int = 0
                   ) -> Profile:
    """min/opt/max of every spec input: batch 1/opt_batch/max_batch, seq 1/segment/segment,
    and for the decode graph's cache ``past`` 1/P + segment/2/P + segment - 1, with P the
    positions ahead of the prompt (``Bundle.cache_prefix``: the RMT's M, an ARMT's sink); with
    rollover, generation's default, the cache never holds more than P + segment positions."""
    top = cache_prefix + segment_size - 1
    return {t.name: (t.shape(1, 1, 1), t.shape(opt_batch, segment_size, max(1, cache_prefix + segment_size // 2)),
                     t.shape(max_batch, segment_size, max(1, top))) for t in spec.inputs}


def check_network_io(network, spec: GraphSpec) -> tuple[list[str], bool]:
    """Spec vs the parsed network: names, dtypes, ranks and fixed dims.

    Returns the problems and whether one of them leaves no profile that fits the graph.
    """
    problems: list[str] = []
    fatal = False
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    outputs = {network.get_output(i).name: network.get_output(i) for i in range(network.num_outputs)}
    for kind, tensors, specs in (("input", inputs, spec.inputs), ("output", outputs, spec.outputs)):
        for extra in sorted(set(tensors) - {t.name for t in specs}):
            problems.append(f"graph {kind} {extra!r} is not in the spec")
        for t in specs:
            tensor = tensors.get(t.name)
            if tensor is None:
                problems.append(f"spec {kind} {t.name!r} is not in the graph")
                fatal |= kind == "input"
                continue
            want = TRT_DTYPES.get(t.dtype, t.dtype.upper())
            if tensor.dtype.name != want:
                problems.append(f"{kind} {t.name!r}: graph dtype {tensor.dtype.name}, spec {t.dtype}")
            shape = tuple(tensor.shape)
            if len(shape) != len(t.dims):
                problems.append(f"{kind} {t.name!r}: graph rank {len(shape)} {shape}, spec {t.dims}")
                fatal |= kind == "input"
                continue
            for axis, (have, dim) in enumerate(zip(shape, t.dims)):
                if isinstance(dim, str):  # batch, seq, past, or past + 1
                    # A fixed graph dim where the spec wants a dynamic one cannot take the profile.
                    if kind == "input" and have != -1:
                        problems.append(f"input {t.name!r}: axis {axis} is fixed at {have} in the graph, "
                                        f"spec says {dim!r}")
                        fatal = True
                elif have not in (-1, int(dim)):
                    problems.append(f"{kind} {t.name!r}: axis {axis} is {have} in the graph, spec says {dim}")
                    fatal |= kind == "input"
    return problems, fatal


@dataclass(frozen=True)
class BuildSettings:
    """Builder-config choices of one build (the profile comes separately, from the spec)."""

    workspace_mb: int = 1024
    fp16_flag: bool = False
    strongly_typed: bool = True
    compute_capabilities: Sequence[str] | None = None   # TensorRT-RTX targets, e.g. ["SM86"]
    timing_cache: bytes | None = None                   # None: no timing cache; b"": start a new one
    tf32: bool = False                                  # False clears TensorRT's default-on TF32 flag


@dataclass
class BuildOutcome:
    """What TensorRT made of one graph; ``stopped`` says why no engine came (None when built)."""

    serialized: Any = None
    unsupported_nodes: list[dict[str, Any]] = field(default_factory=list)  # node, op_type, reason, index
    errors: list[str] = field(default_factory=list)
    io_problems: list[str] = field(default_factory=list)
    build_seconds: float = 0.0
    timing_cache: bytes | None = None
    notes: list[str] = field(default_factory=list)  # what the build decided on its own (a rejected cache)

    @property
    def built(self) -> bool:
        return self.serialized is not None and int(self.serialized.nbytes) > 0

    def problems(self) -> list[str]:
        nodes = [f"{n['node']} ({n['op_type']}): {n['reason']}" for n in self.unsupported_nodes]
        return nodes + self.errors + self.io_problems


def _parser_errors(parser, outcome: BuildOutcome) -> None:
    """Every parser error: node-level ones become unsupported_nodes, the rest errors."""
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        code = getattr(error.code(), "name", str(error.code()))
        where = error.func()
        reason = f"{error.desc()} [{code}" + (f" in {where}]" if where else "]")
        index = error.node()
        if index >= 0 or error.node_name():
            entry = {"node": error.node_name() or f"#{index}", "op_type": error.node_operator(),
                     "reason": reason, "index": index}
            stack = list(error.local_function_stack() or [])
            if stack:
                entry["function_stack"] = stack
            outcome.unsupported_nodes.append(entry)
        else:
            outcome.errors.append(f"parse: {reason}")


class _Said:
    """What the logger said since the last step began (nothing for a logger that keeps nothing:
    the CPU gate's, which files its messages by phase itself)."""

    def __init__(self, logger) -> None:
        self.recent: RecentErrors | None = getattr(logger, "recent", None)
        self.mark = 0
        self.step()

    def step(self) -> None:
        if self.recent is not None:
            self.mark = self.recent.mark()

    def __call__(self, failure: str) -> str:
        """``failure``, then what TensorRT said about it."""
        return failure if self.recent is None else f"{failure}: {self.recent.reason_since(self.mark)}"

    def aside(self) -> str:
        """" (TensorRT said: ...)" for a note, or "" when it said nothing."""
        return f" ({self.recent.reason_since(self.mark)})" if self.recent and self.recent.since(self.mark) else ""


def parse_and_build(trt, logger, onnx_path: str | os.PathLike, spec: GraphSpec, profile: Profile,
                    settings: BuildSettings = BuildSettings(), after_parse: Callable[[], None] | None = None
                    ) -> BuildOutcome:
    """Parse ``onnx_path``, check it against ``spec``, set one optimisation profile and build.

    Failures are recorded in the outcome, never raised: the CPU gate reports every one,
    ``build_engine`` turns them into an EngineError. A call TensorRT failed (None, False, -1)
    is recorded with what the logger was told meanwhile, when the logger keeps it
    (``stderr_logger``). ``after_parse`` runs between parsing and building (the gate files the
    logger's messages by phase).
    """
    outcome = BuildOutcome()
    said = _Said(logger)
    builder = trt.Builder(logger)
    if builder is None:
        outcome.errors.append(said("could not create a TensorRT builder"))
        return outcome
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if settings.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger) if network is not None else None
    if parser is None:
        outcome.errors.append(said("could not create a TensorRT network and ONNX parser"))
        return outcome
    said.step()
    parsed = parser.parse_from_file(os.fspath(onnx_path))
    if after_parse is not None:
        after_parse()
    _parser_errors(parser, outcome)
    if not parsed:
        if outcome.unsupported_nodes and not outcome.errors:  # each with the parser's reason; its log repeats them
            outcome.errors.append(f"parse failed: {len(outcome.unsupported_nodes)} node(s) TensorRT cannot take")
        elif not outcome.errors:
            outcome.errors.append(said("parse failed"))
        return outcome
    outcome.io_problems, fatal = check_network_io(network, spec)
    if fatal:
        outcome.errors.append("build skipped: no optimisation profile fits this graph")
        return outcome
    said.step()
    config = builder.create_builder_config()
    if config is None:
        outcome.errors.append(said("could not create a TensorRT builder config"))
        return outcome
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_mb) << 20)
    if settings.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if hasattr(trt.BuilderFlag, "TF32"):  # on by default: fp32 layers would run as TF32 on Ampere and later
        (config.set_flag if settings.tf32 else config.clear_flag)(trt.BuilderFlag.TF32)
    if settings.compute_capabilities:
        try:
            targets = [getattr(trt.ComputeCapability, str(c).upper()) for c in settings.compute_capabilities]
        except AttributeError as exc:
            names = [n for n in trt.ComputeCapability.__members__ if n.startswith("SM")]
            outcome.errors.append(f"unknown compute capability ({exc}); known: {names}")
            return outcome
        config.num_compute_capabilities = len(targets)
        for i, target in enumerate(targets):
            said.step()
            if config.set_compute_capability(target, i) is False:
                outcome.errors.append(said(f"compute capability {settings.compute_capabilities[i]} refused"))
                return outcome
    if settings.timing_cache is not None:
        # A cache from another GPU or TensorRT version is rejected (False): build with a new one.
        said.step()
        if not config.set_timing_cache(config.create_timing_cache(settings.timing_cache), ignore_mismatch=False):
            outcome.notes.append(f"the timing cache was made for another GPU or TensorRT version{said.aside()}: "
                                 "starting a new one")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    said.step()
    optimisation = builder.create_optimization_profile()
    if optimisation is None:
        outcome.errors.append(said("could not create an optimisation profile"))
        return outcome
    try:
        for name, (low, opt, high) in profile.items():
            optimisation.set_shape(name, low, opt, high)
    except (ValueError, TypeError) as exc:
        outcome.errors.append(f"optimisation profile rejected: {exc}")
        return outcome
    if config.add_optimization_profile(optimisation) < 0:
        outcome.errors.append(said("optimisation profile rejected by the builder config"))
        return outcome
    said.step()
    started = time.perf_counter()
    outcome.serialized = builder.build_serialized_network(network, config)
    outcome.build_seconds = time.perf_counter() - started
    if outcome.serialized is None:
        outcome.errors.append(said("build_serialized_network returned no engine"))
    elif not outcome.built:
        outcome.errors.append(said("build_serialized_network returned an empty engine"))
    if settings.timing_cache is not None and outcome.built:
        cache = config.get_timing_cache()  # None when the cache did not fit this GPU/version
        outcome.timing_cache = bytes(cache.serialize()) if cache is not None else None
    return outcome


def import_cudart(required: bool = True):
    """cuda-python's runtime API (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6).

    None when absent and not ``required``; else an EngineError with the pin to install:
    cuda-python 13 links the CUDA 13 runtime and fails on CUDA 12 drivers (JetPack 6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            if not required:
                return None
            raise EngineError('the tensorrt backend needs cuda-python: pip install "cuda-python>=12.6,<13" for '
                              'CUDA 12 drivers (JetPack 6), "cuda-python>=13,<14" for CUDA 13') from None
    return cudart


def cuda_error_name(cudart, error) -> str:
    """The CUDA error's name (``cudaErrorInsufficientDriver``), as cuda-python reports it."""
    name = getattr(error, "name", None)
    if isinstance(name, str):
        return name
    try:
        status, text = cudart.cudaGetErrorName(error)
        return text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # noqa: BLE001 - an unknown code is still reported, by number
        return f"CUDA error {int(error)}"


def current_device(builder: str) -> DeviceInfo:
    """The GPU engines are built for (through cuda-python); an AOT marker for TensorRT-RTX without one."""
    cudart = import_cudart(required=builder != "tensorrt_rtx")
    problem = "cuda-python is not installed"
    if cudart is not None:
        error, count = cudart.cudaGetDeviceCount()
        if int(error) == 0 and count > 0:
            error, props = cudart.cudaGetDeviceProperties(0)
            if int(error) == 0:
                name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
                return DeviceInfo(name.strip("\x00 "), f"{props.major}.{props.minor}")
            problem = f"cudaGetDeviceProperties: {cuda_error_name(cudart, error)}"
        else:
            problem = (f"cudaGetDeviceCount: {cuda_error_name(cudart, error)}" if int(error) != 0
                       else "cudaGetDeviceCount: 0 devices")
    if builder == "tensorrt_rtx":
        return DeviceInfo("none", "aot")
    hint = (" (cuda-python 13 needs a CUDA 13 driver, 580 or newer: on CUDA 12 drivers such as JetPack 6 "
            'install "cuda-python>=12.6,<13")' if "InsufficientDriver" in problem else "")
    raise EngineError(f"no CUDA GPU is visible ({problem}){hint}: TensorRT engines are built on the GPU that "
                      "runs them")


def engine_fields(bundle: Bundle, graph: str, trt_name: str, trt_version: str, device: DeviceInfo,
                  options: BuildOptions) -> dict[str, Any]:
    """Everything an engine's validity depends on (its key is their hash)."""
    spec = bundle.graph_spec(graph)
    profile = profile_shapes(spec, bundle.segment_size, options.max_batch, options.opt_batch, bundle.cache_prefix)
    return {
        "builder": trt_name, "trt_version": trt_version, "gpu": device.name,
        "compute_capability": device.compute_capability, "precision": bundle.precision,
        "fp16_flag": options.fp16_flag, "tf32": options.tf32, "graph": graph,
        "max_batch": options.max_batch, "opt_batch": options.opt_batch,
        "graph_sha256": bundle.graph_sha256(graph),
        # External weights (<graph>.onnx.data) change an engine as much as the graph does.
        "data_sha256": bundle.graph_data_sha256(graph),
        "profile": {name: [list(s) for s in shapes] for name, shapes in profile.items()},
    }


def engine_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


# Plans and timing caches are large but bounded: a plan of a 1B-parameter fp32 model is ~4 GB.
PLAN_LIMIT = 1 << 36
TIMING_CACHE_LIMIT = 1 << 30


def engine_directory(bundle: Bundle, create: bool = False) -> Path:
    """<bundle>/engines: a real directory inside the bundle, never a symlink (rmt-build must not
    write, and no runner read, anywhere else). Made when ``create``."""
    directory = bundle.path / ENGINE_DIR
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise EngineError(f"{directory} is {'a symlink' if directory.is_symlink() else 'not a directory'}; "
                          "engines live in a real directory inside the bundle: remove it and rebuild with rmt-build")
    if directory.exists() and directory.resolve() != bundle.path.resolve() / ENGINE_DIR:
        raise EngineError(f"{directory} resolves outside the bundle ({directory.resolve()})")
    if create:
        directory.mkdir(exist_ok=True)
    return directory


def engine_path(bundle: Bundle, fields: dict[str, Any]) -> Path:
    return engine_directory(bundle) / f"{fields['graph']}-{engine_key(fields)}.plan"


def timing_cache_path(bundle: Bundle, builder: str, trt_version: str, device: DeviceInfo) -> Path:
    """One timing cache per builder version and GPU: another's is rejected by the builder."""
    gpu = re.sub(r"[^A-Za-z0-9.]+", "_", device.name).strip("_") or "gpu"
    version = re.sub(r"[^A-Za-z0-9.]+", "_", trt_version)
    return engine_directory(bundle) / f"timing-{builder}-{version}-{gpu}-sm{device.compute_capability}.cache"


def read_engine_metadata(meta: Path) -> EngineMetadataDoc:
    """An engine's metadata, checked by its schema, for the plan beside it: its name must be
    the key of its own fields, and the plan a regular file of the size the metadata records
    (its hash is checked when it is read: ``read_plan``). DocumentError says why not."""
    if meta.is_symlink():
        raise DocumentError(f"{meta}: a symlink; engine metadata is a regular file rmt-build wrote")
    doc = check_engine_metadata(parse_json(read_document(meta, ENGINE_METADATA_LIMIT, "engine metadata"), str(meta),
                                           "engine metadata"), str(meta))
    if meta.stem != f"{doc.graph}-{engine_key(doc.fields())}":
        raise DocumentError(f"{meta}: its fields do not hash to its name (edited, or written by something else)")
    plan = meta.with_suffix(".plan")
    if plan.is_symlink() or not plan.is_file() or plan.stat().st_size != doc.plan_bytes:
        raise DocumentError(f"{plan}: missing, not a regular file, or not the {doc.plan_bytes} bytes its metadata "
                            "records")
    return doc


def read_plan(path: Path) -> bytes:
    """A plan's bytes, checked against the sha256 its metadata records (EngineError if not)."""
    try:
        doc = read_engine_metadata(path.with_suffix(".json"))
        data = read_document(path, PLAN_LIMIT, "TensorRT engine")
    except DocumentError as exc:
        raise EngineError(f"{exc}; rebuild it with rmt-build") from None
    if hashlib.sha256(data).hexdigest() != doc.plan_sha256:
        raise EngineError(f"{path}: differs from the sha256 its metadata records; rebuild it with rmt-build")
    return data


def _engine_metadata(bundle: Bundle, graph: str) -> list[tuple[Path, EngineMetadataDoc | None, str]]:
    """Every cached engine's metadata of ``graph``: (path, checked metadata or None, why not)."""
    found = []
    directory = engine_directory(bundle)
    if not directory.is_dir():
        return found
    pattern = re.compile(re.escape(graph) + r"-[0-9a-f]{16}\.json")
    for meta in sorted(p for p in directory.iterdir() if pattern.fullmatch(p.name)):
        try:
            found.append((meta, read_engine_metadata(meta), ""))
        except DocumentError as exc:
            found.append((meta, None, str(exc).removeprefix(f"{meta}: ")))
    return found


def stale_engines(bundle: Bundle, fields: dict[str, Any]) -> list[str]:
    """Cached engines of this graph built for something else, each with the first field that differs."""
    found = []
    for meta, theirs, why in _engine_metadata(bundle, fields["graph"]):
        if theirs is None:
            found.append(f"{meta.name}: unusable ({why})")
            continue
        known = theirs.fields()
        differs = [k for k in fields if known.get(k) != fields[k]]
        if differs:
            k = differs[0]
            found.append(f"{meta.stem}.plan was built for {k}={known.get(k)!r}, not {fields[k]!r}")
    return found


def _verified(path: Path, fields: dict[str, Any]) -> EngineMetadataDoc | None:
    """The metadata of the engine at ``path`` when it is checked, built for exactly ``fields``
    and its plan matches its hash; None otherwise."""
    try:
        doc = read_engine_metadata(path.with_suffix(".json"))
    except DocumentError:
        return None
    if doc.fields() != fields or sha256_file(path) != doc.plan_sha256:
        return None
    return doc


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
    if options.tf32 and bundle.precision != "fp32":
        raise EngineError(f"--tf32 applies to fp32 bundles; this one is {bundle.precision}")


def build_engine(bundle: Bundle, graph: str, options: BuildOptions = BuildOptions(),
                 progress: Callable[[str], None] | None = None) -> Path:
    """Build (or reuse) the engine of ``graph`` for this machine; return the .plan path."""
    trt = import_builder(options.builder)
    _check_precision(trt, bundle, options)
    device = current_device(options.builder)
    fields = engine_fields(bundle, graph, options.builder, str(trt.__version__), device, options)
    path = engine_path(bundle, fields)
    say = progress or (lambda message: None)
    if _verified(path, fields) is not None:
        return path
    if path.exists() or path.with_suffix(".json").exists():
        say(f"{path.name}: the cached engine cannot be verified (metadata or plan altered); rebuilding it")
    say(f"building the TensorRT engine of {graph} for {device.name} (sm {device.compute_capability}), "
        f"{bundle.precision}{' with TF32' if options.tf32 else ''}; this can take minutes (9.5 min reported "
        "on an Orin)")
    cache_file = timing_cache_path(bundle, options.builder, str(trt.__version__), device)
    keep_timing = options.builder == "tensorrt"  # timing caches are no-ops in TensorRT-RTX
    strongly_typed = bundle.precision == "fp16" or trt_major(trt) >= 11 or options.builder == "tensorrt_rtx"
    started = time.perf_counter()
    outcome = parse_and_build(
        trt, stderr_logger(trt), bundle.graph_path(graph), bundle.graph_spec(graph),
        {name: tuple(tuple(s) for s in shapes) for name, shapes in fields["profile"].items()},
        BuildSettings(workspace_mb=options.workspace_mb, fp16_flag=options.fp16_flag, strongly_typed=strongly_typed,
                      tf32=options.tf32,
                      timing_cache=_timing_cache(cache_file) if keep_timing else None))
    for note in outcome.notes:
        say(note)
    if not outcome.built:
        raise EngineError(f"TensorRT could not build the {graph} engine: " + "; ".join(outcome.problems()[:5]))
    serialized = bytes(outcome.serialized)
    engine_directory(bundle, create=True)
    _write_atomically(path, serialized)
    metadata = dict(fields, built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    workspace_mb=options.workspace_mb, plan_sha256=hashlib.sha256(serialized).hexdigest(),
                    plan_bytes=len(serialized))
    check_engine_metadata(metadata, str(path.with_suffix(".json")))  # what is written is what is read
    # The metadata goes last: an engine without it is not found (a build killed in between is redone).
    _write_atomically(path.with_suffix(".json"), json.dumps(metadata, indent=2, sort_keys=True).encode())
    if outcome.timing_cache:  # None when the builder gave no cache back: nothing to keep
        _write_atomically(cache_file, outcome.timing_cache)
    say(f"built {path.name} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f}s")
    return path


@dataclass(frozen=True)
class EngineSet:
    """The engines a TensorRT runner loads: one per segment graph, all built with ``options``."""

    paths: dict[str, Path]
    options: BuildOptions
    built_at: str = ""
    others: int = 0          # other complete sets valid for this machine (older builds)

    def describe(self) -> str:
        flags = self.options.flags()
        return (f"engines built {self.built_at or 'at an unknown time'} with rmt-build {flags or '(defaults)'}"
                + (f"; {self.others} older set(s) not used" if self.others else ""))


def _options_of(metadata: EngineMetadataDoc, builder: str) -> BuildOptions:
    return BuildOptions(builder=builder, max_batch=metadata.max_batch, opt_batch=metadata.opt_batch,
                        fp16_flag=metadata.fp16_flag, tf32=metadata.tf32)


def _timing_cache(path: Path) -> bytes:
    """The timing cache's bytes (empty when there is none, or when it is a link or not a regular
    file of a sane size: TensorRT then starts a new one)."""
    if path.is_symlink():
        return b""
    try:
        return read_document(path, TIMING_CACHE_LIMIT, "timing cache")
    except DocumentError:
        return b""


def find_engines(bundle: Bundle, builder: str = "tensorrt", options: BuildOptions | None = None) -> EngineSet:
    """The engines of every segment graph valid for this machine; never builds.

    With ``options``, exactly the engines those build options make. Without, the build
    options are read from the engines' metadata: every set whose fields equal what this
    machine, this bundle and those options give counts, and the most recently built is
    taken (``EngineSet.others`` says how many were passed over). No set is an EngineError
    naming rmt-build and, for each cached engine, why it does not fit.
    """
    trt = import_builder(builder)
    device = current_device(builder)
    version = str(trt.__version__)
    graphs = bundle.segment_graph_names
    if options is not None:
        candidates = [options]
    else:
        candidates = []
        for _, metadata, _ in _engine_metadata(bundle, graphs[0]):
            found = _options_of(metadata, builder) if metadata is not None else None
            if found is not None and found not in candidates:
                candidates.append(found)
    complete = []
    for candidate in candidates:
        paths, built = {}, []
        for graph in graphs:
            fields = engine_fields(bundle, graph, builder, version, device, candidate)
            path = engine_path(bundle, fields)
            metadata = _verified(path, fields)
            if metadata is None:
                break
            paths[graph] = path
            built.append(metadata.built_at)
        else:
            complete.append(EngineSet(paths, candidate, max(built)))
    if complete:
        newest = max(complete, key=lambda s: s.built_at)
        return EngineSet(newest.paths, newest.options, newest.built_at, len(complete) - 1)
    wanted = options or BuildOptions(builder=builder)
    stale = [reason for graph in graphs
             for reason in stale_engines(bundle, engine_fields(bundle, graph, builder, version, device, wanted))]
    flags = (wanted.flags() + " ") if options is not None and wanted.flags() else (
        f"--builder {builder} " if builder != "tensorrt" else "")
    detail = ("; ".join(stale[:4]) + "; ") if stale else ""
    raise EngineError(f"no TensorRT engines for this machine ({device.name}, sm {device.compute_capability}, "
                      f"{builder} {version}) in {engine_directory(bundle)}: {detail}build them first with "
                      f"rmt-build --bundle {bundle.path} {flags}".rstrip())


def _write_atomically(path: Path, data: bytes) -> None:
    write_atomically(path, lambda handle: handle.write(data))


def build_bundle_engines(bundle_dir: str | os.PathLike, options: BuildOptions,
                         progress: Callable[[str], None] | None = None) -> dict[str, str]:
    """Engines for the bundle's segment graphs (what the native TensorRT backend runs;
    generation runs on ONNX Runtime), built or reused from <bundle>/engines."""
    bundle = Bundle.load(bundle_dir)
    return {graph: str(build_engine(bundle, graph, options, progress)) for graph in bundle.segment_graph_names}


__all__ = ["BuildOptions", "BuildOutcome", "BuildSettings", "DeviceInfo", "EngineError", "EngineSet", "RecentErrors",
           "build_bundle_engines", "build_engine", "check_network_io", "checked", "cuda_error_name", "current_device",
           "engine_directory", "engine_fields", "engine_key", "find_engines", "read_engine_metadata", "read_plan",
           "import_cudart", "parse_and_build", "profile_shapes",
           "stale_engines", "stderr_logger", "timing_cache_path"]
