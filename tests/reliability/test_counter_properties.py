"""A state's counters after ANY sequence of entry points (issue 30, blind spot: counters were
wrong after run() with a padded mask, and only feed paths were checked).

Random sequences of feed (rows of any length, empty ones included), run with right-padded masks,
flush, peek, generate, and save/restore, on a batch of two rows. After every call:
- tokens_seen equals the tokens each row was given (real mask positions only) plus the tokens
  generated for it;
- the counters satisfy the state file's rules (rmt_runtime.schema.check_state_counters:
  segments_done <= tokens_seen - pending <= segments_done x segment_size), so every state the
  runtime can reach is one it can save and restore;
- a save and restore gives back the same counters.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rmt_runtime import RMTRuntime
from rmt_runtime.generation import GenerationConfig
from rmt_runtime.schema import check_state_counters

VOCAB = 97

feed_op = st.tuples(st.just("feed"), st.lists(st.integers(0, 40), min_size=2, max_size=2))
run_op = st.tuples(st.just("run"), st.lists(st.integers(1, 40), min_size=2, max_size=2))
generate_op = st.tuples(st.just("generate"), st.tuples(st.lists(st.integers(1, 20), min_size=2, max_size=2),
                                                        st.integers(1, 6)))
simple_op = st.tuples(st.sampled_from(["flush", "peek", "save_restore"]), st.none())
OPERATIONS = st.lists(st.one_of(feed_op, run_op, generate_op, simple_op), min_size=1, max_size=7)


@pytest.fixture(scope="module")
def runtime(bundle_factory):
    return RMTRuntime.load(bundle_factory("gpt2", "fp32")[1].path)


def check(runtime, state, expected, where):
    lengths = np.array([len(p) for p in state.pending], np.int64)
    assert state.tokens_seen.tolist() == expected, where
    check_state_counters(where, lengths, state.tokens_seen, state.segments_done, state.has_logits,
                         runtime.segment_size)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=OPERATIONS, seed=st.integers(0, 2 ** 16))
def test_counters_hold_after_any_sequence_of_calls(runtime, tmp_path, operations, seed):
    rng = np.random.default_rng(seed)
    state = runtime.new_state(2)
    expected = [0, 0]
    for step, (name, argument) in enumerate(operations):
        where = f"after {operations[:step + 1]}"
        if name == "feed":
            rows = [rng.integers(0, VOCAB, n) for n in argument]
            runtime.feed(state, rows)
            expected = [e + n for e, n in zip(expected, argument)]
        elif name == "run":
            if any(len(p) for p in state.pending):
                runtime.flush(state)  # run continues only a state with nothing pending
            width = max(argument)
            ids = rng.integers(0, VOCAB, (2, width))
            mask = (np.arange(width)[None] < np.array(argument)[:, None]).astype(np.int64)
            runtime.run(ids, mask, state=state)
            expected = [e + n for e, n in zip(expected, argument)]
        elif name == "generate":
            lengths, new_tokens = argument
            prompts = [rng.integers(0, VOCAB, n) for n in lengths]
            generation = runtime.generate(prompts, GenerationConfig(max_new_tokens=new_tokens, seed=seed),
                                          state=state)
            expected = [e + n + len(t) for e, n, t in zip(expected, lengths, generation.tokens)]
        elif name == "flush":
            runtime.flush(state)
        elif name == "peek":
            runtime.peek(state)
        else:
            path = tmp_path / f"s{step}.npz"
            runtime.save_state(state, path)
            restored = runtime.restore_state(path)
            assert restored.tokens_seen.tolist() == state.tokens_seen.tolist(), where
            assert restored.segments_done.tolist() == state.segments_done.tolist(), where
            state = restored
        check(runtime, state, expected, where)
    path = tmp_path / "last.npz"
    runtime.save_state(state, path)
    assert runtime.restore_state(path).tokens_seen.tolist() == expected
