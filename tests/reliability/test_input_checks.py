"""Wrong results without an error, and operations that fail half-way: each is refused
before any work, or finishes consistently (docs/RELIABILITY.md)."""
import threading

import numpy as np
import pytest

from rmt_runtime import GenerationConfig, RMTRuntime, RuntimeInputError
from rmt_runtime.errors import StateInUseError

VOCAB = 97


@pytest.fixture(scope="module")
def rt(bundle_factory):
    return RMTRuntime.load(bundle_factory("gpt2", "fp32")[1].path)


def _ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


@pytest.mark.parametrize("mask, message", [
    (np.array([[1, 1, 0.5, 0]]), "attention_mask must be integer or boolean 0/1, got dtype float64"),
    (np.array([[1, 1, 0, 0], [0, 0, 0, 0]]), r"rows \[1\] of attention_mask have no tokens"),
    (np.array([[0, 0, 1, 1]]), r"rows \[0\] of attention_mask are not right-padded"),
    (np.array([[1, 0, 1, 1]]), r"rows \[0\] of attention_mask are not right-padded"),
    (np.array([[1, 2, 1, 1]]), "attention_mask must hold only 0 and 1"),
])
def test_masks_that_would_compute_something_else_are_refused(rt, mask, message):
    ids = np.tile(_ids(4), (mask.shape[0], 1))
    with pytest.raises(RuntimeInputError, match=message):
        rt.run(ids, mask)


def test_a_boolean_mask_is_a_mask(rt):
    ids = np.stack([_ids(40, 1), _ids(40, 2)])
    mask = np.ones((2, 40), bool)
    mask[1, 25:] = False
    out = rt.run(ids, mask)
    np.testing.assert_array_equal(out.memory[1], rt.run(ids[1, :25]).memory[0])


def test_a_state_used_from_a_second_thread_meanwhile_is_an_error(rt):
    state = rt.new_state()
    errors, tried = [], threading.Event()

    def second_thread():
        try:
            rt.feed(state, _ids(5, 9))
        except StateInUseError as exc:
            errors.append(exc)
        finally:
            tried.set()

    def stop() -> bool:  # asked between segments, while the first thread holds the state
        if not tried.is_set():
            threading.Thread(target=second_thread).start()
            tried.wait(timeout=60)
        return False

    assert rt.feed(state, _ids(64, 3), stop=stop)
    assert len(errors) == 1 and "belongs to one thread at a time" in str(errors[0])
    assert int(state.tokens_seen[0]) == 64  # the refused feed added nothing
    rt.feed(state, _ids(5, 9))  # free again once the first operation ended


def test_after_a_stopped_feed_peek_and_flush_finish_the_input(rt):
    ids = _ids(100, 4)
    state = rt.new_state()
    assert rt.feed(state, ids, stop=lambda: True) is False  # stopped before its first segment
    assert len(state.pending[0]) == 100
    expected = rt.run(ids)
    peeked = rt.peek(state)
    np.testing.assert_array_equal(peeked.memory, expected.memory)
    assert len(state.pending[0]) == 100 and int(state.segments_done[0]) == 0  # peek committed nothing
    flushed = rt.flush(state)
    np.testing.assert_array_equal(flushed.memory, expected.memory)
    np.testing.assert_array_equal(flushed.last_logits, expected.last_logits)


@pytest.mark.parametrize("config, message", [
    (GenerationConfig(seed=-1), "seed must be None or an int >= 0, got -1"),
    (GenerationConfig(temperature=float("nan")), "temperature must be a finite number"),
    (GenerationConfig(max_new_tokens=True), "max_new_tokens must be an int >= 1"),
    (GenerationConfig(stop_tokens=5), "stop_tokens must be a tuple of int token ids"),
])
def test_bad_generation_settings_leave_the_state_untouched(rt, config, message):
    state = rt.new_state()
    before = rt.memory(state)
    with pytest.raises(RuntimeInputError, match=message):
        rt.generate(_ids(40, 5), config, state=state)
    assert int(state.tokens_seen[0]) == 0 and int(state.segments_done[0]) == 0
    np.testing.assert_array_equal(rt.memory(state), before)


def test_a_vanishing_temperature_samples_the_top_token_not_nan(rt):
    prompt = _ids(20, 6)
    greedy = rt.generate(prompt, GenerationConfig(max_new_tokens=6)).tokens
    tiny = rt.generate(prompt, GenerationConfig(max_new_tokens=6, temperature=1e-310, seed=0)).tokens
    assert tiny == greedy


def test_ids_too_large_for_int64_are_named_as_they_are(rt):
    ids = np.array([3, np.iinfo(np.uint64).max], np.uint64)
    with pytest.raises(RuntimeInputError, match="token id 18446744073709551615"):
        rt.run(ids)
    with pytest.raises(RuntimeInputError, match="token id 18446744073709551615"):
        rt.feed(rt.new_state(), ids)
