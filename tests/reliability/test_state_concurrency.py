"""Every read of a state holds the state (issue 29, class 2; docs/RELIABILITY.md).

A call that reads or writes a SequenceState while another operation holds it (a feed or a
run stopped between two segments in another thread, a generation not finished) either
raises StateInUseError and changes nothing, or gives what running the two one after the
other gives, bit for bit. The pauses are the runtime's own hooks (``stop``, ``progress``,
a generation between two tokens) waiting on an Event: no sleeps, no timing.
"""
import gc
import inspect
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmt_runtime import (BackendError, Generation, GenerationConfig, Output, RMTRuntime, RuntimeInputError,
                         SequenceState)
from rmt_runtime.errors import StateInUseError
from rmt_runtime.generation import generate_tokens
from rmt_runtime.spec import INGEST

VOCAB = 97
SEGMENT = 16
CONFIG = GenerationConfig(max_new_tokens=6)
IN_USE = "StateInUseError"


@pytest.fixture(scope="module")
def rt(bundle_factory):
    runtime = RMTRuntime.load(bundle_factory("gpt2", "fp32")[1].path)
    assert runtime.segment_size == SEGMENT
    return runtime


def _ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


def _make_state(rt) -> SequenceState:
    """Two segments in memory, nothing pending: every mutator and reader below can start here."""
    state = rt.new_state()
    rt.feed(state, _ids(2 * SEGMENT, 1))
    return state


class _Scripted:
    """The runtime's own runner with one scripted event: a BackendError at the ``fail_at``-th
    run, the ``nan_at``-th run's state outputs reading back as NaN (once), or ``pause`` called
    once the ``pause_at``-th run has written its outputs (the segment not committed yet)."""

    def __init__(self, runner, fail_at: int | None = None, nan_at: int | None = None,
                 pause_at: int | None = None, pause=None) -> None:
        self._runner, self.fail_at, self.nan_at, self.pause_at, self.pause = runner, fail_at, nan_at, pause_at, pause
        self.calls, self._poisoned = 0, set()

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def run(self, graph, inputs, want=(), into=None, checked=False):
        self.calls += 1
        if self.calls == self.fail_at:
            raise BackendError(f"scripted failure of run {self.calls}")
        result = self._runner.run(graph, inputs, want, into, checked=checked)
        if self.calls == self.nan_at:
            self._poisoned = {id(handle) for handle in (into or {}).values()}
        if self.calls == self.pause_at:
            self.pause()
        return result

    def to_host(self, handle):
        array = self._runner.to_host(handle)
        if id(handle) in self._poisoned:
            self._poisoned.discard(id(handle))
            array[...] = np.nan
        return array


def _scripted(rt, **faults) -> RMTRuntime:
    return RMTRuntime(rt.bundle, _Scripted(rt.runner, **faults), "scripted")


# ---- the operations that hold the state in another thread, each pausing once midway ----------
def _pausing(pause, at: int):
    calls = []

    def hook(*_) -> bool:
        calls.append(None)
        if len(calls) == at:
            pause()
        return False
    return hook


def _feed(rt, state, pause):  # paused between its first and second segment: memory ahead of pending
    return rt.feed(state, _ids(3 * SEGMENT + 5, 2), stop=_pausing(pause, 2))


def _feed_inside_a_segment(rt, state, pause):  # paused inside its second segment's run
    return _scripted(rt, pause_at=2, pause=pause).feed(state, _ids(3 * SEGMENT + 5, 2))


def _run(rt, state, pause):  # paused after the first of three segments
    return rt.run(_ids(3 * SEGMENT, 3), state=state, progress=_pausing(pause, 2))


def _generate_stream(rt, state, pause):  # paused between the first token and the rest
    stream = rt.generate_stream(state, _ids(10, 4), CONFIG)
    next(stream)
    pause()
    return list(stream)


MUTATORS = {"feed": _feed, "feed inside a segment": _feed_inside_a_segment, "run": _run,
            "generate_stream": _generate_stream}


# ---- every public RMTRuntime method that takes a state, as a call on one state ------------------
def _save_state(rt, state):
    path = Path(_save_state.directory) / f"state-{next(_save_state.numbers)}.npz"
    rt.save_state(state, path)
    return path


def _tokens(state, n: int, seed: int):
    """``n`` ids per row of ``state``: one sequence for batch 1, a list of rows otherwise."""
    rows = [_ids(n, seed + 100 * row) for row in range(state.batch)]
    return rows[0] if state.batch == 1 else rows


def _block(state, n: int, seed: int) -> np.ndarray:
    return np.stack([_ids(n, seed + 100 * row) for row in range(state.batch)])


READERS = {
    "stack": lambda rt, s: rt.stack([s]),
    "unstack": lambda rt, s: rt.unstack(s),
    "state_tensors": lambda rt, s: rt.state_tensors(s),
    "memory": lambda rt, s: rt.memory(s),
    "peek": lambda rt, s: rt.peek(s),
    "flush": lambda rt, s: rt.flush(s),
    "feed": lambda rt, s: rt.feed(s, _tokens(s, SEGMENT, 5)),
    "run": lambda rt, s: rt.run(_block(s, SEGMENT, 6), state=s),
    "commit_full_segments": lambda rt, s: rt.commit_full_segments(s),
    "run_segment": lambda rt, s: rt.run_segment(s, _block(s, SEGMENT, 7), np.ones((s.batch, SEGMENT), np.int64),
                                                INGEST, ("last_logits",)),
    "save_state": _save_state,
    "generate": lambda rt, s: rt.generate(_tokens(s, 5, 8), CONFIG, state=s),
    # Called while the state is held and read only afterwards: a stream that took its prompt
    # against the state at the call and held it only from its first token would read a stale state.
    "generate_stream": lambda rt, s: rt.generate_stream(s, _tokens(s, 5, 9), CONFIG),
}


def _summary(rt, value):
    """What a result says, as plain values (arrays compared bit for bit); states read in full."""
    if isinstance(value, SequenceState):
        return ("state", _summary(rt, rt.state_tensors(value)), [p.tolist() for p in value.pending],
                value.tokens_seen.tolist(), value.segments_done.tolist(),
                None if value.last_logits is None else value.last_logits.copy(), value.has_logits.tolist())
    if isinstance(value, Output):
        return ("output", _summary(rt, value.state), value.last_logits, value.logits)
    if isinstance(value, Generation):
        return ("generation", value.tokens, _summary(rt, value.state))
    if isinstance(value, Path):
        return _summary(rt, rt.restore_state(value))
    if isinstance(value, dict):
        return {name: _summary(rt, item) for name, item in value.items()}
    if isinstance(value, list):
        return [_summary(rt, item) for item in value]
    if hasattr(value, "__next__"):
        return ("tokens", [tokens.tolist() for tokens in value])
    return value


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _contended(rt, make_state, mutate, read):
    """``read`` on a state while another thread's ``mutate`` holds it, paused midway. Returns
    what the read gave (IN_USE for StateInUseError) and the state once both are done."""
    state = make_state(rt)
    paused, resume, failures = threading.Event(), threading.Event(), []

    def pause() -> None:
        paused.set()
        assert resume.wait(timeout=60)

    def holder() -> None:
        try:
            mutate(rt, state, pause)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)
            paused.set()

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert paused.wait(timeout=60)
        try:
            got = read(rt, state)
        except StateInUseError:
            got = IN_USE
    finally:
        resume.set()
        thread.join(timeout=60)
    assert not thread.is_alive() and not failures, failures
    return (got if got is IN_USE else _summary(rt, got)), _summary(rt, state)


def _sequential(rt, make_state, mutate, read):
    """(read's result, final state) for each order of the two that runs without error, and
    the state after ``mutate`` alone."""
    outcomes = []
    for read_first in (True, False):
        state = make_state(rt)
        try:
            if read_first:
                result = _summary(rt, read(rt, state))
                mutate(rt, state, lambda: None)
            else:
                mutate(rt, state, lambda: None)
                result = _summary(rt, read(rt, state))
        except RuntimeInputError:  # e.g. run continuing a state that has pending tokens
            continue
        outcomes.append((result, _summary(rt, state)))
    alone = make_state(rt)
    mutate(rt, alone, lambda: None)
    return outcomes, _summary(rt, alone)


def _assert_refused_or_one_order(rt, make_state, mutate, read, what: str) -> None:
    outcomes, mutated_alone = _sequential(rt, make_state, mutate, read)
    assert outcomes, "no order of the two runs: the test would prove nothing"
    got, final = _contended(rt, make_state, mutate, read)
    if got is IN_USE:  # refused: the call changed nothing, the holder finished as if alone
        assert _same(final, mutated_alone), f"{what}: the refused call changed the state"
    else:
        assert any(_same((got, final), outcome) for outcome in outcomes), (
            f"{what} gave a result neither order gives")


@pytest.mark.parametrize("mutator", sorted(MUTATORS))
@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_state_held_midway_is_refused_or_read_as_one_order(rt, tmp_path, reader, mutator):
    _save_state.directory, _save_state.numbers = tmp_path, iter(range(1000))
    _assert_refused_or_one_order(rt, _make_state, MUTATORS[mutator], READERS[reader], f"{reader} during {mutator}")


@pytest.mark.parametrize("reader", sorted(READERS))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(length=st.integers(min_value=SEGMENT, max_value=4 * SEGMENT + 15), batch=st.integers(min_value=1, max_value=3),
       at=st.integers(min_value=1, max_value=4))
def test_any_pause_inside_any_feed_is_refused_or_read_as_one_order(rt, tmp_path, reader, length, batch, at):
    """Feeds of any length and batch, paused inside any of their segments' runs."""
    at = min(at, length // SEGMENT)
    _save_state.directory, _save_state.numbers = tmp_path, iter(range(1000))

    def make_state(rt):
        state = rt.new_state(batch)
        rt.feed(state, _tokens(state, SEGMENT, 40))
        return state

    def mutate(rt, state, pause):  # rows of different lengths: some rows sit out some segments
        rows = [_ids(max(1, length - 7 * row), 50 + row) for row in range(batch)]
        return _scripted(rt, pause_at=at, pause=pause).feed(state, rows if batch > 1 else rows[0])
    _assert_refused_or_one_order(rt, make_state, mutate, READERS[reader],
                                 f"{reader} during a feed of {length} tokens x {batch} paused in segment {at}")


def test_every_public_method_taking_a_state_holds_it_and_is_tested_here():
    """A new public method that takes a state must go through ``_holding_states`` and be added
    to READERS, or this fails."""
    exempt = {"check_state": "reads only the bundle identity and the buffer shapes, fixed for a state's life",
              "new_state": "its `state` is a mapping of arrays to start from, not a SequenceState"}
    taking = set()
    for name, method in inspect.getmembers(RMTRuntime, inspect.isfunction):
        parameters = inspect.signature(method).parameters.values()
        if not name.startswith("_") and any("SequenceState" in str(p.annotation) or p.name in ("state", "states")
                                            for p in parameters):
            taking.add(name)
    assert taking - set(exempt) == set(READERS)
    for name in READERS:
        assert getattr(RMTRuntime, name).holds_states, name


# ---- the mechanism's edges ------------------------------------------------------------------
def test_stack_takes_all_its_states_or_none(rt):
    free, held = _make_state(rt), _make_state(rt)
    stream = rt.generate_stream(held, _ids(5, 10), CONFIG)
    with pytest.raises(StateInUseError):
        rt.stack([free, held])
    with pytest.raises(StateInUseError):
        rt.stack([held, free])
    rt.feed(free, _ids(3, 11))  # given back when the other one was refused
    stream.close()
    twice = rt.stack([free, free])  # the same state twice is taken once
    first, second = rt.unstack(twice)
    assert _same(_summary(rt, first), _summary(rt, free)) and _same(_summary(rt, second), _summary(rt, free))


def test_a_stream_holds_its_state_from_the_call_until_it_ends_fails_or_is_dropped(rt):
    state = _make_state(rt)
    stream = rt.generate_stream(state, _ids(5, 12), CONFIG)  # not started: held already
    with pytest.raises(StateInUseError):
        rt.memory(state)
    stream.close()
    rt.memory(state)
    assert list(stream) == []  # closed: nothing more, the state is not taken again

    stream = rt.generate_stream(state, _ids(5, 13), CONFIG)
    next(stream)
    del stream
    gc.collect()
    rt.memory(state)  # a stream dropped midway gives its state back

    assert len(list(rt.generate_stream(state, _ids(5, 14), CONFIG))) == CONFIG.max_new_tokens
    rt.memory(state)  # exhausted: given back

    with pytest.raises(RuntimeInputError, match="outside the vocabulary"):
        rt.generate_stream(state, [1, VOCAB], CONFIG)
    rt.memory(state)  # refused at the call: never taken


def test_the_generation_layer_refuses_a_state_its_caller_does_not_hold(rt):
    state = _make_state(rt)
    with pytest.raises(RuntimeInputError, match="generate_tokens reads and writes a state its caller holds"):
        generate_tokens(rt, state, _ids(5, 21), CONFIG)
    assert not state.in_use and int(state.tokens_seen[0]) == 2 * SEGMENT


def test_repr_of_a_held_state_says_so_instead_of_reading_it(rt):
    state = _make_state(rt)
    assert repr(state).startswith("SequenceState(batch=1, state=['memory'], tokens_seen=[32], segments_done=[2]")
    stream = rt.generate_stream(state, _ids(5, 15), CONFIG)
    assert repr(state) == "SequenceState(batch=1, in use)"
    stream.close()


# ---- an operation that fails midway leaves a consistent state ----------------------------------
def test_a_segment_whose_new_state_is_not_finite_leaves_the_state_as_it_was(rt):
    faulty, ids = _scripted(rt, nan_at=1), _ids(40, 16)
    state = faulty.new_state()
    before = faulty.memory(state)
    with pytest.raises(RuntimeInputError, match=r"holds NaN or Inf in row\(s\) \[0\] after segment 1$"):
        faulty.feed(state, ids)
    assert int(state.segments_done[0]) == 0 and state.pending[0].tolist() == ids.tolist()
    assert _same(faulty.memory(state), before)
    flushed = rt.flush(state)  # every token still pending: the input finishes exactly
    expected = rt.run(ids)
    assert _same(flushed.memory, expected.memory) and _same(flushed.last_logits, expected.last_logits)


def test_a_run_that_fails_midway_leaves_counters_that_agree_with_memory(rt):
    faulty, ids = _scripted(rt, fail_at=2), _ids(3 * SEGMENT, 17)
    state = faulty.new_state()
    with pytest.raises(BackendError, match="scripted failure of run 2"):
        faulty.run(ids, state=state)
    assert int(state.segments_done[0]) == 1 and int(state.tokens_seen[0]) == SEGMENT
    assert _same(rt.memory(state), rt.run(ids[:SEGMENT]).memory)


def test_a_generation_that_fails_reading_its_prompt_keeps_the_prompt_pending(rt):
    faulty, prompt = _scripted(rt, fail_at=2), _ids(2 * SEGMENT + 8, 18)
    state = faulty.new_state()
    with pytest.raises(BackendError, match="scripted failure of run 2"):
        faulty.generate(prompt, CONFIG, state=state)
    assert int(state.segments_done[0]) == 1 and int(state.tokens_seen[0]) == len(prompt)
    assert state.pending[0].tolist() == prompt[SEGMENT:].tolist()
    flushed, expected = rt.flush(state), rt.run(prompt)
    assert _same(flushed.memory, expected.memory) and _same(flushed.last_logits, expected.last_logits)


def test_a_stream_that_fails_gives_its_state_back(rt):
    faulty = _scripted(rt, fail_at=3)  # prefill, one decode, then the failing decode
    state = faulty.new_state()
    stream = faulty.generate_stream(state, _ids(5, 19), CONFIG)
    with pytest.raises(BackendError, match="scripted failure of run 3"):
        list(stream)
    rt.feed(state, _ids(3, 20))
