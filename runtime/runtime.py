"""The segment-loop runtime: loads a bundle once, runs any number of sequences.

``RMTRuntime`` is immutable and can be shared between threads; each sequence (or batch of
sequences run together) has its own ``SequenceState``. Memory stays in the backend's
buffers between segments; host copies happen only at read-outs (``memory``, ``save``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from .backends import open_runner
from .backends.base import Runner
from .bundle import Bundle
from .errors import RuntimeInputError
from .spec import INGEST, STEP
from .state import SequenceState, load_state_file, save_state_file

if TYPE_CHECKING:
    from .generation import Generation, GenerationConfig

Tokens = "Sequence[int] | np.ndarray"
Progress = Callable[[int, int], None]  # (segments done, segments total)


@dataclass
class Output:
    """What a sequence has produced so far.

    memory: [B, M, D] float32 on the host.
    last_logits: decoder [B, vocab] at each row's last token; encoder [B, labels] class logits.
    logits: decoder [B, T, vocab] for every input position, when asked for (``run(return_logits=True)``).
    """

    memory: np.ndarray
    last_logits: np.ndarray | None
    logits: np.ndarray | None = None


def _as_ids(tokens, name: str = "tokens") -> np.ndarray:
    array = np.asarray(tokens)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise RuntimeInputError(f"{name} must be integer token ids, got dtype {array.dtype}")
    if array.ndim != 1:
        raise RuntimeInputError(f"{name} must be one sequence of ids (1-D), got shape {array.shape}")
    return array.astype(np.int64)


class RMTRuntime:
    """A loaded bundle and its backend. Thread-safe; states are not shared between threads."""

    def __init__(self, bundle: Bundle, runner: Runner, picked: str) -> None:
        self.bundle = bundle
        self.runner = runner
        self.picked = picked
        self._memory_init = np.load(bundle.memory_init_path, allow_pickle=False).astype(np.float32)
        expected = (bundle.num_mem_tokens, bundle.hidden_size)
        if self._memory_init.shape != expected:
            raise RuntimeInputError(f"{bundle.memory_init_path}: shape {self._memory_init.shape}, expected {expected}")

    @classmethod
    def load(cls, bundle: str | os.PathLike | Bundle, backend: str = "auto", provider: str | None = None,
             threads: int | None = None, checkpoint: str | os.PathLike | None = None,
             cuda_graphs: bool = False) -> "RMTRuntime":
        """Verify the bundle (schema, hashes), open the backend, and say what runs (``.picked``).
        ``cuda_graphs``: backend="tensorrt" replays full segments as captured CUDA graphs."""
        if not isinstance(bundle, Bundle):
            bundle = Bundle.load(bundle)
        runner, picked = open_runner(bundle, backend, provider, threads, checkpoint, cuda_graphs)
        return cls(bundle, runner, picked)

    # ---- geometry -----------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.bundle.kind

    @property
    def segment_size(self) -> int:
        return self.bundle.segment_size

    # ---- states -------------------------------------------------------------------------
    def new_state(self, batch: int = 1, memory: np.ndarray | None = None) -> SequenceState:
        """B fresh sequences starting from the learned initial memory, or from ``memory`` [B, M, D]."""
        if batch < 1:
            raise RuntimeInputError(f"batch must be >= 1, got {batch}")
        if memory is None:
            memory = np.repeat(self._memory_init[None], batch, axis=0)
        else:
            memory = np.asarray(memory)
            expected = (batch, self.bundle.num_mem_tokens, self.bundle.hidden_size)
            if memory.dtype != np.float32 or memory.shape != expected:
                raise RuntimeInputError(f"memory must be float32 {list(expected)}, got {memory.dtype} "
                                        f"{list(memory.shape)}")
        return self._state_from_host(memory, [np.zeros(0, np.int64)] * batch,
                                     np.zeros(batch, np.int64), np.zeros(batch, np.int64), None,
                                     np.zeros(batch, bool))

    def _state_from_host(self, memory, pending, tokens_seen, segments_done, last_logits, has_logits):
        self._check_finite(memory, "the initial memory")
        return SequenceState(memory=self.runner.memory_from_host(memory),
                             scratch=self.runner.empty_memory(memory.shape[0]),
                             pending=[np.asarray(p, np.int64) for p in pending],
                             tokens_seen=np.asarray(tokens_seen, np.int64).copy(),
                             segments_done=np.asarray(segments_done, np.int64).copy(),
                             last_logits=None if last_logits is None else np.array(last_logits),
                             has_logits=np.asarray(has_logits, bool).copy())

    def memory(self, state: SequenceState) -> np.ndarray:
        """The current memory [B, M, D] on the host (a copy)."""
        return self.runner.memory_to_host(state.memory)

    def stack(self, states: Sequence[SequenceState]) -> SequenceState:
        """One state running the rows of ``states`` together (copies memory through the host)."""
        if not states:
            raise RuntimeInputError("stack needs at least one state")
        logits = [s.last_logits for s in states]
        width = next((x.shape[1] for x in logits if x is not None), None)
        stacked_logits = None if width is None else np.concatenate(
            [x if x is not None else np.zeros((s.batch, width), np.float32) for s, x in zip(states, logits)])
        return self._state_from_host(np.concatenate([self.memory(s) for s in states]),
                                     [p for s in states for p in s.pending],
                                     np.concatenate([s.tokens_seen for s in states]),
                                     np.concatenate([s.segments_done for s in states]),
                                     stacked_logits, np.concatenate([s.has_logits for s in states]))

    def unstack(self, state: SequenceState) -> list[SequenceState]:
        """One state per row of ``state``."""
        memory = self.memory(state)
        return [self._state_from_host(memory[r:r + 1], [state.pending[r]], state.tokens_seen[r:r + 1],
                                      state.segments_done[r:r + 1],
                                      None if state.last_logits is None else state.last_logits[r:r + 1],
                                      state.has_logits[r:r + 1]) for r in range(state.batch)]

    # ---- running --------------------------------------------------------------------------
    def _check_finite(self, memory: np.ndarray, where) -> None:
        """``where``: text, or a callable making it (only built when something is wrong)."""
        if not np.isfinite(memory).all():
            raise RuntimeInputError(f"memory holds NaN or Inf after {where() if callable(where) else where}")

    def _segment(self, state: SequenceState, ids: np.ndarray, mask: np.ndarray, graph: str,
                 want: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Run one segment for all rows, commit the new memory, record logits of rows with tokens."""
        # Callers check whole inputs before any work (feed, run), or build valid segments.
        outputs = self.runner.run_graph(graph, ids, mask, state.memory, state.scratch, want, checked=True)
        state.swap()
        rows = mask.any(axis=1)
        state.segments_done += rows
        if self.runner.memory_on_host:  # free on the host; device memory is checked at read-out
            self._check_finite(self.runner.memory_to_host(state.memory),
                               lambda: f"segment {int(state.segments_done.max())} (rows {np.nonzero(rows)[0].tolist()})")
        key = "last_logits" if "last_logits" in outputs else "logits" if self.kind == "encoder" else None
        if key and key in outputs:
            self._record_logits(state, outputs[key], rows)
        return outputs

    def _record_logits(self, state: SequenceState, logits: np.ndarray, rows: np.ndarray) -> None:
        if state.last_logits is None:
            state.last_logits = np.zeros((state.batch, logits.shape[-1]), np.float32)
        state.last_logits[rows] = logits[rows]
        state.has_logits |= rows

    def _graph_for_feed(self) -> tuple[str, tuple[str, ...]]:
        # Encoders: the step graph (class logits are cheap); decoders: ingest (no per-token LM head).
        return (STEP, ("logits",)) if self.kind == "encoder" else (INGEST, ("last_logits",))

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
        chunks = [tokens] if state.batch == 1 and not _is_ragged(tokens) else list(tokens)
        if len(chunks) != state.batch:
            raise RuntimeInputError(f"feed got {len(chunks)} sequences for a state of batch {state.batch}")
        chunks = [_as_ids(c, f"tokens of row {r}") for r, c in enumerate(chunks)]
        vocab = self.bundle.vocab_size
        for row, chunk in enumerate(chunks):  # all checks before any work
            bad = (chunk < 0) | (chunk >= vocab)
            if bad.any():
                position = int(np.argmax(bad))
                raise RuntimeInputError(f"token id {int(chunk[position])} at row {row}, position "
                                        f"{int(state.tokens_seen[row]) + position} is outside the vocabulary 0..{vocab - 1}")
        for row, chunk in enumerate(chunks):
            state.pending[row] = np.concatenate([state.pending[row], chunk])
            state.tokens_seen[row] += len(chunk)
        return self._commit_full_segments(state, progress, stop)

    def _commit_full_segments(self, state: SequenceState, progress: Progress | None = None,
                              stop: Callable[[], bool] | None = None) -> bool:
        """Run every full segment of the rows' pending tokens into memory (see ``feed``)."""
        size = self.segment_size
        total = max(len(p) // size for p in state.pending)
        graph, want = self._graph_for_feed()
        if progress and total:
            progress(0, total)
        for index in range(total):
            if stop is not None and stop():
                return False
            ids = np.zeros((state.batch, size), np.int64)
            mask = np.zeros((state.batch, size), np.int64)
            for row, pending in enumerate(state.pending):
                if len(pending) >= size:
                    ids[row], mask[row] = pending[:size], 1
            self._segment(state, ids, mask, graph, want)
            # Tokens leave pending only once their segment is in memory.
            state.pending = [p[size:] if m else p for p, m in zip(state.pending, mask.any(axis=1))]
            if progress:
                progress(index + 1, total)
        return True

    def _pending_batch(self, state: SequenceState) -> tuple[np.ndarray, np.ndarray] | None:
        width = max(len(p) for p in state.pending)
        if width == 0:
            return None
        ids = np.zeros((state.batch, width), np.int64)
        mask = np.zeros((state.batch, width), np.int64)
        for row, pending in enumerate(state.pending):
            ids[row, :len(pending)], mask[row, :len(pending)] = pending, 1
        return ids, mask

    def peek(self, state: SequenceState) -> Output:
        """The output as if the input ended now, without committing the partial segment:
        the state continues as if nothing happened (feed more later, then flush)."""
        batch = self._pending_batch(state)
        if batch is None:
            return Output(memory=self.memory(state), last_logits=self._logits_or_none(state))
        graph, want = self._graph_for_feed()
        # The state's memory is only read; the result goes to a buffer of its own.
        scratch = self.runner.empty_memory(state.batch)
        outputs = self.runner.run_graph(graph, *batch, state.memory, scratch, want)
        rows = batch[1].any(axis=1)
        key = want[0]
        logits = state.last_logits.copy() if state.last_logits is not None else np.zeros(
            (state.batch, outputs[key].shape[-1]), np.float32)
        logits[rows] = outputs[key][rows]
        new_memory = self.runner.memory_to_host(scratch)
        self._check_finite(new_memory, "the partial segment")
        return Output(memory=new_memory, last_logits=logits)

    def flush(self, state: SequenceState) -> Output:
        """Run each row's partial segment into memory (the end of the input) and return the output."""
        batch = self._pending_batch(state)
        if batch is not None:
            graph, want = self._graph_for_feed()
            self._segment(state, *batch, graph, want)
            state.pending = [np.zeros(0, np.int64) for _ in state.pending]
        memory = self.memory(state)
        self._check_finite(memory, f"segment {int(state.segments_done.max())}")
        return Output(memory=memory, last_logits=self._logits_or_none(state))

    def _logits_or_none(self, state: SequenceState) -> np.ndarray | None:
        return None if state.last_logits is None else state.last_logits.copy()

    def run(self, input_ids, attention_mask=None, return_logits: bool = False,
            progress: Progress | None = None, state: SequenceState | None = None) -> Output:
        """Run a whole input: ids [B, T] (or 1-D), right-padded rows marked by attention_mask.

        Decoder: left-aligned segments (the reference's segmentation); the ingest graph unless
        ``return_logits``, which runs the step graph and returns logits for every position.
        Encoder: right-aligned segments, rows ending together (the reference encoder's
        segmentation); class logits of the last segment.
        """
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise RuntimeInputError(f"input_ids must be [batch, length] with length >= 1, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise RuntimeInputError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int64)
        if mask.shape != ids.shape:
            raise RuntimeInputError(f"attention_mask shape {mask.shape} must equal input_ids shape {ids.shape}")
        if state is None:
            state = self.new_state(ids.shape[0])
        elif state.batch != ids.shape[0] or any(len(p) for p in state.pending):
            raise RuntimeInputError("run continues a state only of the same batch with no pending tokens")
        segments = (_right_aligned(ids, mask, self.segment_size) if self.kind == "encoder"
                    else _left_aligned(ids, mask, self.segment_size))
        for seg_ids, seg_mask in segments:
            self.runner.check_inputs(self.runner.specs[STEP], seg_ids, seg_mask)  # all checks first
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
            outputs = self._segment(state, seg_ids, seg_mask, graph, want)
            if logits is not None:
                logits[:, start:start + seg_ids.shape[1]] = outputs["logits"]
                start += seg_ids.shape[1]
                rows = seg_mask.any(axis=1)
                last_index = np.maximum(seg_mask.sum(axis=1) - 1, 0)
                self._record_logits(state, outputs["logits"][np.arange(len(rows)), last_index], rows)
            if progress:
                progress(index + 1, len(segments))
        state.tokens_seen += mask.sum(axis=1)
        memory = self.memory(state)
        self._check_finite(memory, f"segment {len(segments)}")
        return Output(memory=memory, last_logits=self._logits_or_none(state), logits=logits)

    # ---- generation ---------------------------------------------------------------------------
    def generate_stream(self, state: SequenceState, prompts, config: "GenerationConfig | None" = None
                        ) -> Iterator[np.ndarray]:
        """Read ``prompts`` (one id sequence per row; 1-D for batch 1) after what ``state``
        holds and generate; yields the next token of every row, [B] int64, -1 for a row that
        has stopped. The state follows along: generated tokens become its pending context, and
        with ``config.rollover`` a filled segment is written into memory. See generation.py."""
        from .generation import GenerationConfig, generate_tokens

        return generate_tokens(self, state, prompts, config or GenerationConfig())

    def generate(self, prompts, config: "GenerationConfig | None" = None,
                 state: SequenceState | None = None) -> "Generation":
        """Generate for every row at once; returns the tokens per row and the state to continue."""
        from .generation import Generation, GenerationConfig, generate_tokens

        config = config or GenerationConfig()
        if _is_ragged(prompts):
            prompts = list(prompts)  # counted here and read again by generate_tokens
        rows = len(prompts) if _is_ragged(prompts) else 1
        state = self.new_state(rows) if state is None else state
        generated: list[list[int]] = [[] for _ in range(state.batch)]
        for tokens in generate_tokens(self, state, prompts, config):
            for row, token in enumerate(tokens):
                if token >= 0:
                    generated[row].append(int(token))
        return Generation(tokens=generated, state=state)

    # ---- persistence ----------------------------------------------------------------------
    def save_state(self, state: SequenceState, path: str | os.PathLike):
        """Write the state (memory, pending tokens, counters, bundle identity) atomically."""
        return save_state_file(path, self.bundle.identity, str(self.bundle.path), self.memory(state), state)

    def restore_state(self, path: str | os.PathLike) -> SequenceState:
        """A state saved by ``save_state`` from this same bundle; any other is refused."""
        loaded = load_state_file(path, self.bundle.identity, str(self.bundle.path),
                                 (self.bundle.num_mem_tokens, self.bundle.hidden_size))
        return self._state_from_host(loaded.memory, loaded.pending, loaded.tokens_seen, loaded.segments_done,
                                     loaded.last_logits, loaded.has_logits)


def _is_ragged(tokens) -> bool:
    """True for a list of sequences (batch feed), False for one sequence of ids."""
    if isinstance(tokens, np.ndarray):
        return tokens.ndim == 2
    tokens = list(tokens) if not isinstance(tokens, (list, tuple)) else tokens
    return bool(tokens) and isinstance(tokens[0], (list, tuple, np.ndarray))


def _left_aligned(ids: np.ndarray, mask: np.ndarray, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.ascontiguousarray(ids[:, s:s + size]), np.ascontiguousarray(mask[:, s:s + size]))
            for s in range(0, ids.shape[1], size)]


def _right_aligned(ids: np.ndarray, mask: np.ndarray, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each row's tokens in segments counted from its end (the first may be short), rows ending together."""
    rows = [row_ids[row_mask > 0] for row_ids, row_mask in zip(ids, mask)]
    if min(len(r) for r in rows) == 0:
        raise RuntimeInputError("every row of an encoder input needs at least one token")
    counts = [-(-len(r) // size) for r in rows]
    total = max(counts)
    out = []
    for index in range(total):
        seg_ids = np.zeros((len(rows), size), np.int64)
        seg_mask = np.zeros((len(rows), size), np.int64)
        for r, (tokens, count) in enumerate(zip(rows, counts)):
            own = index - (total - count)
            if own < 0:
                continue
            end = len(tokens) - (count - 1 - own) * size
            start = max(0, end - size)
            seg_ids[r, :end - start], seg_mask[r, :end - start] = tokens[start:end], 1
        width = int(seg_mask.sum(axis=1).max())
        out.append((seg_ids[:, :width].copy(), seg_mask[:, :width].copy()))
    return out

