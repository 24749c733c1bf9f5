"""The runner interface every backend implements (loader/runner split, as Polygraphy's).

A runner is built from a verified bundle; ``activate`` loads lazily (sessions, engines).
It has ONE run call, driven by the graph's spec: host arrays and backend handles in by
input name; the outputs named in ``want`` back on the host, every other output as a
handle that stays where the backend computes. State pairs (``memory -> new_memory``,
``past.0.key -> present.0.key``, per-layer matrices) need no runner code of their own:
the caller passes each pair's input handle and, for ping-pong, the buffer its output is
written into (``into``). Input checks against the spec happen here, before any backend call.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..bundle import Bundle
from ..errors import BackendError, RuntimeInputError
from ..spec import BATCH, SEQ, GraphSpec, ShapeMismatch, bind_symbols


@dataclass
class RunResult:
    """One graph run: ``host`` outputs (numpy, the ones asked for) and ``device`` outputs
    (backend handles: every other output, the ``into`` buffers included)."""

    host: dict[str, np.ndarray]
    device: dict[str, Any]


class Runner(ABC):
    """One backend running a bundle's graphs. Thread-safe: per-sequence data lives elsewhere."""

    #: True when handles are host arrays, so reading them costs no transfer.
    state_on_host: bool = True
    #: True when the generation graphs (prefill, decode) run here.
    supports_generation: bool = False
    #: Largest batch the backend takes (None: any).
    max_batch: int | None = None

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        # The segment loop's graphs are opened at activation; generation graphs on first use.
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
    def notes(self) -> list[str]:
        """What the backend decided while running that changes what runs (e.g. CUDA graphs turned off)."""
        return []

    @property
    @abstractmethod
    def name(self) -> str:
        """What actually runs, e.g. ``onnxruntime/CPUExecutionProvider``."""

    @abstractmethod
    def _activate(self) -> None: ...

    def _deactivate(self) -> None:
        pass

    # ---- handles -----------------------------------------------------------------------------
    @abstractmethod
    def to_device(self, array: np.ndarray) -> Any:
        """A backend handle holding a copy of a host array (float32 state): never a view of it,
        since the array stays the caller's to overwrite (tests/runtime/test_caller_arrays.py)."""

    @abstractmethod
    def to_host(self, handle: Any) -> np.ndarray:
        """The contents of a handle, copied to the host."""

    @abstractmethod
    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        """An uninitialised handle (the other half of a state pair's ping-pong)."""

    @abstractmethod
    def shape_of(self, handle: Any) -> tuple[int, ...]:
        """The shape of a handle, without copying it."""

    # ---- running -----------------------------------------------------------------------------
    def spec(self, graph: str) -> GraphSpec:
        """The spec of a segment graph, or of a generation graph where this backend runs them."""
        if graph not in self.specs:
            if not self.supports_generation:
                raise BackendError(f"{self.name} does not run the {graph} graph; generate with the onnxruntime "
                                   "backend")
            self.specs[graph] = self.bundle.graph_spec(graph)
        return self.specs[graph]

    def run(self, graph: str, inputs: Mapping[str, Any], want: tuple[str, ...] = (),
            into: Mapping[str, Any] | None = None, checked: bool = False) -> RunResult:
        """Run one call of ``graph``.

        inputs: every input the spec names, as a numpy array (uploaded) or a backend handle
            (bound in place: state, caches).
        want: outputs to copy to the host; the others stay on the device (``RunResult.device``).
        into: output name -> handle to write that output into (a state pair's ping-pong
            buffer; it must not be one of the inputs).
        checked: the caller already ran ``check`` on these inputs (the runtime checks a
            whole input before any work).
        """
        spec = self.spec(graph)
        into = dict(into or {})
        if not checked:
            self.check(spec, inputs)
        outputs = spec.output_names
        unknown = [name for name in [*want, *into] if name not in outputs]
        if unknown:
            raise RuntimeInputError(f"graph {graph!r} has no output {unknown}; it has {outputs}")
        if set(want) & set(into):
            raise RuntimeInputError(f"outputs {sorted(set(want) & set(into))} are asked for both on the host and "
                                    "in a device buffer")
        handles = {id(value) for value in inputs.values() if not isinstance(value, np.ndarray)}
        shared = [name for name, value in into.items() if id(value) in handles]
        if shared:
            raise RuntimeInputError(f"outputs {shared} would be written into an input's buffer: state pairs need "
                                    "two buffers (ping-pong)")
        self.activate()
        return self._run(graph, spec, dict(inputs), want, into)

    @abstractmethod
    def _run(self, graph: str, spec: GraphSpec, inputs: dict[str, Any], want: tuple[str, ...],
             into: dict[str, Any]) -> RunResult: ...

    def check(self, spec: GraphSpec, inputs: Mapping[str, Any]) -> None:
        """Every input of the spec is there, with its dtype and a shape that fits the spec
        (one batch and one segment length across inputs, within the bundle's limits); token
        ids inside the vocabulary, masks of 0 and 1."""
        missing = [name for name in spec.input_names if name not in inputs]
        extra = [name for name in inputs if name not in spec.input_names]
        if missing or extra:
            raise RuntimeInputError(f"graph {spec.name!r} takes inputs {spec.input_names}; missing {missing}, "
                                    f"unknown {extra}")
        shapes = {}
        for tensor in spec.inputs:
            value = inputs[tensor.name]
            if isinstance(value, np.ndarray):
                if value.dtype != np.dtype(tensor.dtype):
                    raise RuntimeInputError(f"{tensor.name} must be a {tensor.dtype} numpy array, got {value.dtype}")
                shapes[tensor.name] = value.shape
            elif isinstance(value, (list, tuple, int, float)):
                raise RuntimeInputError(f"{tensor.name} must be a {tensor.dtype} numpy array, got "
                                        f"{type(value).__name__}")
            else:
                shapes[tensor.name] = tuple(self.shape_of(value))
        try:
            sizes = bind_symbols(spec.inputs, shapes)
        except ShapeMismatch as exc:
            raise RuntimeInputError(str(exc)) from None
        batch, length = sizes.get(BATCH, 1), sizes.get(SEQ, 1)
        if batch < 1 or (self.max_batch is not None and batch > self.max_batch):
            raise RuntimeInputError(f"batch {batch} is outside 1..{self.max_batch} for {self.name}")
        if SEQ in sizes and not 1 <= length <= self.bundle.segment_size:
            raise RuntimeInputError(f"segment length {length} is outside 1..{self.bundle.segment_size} (the "
                                    "bundle's segment_size)")
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if isinstance(ids, np.ndarray):
            vocab = self.bundle.vocab_size
            bad = (ids < 0) | (ids >= vocab)
            if bad.any():
                row, col = (int(i[0]) for i in np.nonzero(bad))
                raise RuntimeInputError(f"token id {int(ids[row, col])} at row {row}, position {col} is outside "
                                        f"the vocabulary 0..{vocab - 1}")
        if isinstance(mask, np.ndarray) and not ((mask == 0) | (mask == 1)).all():
            raise RuntimeInputError("attention_mask must hold only 0 and 1")


def check_declared_io(bundle: Bundle, graph: str, declared: Mapping[str, list]) -> None:
    """The graph file's own I/O, as a backend loaded it (name -> dims, an int for a fixed dim),
    agrees with the spec the manifest gives for it (names and every fixed dim): a manifest
    edited to another vocabulary or memory size is refused at load."""
    spec = bundle.graph_spec(graph)
    problems = []
    for tensor in (*spec.inputs, *spec.outputs):
        shape = declared.get(tensor.name)
        if shape is None:
            problems.append(f"{tensor.name} is not in the graph")
        elif len(shape) != len(tensor.dims) or any(
                isinstance(d, int) and isinstance(g, int) and d != g for d, g in zip(tensor.dims, shape)):
            problems.append(f"{tensor.name}: graph {list(shape)}, manifest {list(tensor.dims)}")
    if problems:
        raise BackendError(f"{bundle.graph_path(graph)}: the graph does not match its manifest spec: "
                           + "; ".join(problems))


__all__ = ["RunResult", "Runner", "check_declared_io"]
