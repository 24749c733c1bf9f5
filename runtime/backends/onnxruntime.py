"""ONNX Runtime backend: CPU, CUDA or TensorRT execution provider, memory kept in OrtValues.

Memory never leaves the provider's device between segments: each state holds two
OrtValues (ping-pong) bound with IOBinding; only requested host outputs are copied out.
The provider asked for must be the one the session really uses: onnxruntime-gpu falls
back to CPU silently when CUDA is missing, which is an error here.

The TensorRT provider always gets an engine cache and a timing cache (by default in
``<bundle>/engines/onnxruntime-trt/``, one engine folder per graph file's sha256) and one
explicit optimisation profile per graph (batch 1..max_batch, seq 1..segment_size, tuned for
one full segment), so engines are built once, not per session or per new input shape. It never
gets ``trt_fp16_enable``: the precision is the graph's own (an fp16 bundle is an fp16 graph).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import ENGINE_DIR, Bundle
from ..engines import engine_directory, profile_shapes
from ..errors import BackendError, library_message
from ..spec import DECODE
from .base import Runner, RunResult, check_declared_io

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
# Where each provider keeps tensors: OrtValue device names.
_DEVICE = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "cuda"}
#: The TensorRT provider's caches inside the bundle (beside the native backend's engines).
TENSORRT_CACHE_DIR = f"{ENGINE_DIR}/onnxruntime-trt"
#: Largest batch of the TensorRT provider's optimisation profile unless the runner is given
#: another (the native backend's default too); a larger batch is refused before running.
TENSORRT_MAX_BATCH = 8


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
                 engine_cache: str | os.PathLike | None = None, max_batch: int | None = None) -> None:
        """engine_cache: where the TensorRT provider keeps its engines and timing cache (default
        ``<bundle>/engines/onnxruntime-trt``; give another for a read-only bundle).
        max_batch: the largest batch taken (default: TENSORRT_MAX_BATCH for the TensorRT
        provider, whose engines are built for batch 1..max_batch; any for the others)."""
        super().__init__(bundle)
        if provider not in PROVIDERS:
            raise BackendError(f"unknown provider {provider!r}: expected one of {sorted(PROVIDERS)}")
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int)
                                      or max_batch < 1):
            raise BackendError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.provider = provider
        self.threads = threads
        self.engine_cache = engine_cache
        self.max_batch = TENSORRT_MAX_BATCH if max_batch is None and provider == "tensorrt" else max_batch
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

    @property
    def tensorrt_cache(self) -> Path:
        """The TensorRT provider's cache root: ``engine_cache`` or ``<bundle>/engines/onnxruntime-trt``
        (the bundle's engines/ must be a real folder inside it: ``engine_directory``)."""
        if self.engine_cache is not None:
            return Path(self.engine_cache)
        engine_directory(self.bundle)
        cache = self.bundle.path / TENSORRT_CACHE_DIR
        if cache.is_symlink():
            raise BackendError(f"{cache} is a symlink; the TensorRT provider's cache lives in a real folder inside "
                               "the bundle (remove it, or pass engine_cache=DIR)")
        return cache

    def _writable_directory(self, directory: Path) -> str:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if not os.access(directory, os.W_OK | os.X_OK):
                raise PermissionError("not writable")
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise BackendError(
                f"the TensorRT provider keeps its engines and timing cache in {directory}, which cannot be "
                f"created or written ({reason}; a read-only bundle?): pass another directory, "
                "OnnxRuntimeRunner(bundle, 'tensorrt', engine_cache=DIR)") from None
        return str(directory.resolve())

    def tensorrt_profile(self, graph: str) -> dict[str, tuple[tuple[int, ...], ...]]:
        """(min, opt, max) of every input of ``graph``: batch 1/1/max_batch, seq 1/segment/segment;
        the decode cache ``past`` 1..P + segment - 1 (rollover; P = ``Bundle.cache_prefix``), or up to the backbone's last
        position when the bundle records it (generation without rollover grows the cache there)."""
        spec = self.bundle.graph_spec(graph)
        segment, prefix = self.bundle.segment_size, self.bundle.cache_prefix
        profile = profile_shapes(spec, segment, self.max_batch, 1, prefix)
        limit = self.bundle.max_positions
        if graph == DECODE and limit and limit - 1 > prefix + segment - 1:
            profile = {t.name: (low, opt, t.shape(self.max_batch, segment, limit - 1))
                       for t, (low, opt, _) in zip(spec.inputs, profile.values())}
        return profile

    def tensorrt_options(self, graph: str) -> dict[str, Any]:
        """The TensorRT provider's options for ``graph`` (creates the cache folders)."""
        root = self.tensorrt_cache
        engines = root / f"{graph}-{self._graph_sha256(graph)[:16]}"
        profile = self.tensorrt_profile(graph)

        def shapes(which: int) -> str:
            return ",".join(f"{name}:{'x'.join(str(d) for d in ranges[which])}" for name, ranges in profile.items())

        timing = self._writable_directory(root)
        return {
            # ONNX Runtime names an engine by the graph file's name and its node names, not its
            # weights: one folder per graph file's content keeps bundles sharing a cache apart.
            "trt_engine_cache_enable": True, "trt_engine_cache_path": self._writable_directory(engines),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": timing,
            "trt_profile_min_shapes": shapes(0), "trt_profile_opt_shapes": shapes(1),
            "trt_profile_max_shapes": shapes(2),
        }

    def _graph_sha256(self, graph: str) -> str:
        return self.bundle.graph_sha256(graph)

    def _provider_list(self, graph: str) -> list:
        if self.provider == "tensorrt":
            # Nodes TensorRT cannot take run on CUDA, never on the CPU.
            return [(PROVIDERS["tensorrt"], self.tensorrt_options(graph)), PROVIDERS["cuda"]]
        return [PROVIDERS[self.provider]]

    def _open_session(self, graph: str):
        ort = self._ort
        options = ort.SessionOptions()
        options.log_severity_level = 4  # errors come back as exceptions (BackendError); no second copy on stderr
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        providers = self._provider_list(graph)
        try:
            session = ort.InferenceSession(str(self.bundle.graph_path(graph)), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise BackendError(f"{self.bundle.graph_path(graph)}: onnxruntime cannot load the "
                               f"{graph} graph: {library_message(exc)}") from None
        check_declared_io(self.bundle, graph, {t.name: t.shape for t in [*session.get_inputs(),
                                                                          *session.get_outputs()]})
        actual = session.get_providers()
        if actual[0] != PROVIDERS[self.provider]:
            raise BackendError(f"asked for {PROVIDERS[self.provider]}, but the {graph} session runs on "
                               f"{actual} (a missing CUDA/TensorRT library makes onnxruntime fall back "
                               "silently); refusing to run on another provider")
        return session

    supports_generation = True

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
        # On the CPU an OrtValue made from an array is a view of it: give it a copy of its own, or
        # the caller's array would be the state (and the ping-pong would write into it).
        return self._ort.OrtValue.ortvalue_from_numpy(np.array(array, order="C", copy=True), self.device, 0)

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
        try:  # binding checks names and types against the graph: its refusals are errors of this run too
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
            session.run_with_iobinding(binding)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            raise BackendError(f"onnxruntime could not run the {graph} graph of {self.bundle.path}: "
                               f"{library_message(exc)}") from None
        values = dict(zip(spec.output_names, binding.get_outputs()))
        host = {name: np.array(values.pop(name).numpy(), copy=True) for name in want}
        return RunResult(host=host, device=values)
