"""CPU-side TensorRT gate: does an exported step graph parse and build with TensorRT?

Uses TensorRT-RTX (PyPI ``tensorrt-rtx-cu12``, import name ``tensorrt_rtx``), whose
builder works without a GPU ("CPU-only AOT"): it parses the ONNX file, builds one
optimisation profile from the graph's spec and serialises an engine. The engine is never
deserialised (that needs a GPU). RTX engines target RTX GPUs (Ampere and later; Turing
only on request), not Jetson, so this is a CI gate for "TensorRT can take this graph", not
the deployment build: deployment engines are built on the target.

RTX networks are always strongly typed: precision comes from the ONNX graph itself (an
fp16 export is an fp16 graph), there are no FP16/INT8 builder flags.

Torch-free. ``tensorrt_rtx`` is imported lazily; without it :func:`check_graph` raises a
:class:`RuntimeError` that names the package to install.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

from rmt_runtime.engines import BuildSettings, parse_and_build, profile_shapes
from rmt_runtime.spec import GraphSpec

PACKAGE = "tensorrt-rtx-cu12"
_MODULE = "tensorrt_rtx"

# TensorRT ignores a new builder's logger while another builder is alive (it warns and
# keeps the first), so one collecting logger serves every call; the lock keeps concurrent
# calls' messages (and the stderr capture) apart.
_LOCK = threading.Lock()


@dataclass
class TrtGateResult:
    """What TensorRT made of one graph."""

    graph: str
    onnx_file: str
    precision: str  # "fp16" or "fp32" as read from the graph ("bf16"; "unknown" if unreadable)
    built: bool = False
    engine_bytes: int = 0
    unsupported_nodes: list[dict[str, Any]] = field(default_factory=list)  # node, op_type, reason
    errors: list[str] = field(default_factory=list)
    build_seconds: float = 0.0
    trt_version: str = ""
    warnings: list[str] = field(default_factory=list)
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=dict)  # input -> (min, opt, max)

    @property
    def ok(self) -> bool:
        """Built, with no unsupported node and no error (spec mismatches included)."""
        return self.built and not self.unsupported_nodes and not self.errors

    def summary(self) -> str:
        if self.ok:
            return (f"{self.graph}: TensorRT {self.trt_version} built {self.precision} engine "
                    f"({self.engine_bytes} bytes, {self.build_seconds:.1f} s)")
        lines = [f"{self.graph}: TensorRT {self.trt_version} gate FAILED ({self.onnx_file})"]
        lines += [f"  unsupported node {n['node']} ({n['op_type']}): {n['reason']}"
                  for n in self.unsupported_nodes]
        lines += [f"  {e}" for e in self.errors]
        return "\n".join(lines)


def _import_trt():
    try:
        import tensorrt_rtx as trt  # noqa: PLC0415 (lazy on purpose)
    except (ImportError, OSError):
        return None
    return trt


def trt_available() -> str | None:
    """The TensorRT-RTX version if ``tensorrt_rtx`` imports, else None."""
    trt = _import_trt()
    return None if trt is None else str(trt.__version__)


def _require_trt():
    trt = _import_trt()
    if trt is None:
        raise RuntimeError(f"the TensorRT gate needs TensorRT-RTX (module {_MODULE!r}): "
                           f"pip install {PACKAGE}")
    return trt


@functools.lru_cache(maxsize=1)
def _logger():
    """The process's one collecting logger (built lazily: it subclasses trt.ILogger)."""
    trt = _require_trt()
    severity = trt.ILogger.Severity

    class CollectingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.sink: list[tuple[Any, str]] | None = None

        def log(self, sev, msg):  # called by TensorRT for every message, verbose included
            if self.sink is not None and sev <= severity.WARNING:
                self.sink.append((sev, msg))

    return CollectingLogger()


def graph_precision(onnx_path: str) -> str:
    """``fp16`` if any initializer, constant, cast or typed tensor of the graph is float16,
    else ``fp32`` (``bf16`` likewise); ``unknown`` if the file cannot be read as ONNX."""
    try:
        import onnx  # noqa: PLC0415
        from onnx import TensorProto  # noqa: PLC0415
        model = onnx.load(onnx_path, load_external_data=False)
    except Exception:  # noqa: BLE001 (an unreadable graph is reported, not raised)
        return "unknown"
    graph = model.graph
    types = {t.data_type for t in graph.initializer}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        types.add(info.type.tensor_type.elem_type)
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to":
                types.add(attr.i)
            elif attr.type == onnx.AttributeProto.TENSOR:
                types.add(attr.t.data_type)
    if TensorProto.FLOAT16 in types:
        return "fp16"
    if TensorProto.BFLOAT16 in types:
        return "bf16"
    return "fp32"


@contextlib.contextmanager
def _captured_stderr(lines: list[str]):
    """Catch what native code writes straight to file descriptor 2 (Myelin prints its
    internal errors there, around the logger) into ``lines``, keeping the build quiet."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr: nothing to catch
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
            lines += [line for line in text.splitlines() if line.strip()]


def check_graph(onnx_path: str | os.PathLike, graph_spec: GraphSpec, segment_size: int,
                max_batch: int = 8, workspace_mb: int = 1024, *, opt_batch: int = 1,
                compute_capabilities: Sequence[str] | None = None, cache_prefix: int = 0) -> TrtGateResult:
    """Parse ``onnx_path`` with TensorRT-RTX and build a serialized engine on the CPU.

    One optimisation profile covers the spec: ``batch`` 1..max_batch (tuned for
    ``opt_batch``, 1 by default: one stream per step is the edge case), ``seq``
    1..segment_size (tuned for full segments), ints fixed. ``compute_capabilities``
    (e.g. ``["SM86"]``; ``"SM75"`` for Turing) overrides RTX's default targets (Ampere and
    later). Failures (unsupported nodes, unreadable files, spec mismatches, failed builds)
    are reported in the result, never raised; only a missing ``tensorrt_rtx`` raises.
    """
    trt = _require_trt()
    if segment_size < 1 or max_batch < 1 or not 1 <= opt_batch <= max_batch:
        raise ValueError(f"need segment_size >= 1 and 1 <= opt_batch <= max_batch, got "
                         f"segment_size={segment_size}, opt_batch={opt_batch}, "
                         f"max_batch={max_batch}")
    path = os.fspath(onnx_path)
    result = TrtGateResult(graph=graph_spec.name, onnx_file=path,
                           precision=graph_precision(path), trt_version=str(trt.__version__))
    if not os.path.isfile(path):
        result.errors.append(f"ONNX file not found: {path}")
        return result
    logger = _logger()
    phases: dict[str, list[tuple[Any, str]]] = {"parse": [], "build": []}
    stderr: list[str] = []
    result.profile = profile_shapes(graph_spec, segment_size, max_batch, opt_batch, cache_prefix)
    settings = BuildSettings(workspace_mb=workspace_mb, compute_capabilities=compute_capabilities)
    with _LOCK:
        logger.sink = phases["parse"]
        try:
            with _captured_stderr(stderr):
                outcome = parse_and_build(trt, logger, path, graph_spec, result.profile, settings,
                                          after_parse=lambda: setattr(logger, "sink", phases["build"]))
        finally:
            logger.sink = None
    result.built, result.build_seconds = outcome.built, outcome.build_seconds
    result.engine_bytes = int(outcome.serialized.nbytes) if outcome.built else 0
    result.unsupported_nodes = outcome.unsupported_nodes
    logged_build_error = any(sev <= trt.ILogger.Severity.ERROR for sev, _ in phases["build"])
    # "returned no engine" only when TensorRT logged nothing that says why.
    result.errors = [e for e in outcome.errors if not (logged_build_error and "returned no engine" in e)]
    result.errors += outcome.io_problems
    # The parser's logged errors repeat its structured ones (kept above) line by line.
    parse_errors_known = bool(result.errors or result.unsupported_nodes)
    for phase, messages in phases.items():
        for sev, msg in messages:
            if sev > trt.ILogger.Severity.ERROR:
                result.warnings.append(msg)
            elif phase == "build" or not parse_errors_known:
                result.errors.append(f"TensorRT {phase}: {msg}")
    # Usually a repeat of a logged error; the only word on a failure when nothing was logged.
    failed_silently = not result.built and not result.errors and not result.unsupported_nodes
    (result.errors if failed_silently else result.warnings).extend(
        f"stderr: {line}" for line in stderr)
    if not result.built and not result.errors and not result.unsupported_nodes:
        result.errors.append("no engine was built")
    return result


def check_bundle(bundle_dir: str | os.PathLike, max_batch: int = 8, workspace_mb: int = 1024,
                 compute_capabilities: Sequence[str] | None = None) -> list[TrtGateResult]:
    """Run :func:`check_graph` on every graph of a bundle (hashes verified first)."""
    from rmt_runtime.bundle import Bundle  # noqa: PLC0415

    from rmt_runtime.engines import INT8_FOR_TENSORRT, EngineError  # noqa: PLC0415

    bundle = Bundle.load(bundle_dir)
    if bundle.precision == "int8":
        raise EngineError(f"{bundle.path}: {INT8_FOR_TENSORRT}")
    return [check_graph(bundle.graph_path(name), bundle.graph_spec(name), bundle.segment_size,
                        max_batch=max_batch, workspace_mb=workspace_mb,
                        compute_capabilities=compute_capabilities, cache_prefix=bundle.cache_prefix)
            for name in bundle.graph_names]
