"""The segment-loop runtime: loads a bundle once, runs any number of sequences.

``RMTRuntime`` is immutable and can be shared between threads; each sequence (or batch of
sequences run together) has its own ``SequenceState``. The state (every named state pair
of the bundle: the RMT's memory, or a model's per-layer tensors) stays in the backend's
buffers between segments; host copies happen only at read-outs (``memory``, ``save``).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from . import limits
from .backends import open_runner
from .backends.base import Runner
from .bundle import Bundle
from .errors import RuntimeInputError
from .generation import Generation, GenerationConfig, generate_tokens
from .segments import (as_ids_array, check_mask, check_token_container, full_segment, is_ragged, left_aligned,
                       materialized, pad_rows, right_aligned, rows_of)
from .spec import INGEST, STEP
from .state import SequenceState, StateLayout, load_state_file, save_state_file

# The RMT's state pair; other models name theirs in their spec.
MEMORY = "memory"
Tokens = "Sequence[int] | np.ndarray"
Progress = Callable[[int, int], None]  # (segments done, segments total)


@dataclass
class Output:
    """What a sequence has produced so far.

    state: every named state tensor [B, ...] float32 on the host (the RMT's: ``memory``).
    memory: the RMT's memory [B, M, D] (``state["memory"]``; None for a model without one).
    last_logits: decoder [B, vocab] at each row's last token; encoder [B, labels] class logits.
    logits: decoder [B, T, vocab] for every input position, when asked for (``run(return_logits=True)``).
    """

    state: dict[str, np.ndarray]
    last_logits: np.ndarray | None
    logits: np.ndarray | None = None
    memory: np.ndarray | None = field(init=False)

    def __post_init__(self) -> None:
        self.memory = self.state.get(MEMORY)



def _state_parameters(signature: inspect.Signature) -> dict[str, str]:
    """The parameters that take states, by their annotation: ``state`` (one SequenceState, or
    None where the method then makes its own) or ``states`` (a sequence of them)."""
    kinds = {}
    for name, parameter in signature.parameters.items():
        annotation = str(parameter.annotation)
        if "SequenceState" in annotation:
            kinds[name] = "several" if annotation.startswith("Sequence[") else (
                "optional" if parameter.default is None else "one")
    return kinds


def _holding_states(method):
    """Check ``method``'s state arguments (SequenceStates of this runtime's bundle) and run it
    holding all of them, for as long as its result depends on them: a second thread using one
    meanwhile gets StateInUseError. A method returning an Iterator hands the hold to the
    iterator, which keeps it from the call until it is exhausted, closed or collected.

    Every public RMTRuntime method with a SequenceState parameter goes through here (a test
    enumerates them); inside, the runtime calls only its private, unheld helpers."""
    signature = inspect.signature(method)
    parameters = _state_parameters(signature)
    streams = "Iterator" in str(signature.return_annotation)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        states = []
        for name, kind in parameters.items():
            value = arguments.get(name)
            if kind == "several":
                if isinstance(value, SequenceState) or not isinstance(value, Sequence) or not value:
                    raise RuntimeInputError(f"{method.__name__} needs a non-empty sequence of states ({name}), "
                                            f"got {value!r}")
                for index, state in enumerate(value):
                    self.check_state(state, f"{name}[{index}]")
                states.extend(value)
            elif value is not None or kind == "one":
                self.check_state(value, name)
                states.append(value)
        release = SequenceState.hold_all(states)
        if not streams:
            try:
                return method(self, *args, **kwargs)
            finally:
                release()
        try:
            iterator = method(self, *args, **kwargs)
        except BaseException:
            release()
            raise
        return _HeldIterator(iterator, release)
    wrapper.holds_states = tuple(parameters)
    return wrapper


class _HeldIterator:
    """An iterator that holds its states from its making until it is exhausted, fails, is
    closed or is collected; made by ``_holding_states``."""

    def __init__(self, iterator: Iterator, release: Callable[[], None]) -> None:
        self._iterator, self._release = iterator, release

    def __iter__(self) -> "_HeldIterator":
        return self

    def __next__(self):
        if self._iterator is None:
            raise StopIteration
        try:
            return next(self._iterator)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop early and give the states back (a generation's state keeps what it generated so far)."""
        iterator, self._iterator = self._iterator, None
        try:
            if iterator is not None and hasattr(iterator, "close"):
                iterator.close()
        finally:
            if iterator is not None:
                self._release()

    def __del__(self) -> None:
        self.close()


def _check_callable(value, name: str) -> None:
    if value is not None and not callable(value):
        raise RuntimeInputError(f"{name} must be a callable or None, got {value!r}")


class RMTRuntime:
    """A loaded bundle and its backend. Thread-safe; states are not shared between threads."""

    def __init__(self, bundle: Bundle, runner: Runner, picked: str) -> None:
        self.bundle = bundle
        self.runner = runner
        self._picked = picked
        self.state_pairs = bundle.state_pairs          # state input -> output replacing it
        self.state_shapes = bundle.state_shapes()      # state input -> shape after the batch axis
        self._initial = bundle.initial_state()
        self.identity = bundle.identity  # what states made here carry

    @classmethod
    def load(cls, bundle: str | os.PathLike | Bundle, backend: str = "auto", provider: str | None = None,
             threads: int | None = None, cuda_graphs: bool = False, engine_options=None,
             precision: str | None = None) -> "RMTRuntime":
        """Verify the bundle (schema, hashes), open the backend, and say what runs (``.picked``).
        ``cuda_graphs``: backend="tensorrt" replays full segments as captured CUDA graphs.
        ``engine_options`` (``rmt_runtime.engines.BuildOptions``): backend="tensorrt" loads the
        engines rmt-build made with these options (default: the newest set built for this
        machine); loading never builds. ``precision``: backend="openvino" computes an fp32 bundle
        in ``fp32`` (default) or ``bf16`` (CPUs with AVX-512 BF16 or AMX); any other backend
        takes only the bundle's own precision.
        A runner built elsewhere (e.g. rmt_export's PyTorch reference) goes to the constructor."""
        if threads is not None:  # bounded before the bundle is read (rmt_runtime.limits)
            threads = limits.THREADS.check(threads)
        if not isinstance(bundle, Bundle):
            bundle = Bundle.load(bundle)
        runner, picked = open_runner(bundle, backend, provider, threads, cuda_graphs, engine_options, precision)
        return cls(bundle, runner, picked)

    @property
    def picked(self) -> str:
        """What runs and why; with what the backend changed since (CUDA graphs turned off for a graph)."""
        return "; ".join([self._picked, *self.runner.notes])

    # ---- geometry -----------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.bundle.kind

    @property
    def segment_size(self) -> int:
        return self.bundle.segment_size

    # ---- states -------------------------------------------------------------------------
    def check_state(self, state, what: str = "state") -> None:
        """``state`` must be a SequenceState holding this bundle's state tensors."""
        if not isinstance(state, SequenceState):
            raise RuntimeInputError(f"{what} must be a SequenceState (from new_state or restore_state), got "
                                    f"{type(state).__name__}")
        if state.bundle_identity != self.identity:
            raise RuntimeInputError(f"{what} was made for bundle {state.bundle_identity or '?'}, this runtime runs "
                                    f"{self.identity}: a state of another bundle")
        try:
            shapes = {name: tuple(self.runner.shape_of(handle))[1:] for name, handle in state.handles.items()}
        except (TypeError, AttributeError):
            raise RuntimeInputError(f"{what} holds buffers of another backend: a state belongs to the runtime "
                                    "that made it") from None
        if shapes != self.state_shapes:
            raise RuntimeInputError(f"{what} holds state {shapes}, this bundle's is {self.state_shapes}: "
                                    "a state of another bundle")

    def new_state(self, batch: int = 1, memory: np.ndarray | None = None,
                  state: Mapping[str, np.ndarray] | None = None) -> SequenceState:
        """B fresh sequences starting from the bundle's initial state, or from ``state``
        (name -> [B, ...] float32; ``memory`` [B, M, D] is short for the RMT's ``{"memory": ...}``)."""
        if not isinstance(batch, (int, np.integer)) or isinstance(batch, bool) or batch < 1:
            raise RuntimeInputError(f"batch must be an int >= 1, got {batch!r}")
        batch = limits.BATCH.check(batch)
        limits.check_allocation(batch * sum(4 * int(np.prod(shape)) for shape in self.state_shapes.values()),
                                f"a state of batch {batch}")  # float32 state, before any of it is allocated
        if state is not None and not isinstance(state, Mapping):
            raise RuntimeInputError(f"state must be a mapping of state name -> array, got {type(state).__name__}")
        given = dict(state or {})
        if memory is not None:
            given[MEMORY] = memory
        unknown = sorted(set(given) - set(self.state_pairs))
        if unknown:
            raise RuntimeInputError(f"state {unknown} is not part of this bundle's state {sorted(self.state_pairs)}")
        tensors = {}
        for name, shape in self.state_shapes.items():
            if name not in given:
                try:
                    tensors[name] = np.repeat(self._initial[name][None], batch, axis=0)
                except MemoryError:
                    raise RuntimeInputError(f"batch {batch} needs {batch * self._initial[name].nbytes / 2**30:.1f} "
                                            f"GiB for state {name!r}: more than this machine can allocate") from None
                continue
            value = np.asarray(given[name])
            if value.dtype != np.float32 or value.shape != (batch, *shape):
                raise RuntimeInputError(f"{name} must be float32 {[batch, *shape]}, got {value.dtype} "
                                        f"{list(value.shape)}")
            tensors[name] = value
        return self._state_from_host(tensors, [np.zeros(0, np.int64)] * batch, np.zeros(batch, np.int64),
                                     np.zeros(batch, np.int64), None, np.zeros(batch, bool))

    def _state_from_host(self, tensors, pending, tokens_seen, segments_done, last_logits, has_logits):
        self._check_finite(tensors, "the initial state")
        handles = {name: self.runner.to_device(np.ascontiguousarray(value)) for name, value in tensors.items()}
        return SequenceState(handles=handles, scratch=self._empty_like(handles),
                             pending=[np.asarray(p, np.int64) for p in pending],
                             tokens_seen=np.asarray(tokens_seen, np.int64).copy(),
                             segments_done=np.asarray(segments_done, np.int64).copy(),
                             last_logits=None if last_logits is None else np.array(last_logits),
                             has_logits=np.asarray(has_logits, bool).copy(),
                             bundle_identity=self.identity)

    def _empty_like(self, handles: Mapping[str, Any]) -> dict[str, Any]:
        return {name: self.runner.empty(self.runner.shape_of(handle), "float32") for name, handle in handles.items()}

    @_holding_states
    def state_tensors(self, state: SequenceState) -> dict[str, np.ndarray]:
        """Every state tensor [B, ...] on the host (copies)."""
        return self._state_tensors(state)

    def _state_tensors(self, state: SequenceState) -> dict[str, np.ndarray]:
        return {name: self.runner.to_host(handle) for name, handle in state.handles.items()}

    @_holding_states
    def memory(self, state: SequenceState) -> np.ndarray:
        """The RMT's current memory [B, M, D] on the host (a copy)."""
        if MEMORY not in state.handles:
            raise RuntimeInputError(f"this bundle's state is {sorted(state.handles)}, not an RMT memory: "
                                    "use state_tensors()")
        return self.runner.to_host(state.handles[MEMORY])

    @_holding_states
    def stack(self, states: Sequence[SequenceState]) -> SequenceState:
        """One state running the rows of ``states`` together (copies state through the host);
        holds every one of them while it reads them."""
        logits = [s.last_logits for s in states]
        width = next((x.shape[1] for x in logits if x is not None), None)
        stacked_logits = None if width is None else np.concatenate(
            [x if x is not None else np.zeros((s.batch, width), np.float32) for s, x in zip(states, logits)])
        tensors = [self._state_tensors(s) for s in states]
        return self._state_from_host({name: np.concatenate([t[name] for t in tensors]) for name in self.state_pairs},
                                     [p for s in states for p in s.pending],
                                     np.concatenate([s.tokens_seen for s in states]),
                                     np.concatenate([s.segments_done for s in states]),
                                     stacked_logits, np.concatenate([s.has_logits for s in states]))

    @_holding_states
    def unstack(self, state: SequenceState) -> list[SequenceState]:
        """One state per row of ``state``."""
        tensors = self._state_tensors(state)
        return [self._state_from_host({name: value[r:r + 1] for name, value in tensors.items()}, [state.pending[r]],
                                      state.tokens_seen[r:r + 1], state.segments_done[r:r + 1],
                                      None if state.last_logits is None else state.last_logits[r:r + 1],
                                      state.has_logits[r:r + 1]) for r in range(state.batch)]

    # ---- running --------------------------------------------------------------------------
    def _check_finite(self, tensors: Mapping[str, np.ndarray], where) -> None:
        """``where``: text, or a callable making it (only built when something is wrong). The
        error names the tensors and the rows (sequences) that hold NaN or Inf."""
        bad = [name for name, value in tensors.items() if not np.isfinite(value).all()]
        if bad:
            rows = sorted({int(row) for name in bad for row in np.nonzero(
                ~np.isfinite(tensors[name].reshape(len(tensors[name]), -1)).all(axis=1))[0]})
            raise RuntimeInputError(f"state {bad} holds NaN or Inf in row(s) {rows[:20]}"
                                    + (f" and {len(rows) - 20} more" if len(rows) > 20 else "")
                                    + f" after {where() if callable(where) else where}")

    def _graph_inputs(self, ids: np.ndarray, mask: np.ndarray, handles: Mapping[str, Any]) -> dict[str, Any]:
        return {"input_ids": ids, "attention_mask": mask, **handles}

    @_holding_states
    def run_segment(self, state: SequenceState, ids: np.ndarray, mask: np.ndarray, graph: str,
                    want: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Run one segment for all rows (ids and mask already checked: callers check whole inputs
        before any work), commit the new state, record the logits of rows with tokens."""
        return self._run_segment(state, ids, mask, graph, want)

    def _run_segment(self, state: SequenceState, ids: np.ndarray, mask: np.ndarray, graph: str,
                     want: tuple[str, ...]) -> dict[str, np.ndarray]:
        # The caller holds the state. It changes only once the segment ran and its state is
        # known finite: a failure leaves it as it was (its tokens still pending).
        into = {self.state_pairs[name]: buffer for name, buffer in state.scratch.items()}
        result = self.runner.run(graph, self._graph_inputs(ids, mask, state.handles), want, into, checked=True)
        rows = mask.any(axis=1)
        if self.runner.state_on_host:  # free on the host; device state is checked at read-out
            self._check_finite({name: self.runner.to_host(buffer) for name, buffer in state.scratch.items()},
                               lambda: f"segment {int((state.segments_done + rows).max())}")
        state.swap()
        state.segments_done += rows
        key = "last_logits" if "last_logits" in result.host else "logits" if self.kind == "encoder" else None
        if key and key in result.host:
            self._record_logits(state, result.host[key], rows)
        return result.host

    def _record_logits(self, state: SequenceState, logits: np.ndarray, rows: np.ndarray) -> None:
        if state.last_logits is None:
            state.last_logits = np.zeros((state.batch, logits.shape[-1]), np.float32)
        state.last_logits[rows] = logits[rows]
        state.has_logits |= rows

    def _graph_for_feed(self) -> tuple[str, tuple[str, ...]]:
        # Encoders: the step graph (class logits are cheap); decoders: ingest (no per-token LM head).
        return (STEP, ("logits",)) if self.kind == "encoder" else (INGEST, ("last_logits",))

    @_holding_states
    def feed(self, state: SequenceState, tokens, progress: Progress | None = None,
             stop: Callable[[], bool] | None = None) -> bool:
        """Append tokens (batch 1: one id sequence; batch B: B sequences) and run every full
        segment. Tokens of a partial segment wait in the state until more come or ``flush``.

        Segmentation is left-aligned from each sequence's first token, so any chunking of
        the same tokens gives the same result. ``stop`` is asked between segments: when it
        says True, feed returns False at once, leaving a consistent state (memory of the
        segments run, every other token pending) that a later feed continues exactly.
        Returns True when every full segment ran.
        """
        # All checks before any work; positions count from each row's first token.
        _check_callable(progress, "progress")
        _check_callable(stop, "stop")
        chunks = rows_of(tokens, state.batch, self.bundle.vocab_size, "sequence", offsets=state.tokens_seen)
        for row, chunk in enumerate(chunks):
            state.pending[row] = np.concatenate([state.pending[row], chunk])
            state.tokens_seen[row] += len(chunk)
        return self._commit_full_segments(state, progress, stop)

    @_holding_states
    def commit_full_segments(self, state: SequenceState, progress: Progress | None = None,
                             stop: Callable[[], bool] | None = None) -> bool:
        """Run every full segment of the rows' pending tokens into memory (see ``feed``)."""
        _check_callable(progress, "progress")
        _check_callable(stop, "stop")
        return self._commit_full_segments(state, progress, stop)

    def _commit_full_segments(self, state: SequenceState, progress: Progress | None = None,
                              stop: Callable[[], bool] | None = None) -> bool:
        size = self.segment_size
        total = max(len(p) // size for p in state.pending)
        graph, want = self._graph_for_feed()
        if progress and total:
            progress(0, total)
        for index in range(total):
            if stop is not None and stop():
                return False
            ids, mask = full_segment(state.pending, size)
            self._run_segment(state, ids, mask, graph, want)
            # Tokens leave pending only once their segment is in memory.
            state.pending = [p[size:] if m else p for p, m in zip(state.pending, mask.any(axis=1))]
            if progress:
                progress(index + 1, total)
        return True

    def _pending_batch(self, state: SequenceState) -> tuple[np.ndarray, np.ndarray] | None:
        return pad_rows(state.pending) if any(len(p) for p in state.pending) else None

    @_holding_states
    def peek(self, state: SequenceState) -> Output:
        """The output as if the input ended now, without committing the partial segment:
        the state continues as if nothing happened (feed more later, then flush)."""
        if any(len(p) >= self.segment_size for p in state.pending):
            # A feed stopped before its full segments ran: run them on a copy, never on the state.
            state = self._state_from_host(self._state_tensors(state), state.pending, state.tokens_seen,
                                          state.segments_done, state.last_logits, state.has_logits)
            self._commit_full_segments(state)
        batch = self._pending_batch(state)
        if batch is None:
            return Output(state=self._state_tensors(state), last_logits=self._logits_or_none(state))
        graph, want = self._graph_for_feed()
        # The state is only read; the results go to buffers of their own.
        into = {self.state_pairs[name]: buffer for name, buffer in self._empty_like(state.handles).items()}
        outputs = self.runner.run(graph, self._graph_inputs(*batch, state.handles), want, into).host
        rows = batch[1].any(axis=1)
        key = want[0]
        logits = state.last_logits.copy() if state.last_logits is not None else np.zeros(
            (state.batch, outputs[key].shape[-1]), np.float32)
        logits[rows] = outputs[key][rows]
        tensors = {name: self.runner.to_host(into[output]) for name, output in self.state_pairs.items()}
        self._check_finite(tensors, "the partial segment")
        return Output(state=tensors, last_logits=logits)

    @_holding_states
    def flush(self, state: SequenceState) -> Output:
        """Run each row's partial segment into memory (the end of the input) and return the output."""
        self._commit_full_segments(state)  # left over by a feed that was stopped
        batch = self._pending_batch(state)
        if batch is not None:
            graph, want = self._graph_for_feed()
            self._run_segment(state, *batch, graph, want)
            state.pending = [np.zeros(0, np.int64) for _ in state.pending]
        tensors = self._state_tensors(state)
        self._check_finite(tensors, f"segment {int(state.segments_done.max())}")
        return Output(state=tensors, last_logits=self._logits_or_none(state))

    def _logits_or_none(self, state: SequenceState) -> np.ndarray | None:
        return None if state.last_logits is None else state.last_logits.copy()

    @_holding_states
    def run(self, input_ids, attention_mask=None, return_logits: bool = False,
            progress: Progress | None = None, state: SequenceState | None = None) -> Output:
        """Run a whole input: ids [B, T] (or 1-D), right-padded rows marked by attention_mask.

        Decoder: left-aligned segments (the reference's segmentation); the ingest graph unless
        ``return_logits``, which runs the step graph and returns logits for every position.
        Encoder: right-aligned segments, rows ending together (the reference encoder's
        segmentation); class logits of the last segment.
        """
        if not isinstance(return_logits, (bool, np.bool_)):
            raise RuntimeInputError(f"return_logits must be True or False, got {return_logits!r}")
        _check_callable(progress, "progress")
        try:
            ids = np.asarray(input_ids)
        except ValueError:
            raise RuntimeInputError("input_ids rows have different lengths: pad them on the right and mark the "
                                    "tokens with attention_mask, or feed the rows to a state of that batch") from None
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise RuntimeInputError(f"input_ids must be [batch, length] with length >= 1, got shape {ids.shape}")
        ids = as_ids_array(ids, "input_ids")
        mask = np.ones_like(ids) if attention_mask is None else check_mask(attention_mask, ids.shape)
        if state is None:
            state = self.new_state(ids.shape[0])
        elif state.batch != ids.shape[0] or any(len(p) for p in state.pending):
            raise RuntimeInputError("run continues a state only of the same batch with no pending tokens")
        segments = (right_aligned(ids, mask, self.segment_size) if self.kind == "encoder"
                    else left_aligned(ids, mask, self.segment_size))
        step_spec = self.runner.spec(STEP)
        for seg_ids, seg_mask in segments:  # all checks first
            self.runner.check(step_spec, self._graph_inputs(seg_ids, seg_mask, state.handles))
        logits = None
        if self.kind == "decoder" and return_logits:  # filled in place: no list of copies to concatenate
            logits = np.empty((*ids.shape, self.bundle.vocab_size), np.float32)
        start = 0
        if progress:
            progress(0, len(segments))
        for index, (seg_ids, seg_mask) in enumerate(segments):
            last = index == len(segments) - 1
            if self.kind == "encoder":
                graph, want = (STEP, ("logits",)) if last else (INGEST, ())
            elif return_logits:
                graph, want = STEP, ("logits",)
            else:
                graph, want = INGEST, ("last_logits",)
            outputs = self._run_segment(state, seg_ids, seg_mask, graph, want)
            state.tokens_seen += seg_mask.sum(axis=1)  # with its segment: a failure later leaves counters that agree
            if logits is not None:
                logits[:, start:start + seg_ids.shape[1]] = outputs["logits"]
                start += seg_ids.shape[1]
                rows = seg_mask.any(axis=1)
                last_index = np.maximum(seg_mask.sum(axis=1) - 1, 0)
                self._record_logits(state, outputs["logits"][np.arange(len(rows)), last_index], rows)
            if progress:
                progress(index + 1, len(segments))
        tensors = self._state_tensors(state)
        self._check_finite(tensors, f"segment {len(segments)}")
        return Output(state=tensors, last_logits=self._logits_or_none(state), logits=logits)

    # ---- generation ---------------------------------------------------------------------------
    @_holding_states
    def generate_stream(self, state: SequenceState, prompts, config: GenerationConfig | None = None
                        ) -> Iterator[np.ndarray]:
        """Read ``prompts`` (one id sequence per row; 1-D for batch 1) after what ``state``
        holds and generate; yields the next token of every row, [B] int64, -1 for a row that
        has stopped. The state follows along: generated tokens become its pending context, and
        with ``config.rollover`` a filled segment is written into memory. See generation.py.

        The stream holds ``state`` from this call (its prompt is read against the state as it
        is now) until it is exhausted, closed (``close()``) or dropped; meanwhile any other use
        of the state is a StateInUseError."""
        if config is not None and not isinstance(config, GenerationConfig):
            raise RuntimeInputError(f"config must be a GenerationConfig, got {type(config).__name__}")
        return generate_tokens(self, state, prompts, config or GenerationConfig())

    @_holding_states
    def generate(self, prompts, config: GenerationConfig | None = None,
                 state: SequenceState | None = None) -> Generation:
        """Generate for every row at once; returns the tokens per row and the state to continue.
        ``prompts``: one id sequence (batch 1) or one per row, as any iterable (a generator is
        read once, first)."""
        config = GenerationConfig() if config is None else config
        if not isinstance(config, GenerationConfig):
            raise RuntimeInputError(f"config must be a GenerationConfig, got {type(config).__name__}")
        check_token_container(prompts, "prompts")
        prompts = materialized(prompts)  # any iterable: counted here and read again by generate_tokens
        rows = len(prompts) if is_ragged(prompts) else 1
        own = state is None  # a state of its own is held like a given one (the decorator holds that)
        state = self.new_state(rows) if own else state
        generated: list[list[int]] = [[] for _ in range(state.batch)]
        with state.using() if own else contextlib.nullcontext():
            for tokens in generate_tokens(self, state, prompts, config):
                for row, token in enumerate(tokens):
                    if token >= 0:
                        generated[row].append(int(token))
        return Generation(tokens=generated, state=state)

    # ---- persistence ----------------------------------------------------------------------
    @_holding_states
    def save_state(self, state: SequenceState, path: str | os.PathLike):
        """Write the state (every state tensor, pending tokens, counters, bundle identity) atomically."""
        return save_state_file(path, self.bundle.identity, str(self.bundle.path), self._state_tensors(state), state)

    def restore_state(self, path: str | os.PathLike) -> SequenceState:
        """A state saved by ``save_state`` from this same bundle; any other is refused."""
        # The saved logits' width: the vocabulary, or the step graph's class logits (num_labels
        # is optional in a manifest; the graph spec always says it).
        logits = next(t for t in self.bundle.graph_spec(STEP).outputs if t.name == "logits")
        width = self.bundle.vocab_size if self.kind == "decoder" else int(logits.dims[-1])
        layout = StateLayout(self.state_shapes, self.bundle.vocab_size, width, self.segment_size)
        loaded = load_state_file(path, self.bundle.identity, str(self.bundle.path), layout)
        return self._state_from_host(loaded.tensors, loaded.pending, loaded.tokens_seen, loaded.segments_done,
                                     loaded.last_logits, loaded.has_logits)

