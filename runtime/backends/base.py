"""The runner interface every backend implements (loader/runner split, as Polygraphy's).

A runner is built from a verified bundle; ``activate`` loads lazily (sessions, engines);
``run_graph`` runs one segment of one graph. Memory lives in backend handles (OrtValues,
device buffers, tensors) between segments; only ``memory_to_host`` copies it out. Input
checks against the step spec happen here, before any backend call.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import BackendError, RuntimeInputError
from ..spec import GraphSpec


class Runner(ABC):
    """One backend running a bundle's graphs. Thread-safe: per-sequence data lives elsewhere."""

    #: True when memory handles are host arrays, so checking them costs no transfer.
    memory_on_host: bool = True
    #: Largest batch the backend takes (None: any).
    max_batch: int | None = None

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        # The segment loop's graphs; generation graphs are opened on demand (``generation_session``).
        self.specs: dict[str, GraphSpec] = {name: bundle.graph_spec(name) for name in bundle.segment_graph_names}
        self._lock = threading.Lock()
        self._active = False

    # ---- lifecycle -----------------------------------------------------------------------
    def activate(self) -> "Runner":
        """Load what the backend needs (idempotent, safe from several threads)."""
        with self._lock:
            if not self._active:
                self._activate()
                self._active = True
        return self

    def deactivate(self) -> None:
        with self._lock:
            if self._active:
                self._deactivate()
                self._active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    @property
    @abstractmethod
    def name(self) -> str:
        """What actually runs, e.g. ``onnxruntime/CPUExecutionProvider``."""

    @abstractmethod
    def _activate(self) -> None: ...

    def _deactivate(self) -> None:
        pass

    # ---- memory handles --------------------------------------------------------------------
    @abstractmethod
    def memory_from_host(self, memory: np.ndarray) -> Any:
        """A backend handle holding a float32 [B, M, D] copy of ``memory``."""

    @abstractmethod
    def memory_to_host(self, handle: Any) -> np.ndarray:
        """The float32 [B, M, D] contents of a handle, on the host."""

    @abstractmethod
    def empty_memory(self, batch: int) -> Any:
        """An uninitialised handle for a [batch, M, D] output (the other half of a ping-pong)."""

    # ---- running -----------------------------------------------------------------------------
    def run_graph(self, graph: str, input_ids: np.ndarray, attention_mask: np.ndarray,
                  memory: Any, new_memory: Any, want: tuple[str, ...] = (),
                  checked: bool = False) -> dict[str, np.ndarray]:
        """Run one segment: memory -> new_memory (two different handles), and return the
        outputs named in ``want`` on the host. ``checked``: the caller already ran
        ``check_inputs`` on these arrays (the runtime checks a whole input before any work)."""
        spec = self.specs[graph]
        if not checked:
            self.check_inputs(spec, input_ids, attention_mask)
        unknown = [name for name in want if name not in spec.output_names or name == "new_memory"]
        if unknown:
            raise RuntimeInputError(f"graph {graph!r} has no host output {unknown}; it has {spec.output_names}")
        if memory is new_memory:
            raise RuntimeInputError("memory and new_memory must be different buffers (ping-pong)")
        self.activate()
        return self._run(graph, input_ids, attention_mask, memory, new_memory, want)

    @abstractmethod
    def _run(self, graph: str, input_ids: np.ndarray, attention_mask: np.ndarray, memory: Any,
             new_memory: Any, want: tuple[str, ...]) -> dict[str, np.ndarray]: ...

    # ---- generation graphs ---------------------------------------------------------------------
    #: True when ``run_cached`` runs the prefill and decode graphs.
    supports_generation: bool = False

    def run_cached(self, graph: str, host_inputs: dict[str, np.ndarray], handle_inputs: dict[str, Any],
                   host_outputs: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Run a generation graph: host arrays and backend handles (memory, caches) in; the
        outputs named in ``host_outputs`` as host arrays, every other output as a handle that
        stays on the device (the next call's ``handle_inputs``)."""
        raise BackendError(f"{self.name} does not run the generation graphs; generate with the "
                           "onnxruntime backend")

    def check_inputs(self, spec: GraphSpec, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        """Dtypes, shapes, id range and mask values against the spec and the bundle's limits."""
        segment, vocab = self.bundle.segment_size, self.bundle.vocab_size
        for name, array in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if not isinstance(array, np.ndarray) or array.dtype != np.int64:
                got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
                raise RuntimeInputError(f"{name} must be an int64 numpy array, got {got}")
            if array.ndim != 2:
                raise RuntimeInputError(f"{name} must be [batch, seq], got shape {array.shape}")
        batch, length = input_ids.shape
        if attention_mask.shape != input_ids.shape:
            raise RuntimeInputError(f"attention_mask shape {attention_mask.shape} must equal input_ids shape "
                                    f"{input_ids.shape}")
        if not 1 <= length <= segment:
            raise RuntimeInputError(f"segment length {length} is outside 1..{segment} (the bundle's segment_size)")
        if batch < 1 or (self.max_batch is not None and batch > self.max_batch):
            raise RuntimeInputError(f"batch {batch} is outside 1..{self.max_batch} for {self.name}")
        bad = (input_ids < 0) | (input_ids >= vocab)
        if bad.any():
            row, col = (int(i[0]) for i in np.nonzero(bad))
            raise RuntimeInputError(f"token id {int(input_ids[row, col])} at row {row}, position {col} is outside "
                                    f"the vocabulary 0..{vocab - 1}")
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise RuntimeInputError("attention_mask must hold only 0 and 1")
