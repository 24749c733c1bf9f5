"""Wrong results without an error, and operations that fail half-way: each is refused
before any work, or finishes consistently (docs/RELIABILITY.md)."""
import threading

import numpy as np
import pytest

from rmt_runtime import GenerationConfig, RMTRuntime, RuntimeInputError
from rmt_runtime.errors import BundleError, StateError, StateInUseError

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
    # The same graph, batch shape and threads as the integer mask: equal bit for bit.
    np.testing.assert_array_equal(out.memory, rt.run(ids, mask.astype(np.int64)).memory)
    # The padded row against the row alone: another batch shape can take another kernel (on an
    # AVX2-only CPU 1 element of 128 differed), so within the batch-composition bound (RELIABILITY.md).
    np.testing.assert_allclose(out.memory[1], rt.run(ids[1, :25]).memory[0], rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("settings, message", [
    (dict(seed=-1), "seed must be None or an int >= 0, got -1"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(max_new_tokens=True), "max_new_tokens must be an int >= 1"),
    (dict(max_new_tokens="3"), "max_new_tokens must be an int >= 1, got '3'"),
    (dict(top_p=2.0), r"top_p must be in \(0, 1\], got 2.0"),
    (dict(stop_tokens=5), "stop_tokens must be a tuple of int token ids"),
    (dict(stop_tokens=(-3,)), r"stop tokens \[-3\] are outside the vocabulary"),
])
def test_bad_generation_settings_fail_when_made_and_leave_a_state_untouched(rt, settings, message):
    with pytest.raises(RuntimeInputError, match=message):
        GenerationConfig(**settings)
    forged = GenerationConfig()  # a config changed behind the constructor's back is still refused
    for name, value in settings.items():
        object.__setattr__(forged, name, value)
    state = rt.new_state()
    before = rt.memory(state)
    with pytest.raises(RuntimeInputError, match=message):
        rt.generate(_ids(40, 5), forged, state=state)
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


# Every public call with an argument of the wrong kind: a typed error naming the argument, what
# it got and what it expects (never a TypeError/AttributeError from inside numpy or the runtime).
_MISUSE = [
    ("feed(None state)", lambda rt: rt.feed(None, [1, 2]), "state must be a SequenceState .* got NoneType"),
    ("feed(tuple of states)", lambda rt: rt.feed((rt.new_state(),), [1]), "state must be a SequenceState .* got tuple"),
    ("peek(str)", lambda rt: rt.peek("state"), "state must be a SequenceState .* got str"),
    ("flush(int)", lambda rt: rt.flush(3), "state must be a SequenceState .* got int"),
    ("memory(None)", lambda rt: rt.memory(None), "state must be a SequenceState"),
    ("state_tensors(None)", lambda rt: rt.state_tensors(None), "state must be a SequenceState"),
    ("unstack(None)", lambda rt: rt.unstack(None), "state must be a SequenceState"),
    ("save_state(None)", lambda rt: rt.save_state(None, "x.npz"), "state must be a SequenceState"),
    ("stack([1, 2])", lambda rt: rt.stack([1, 2]), r"states\[0\] must be a SequenceState .* got int"),
    ("stack(state)", lambda rt: rt.stack(rt.new_state()), "stack needs a non-empty sequence of states"),
    ("run(state='x')", lambda rt: rt.run([1, 2], state="x"), "state must be a SequenceState .* got str"),
    ("generate(state=5)", lambda rt: rt.generate([1, 2], state=5), "state must be a SequenceState .* got int"),
    ("generate_stream(None)", lambda rt: rt.generate_stream(None, [1]), "state must be a SequenceState"),
    ("feed(tokens=None)", lambda rt: rt.feed(rt.new_state(), None), "the sequence must be token ids .* got NoneType"),
    ("feed(batch 2, None)", lambda rt: rt.feed(rt.new_state(2), None), "the sequences must be token ids .* got NoneType"),
    ("feed(stop=5)", lambda rt: rt.feed(rt.new_state(), [1], stop=5), "stop must be a callable or None, got 5"),
    ("feed(progress='x')", lambda rt: rt.feed(rt.new_state(), [1], progress="x"), "progress must be a callable"),
    ("generate(None)", lambda rt: rt.generate(None), "prompts must be token ids .* got NoneType"),
    ("generate(config=dict)", lambda rt: rt.generate([1], {"max_new_tokens": 3}),
     "config must be a GenerationConfig, got dict"),
    ("run(ragged rows)", lambda rt: rt.run([[1, 2], [3]]), "input_ids rows have different lengths: pad them"),
    ("run(return_logits='yes')", lambda rt: rt.run([1, 2], return_logits="yes"),
     "return_logits must be True or False, got 'yes'"),
    ("new_state(state=[1])", lambda rt: rt.new_state(1, state=[1]), "state must be a mapping .* got list"),
    ("new_state(10**9)", lambda rt: rt.new_state(10**9), r"batch must be an int in 1\.\.65536 .*got 1000000000"),
    ("save_state(path=5)", lambda rt: rt.save_state(rt.new_state(), 5),
     "the state file path must be a file system path .* got 5"),
    ("restore_state(path=None)", lambda rt: rt.restore_state(None), "the state file path must be a file system path"),
]


@pytest.mark.parametrize("call, message", [(c, m) for _, c, m in _MISUSE], ids=[name for name, _, _ in _MISUSE])
def test_every_public_call_names_a_wrong_argument(rt, call, message):
    with pytest.raises(RuntimeInputError, match=message):
        call(rt)


def test_a_state_of_another_bundle_is_refused_by_name(rt, bundle_factory):
    other = RMTRuntime.load(bundle_factory("llama", "fp32")[1].path)
    foreign = other.new_state()
    with pytest.raises(RuntimeInputError, match="a state of another bundle"):
        rt.feed(foreign, [1, 2])
    assert int(foreign.tokens_seen[0]) == 0


def test_a_bundle_path_of_the_wrong_kind_is_a_bundle_error():
    with pytest.raises(BundleError, match="the bundle path must be a file system path .* got 5"):
        RMTRuntime.load(5)


@pytest.mark.parametrize("where, message", [
    (lambda tmp: tmp, "is a directory; give the path of a file"),
    (lambda tmp: tmp / "plain.txt" / "state.npz", "plain.txt is not a directory"),
])
def test_saving_where_a_file_cannot_be_is_a_state_error(rt, tmp_path, where, message):
    (tmp_path / "plain.txt").write_text("keep")
    with pytest.raises(StateError, match=message):
        rt.save_state(rt.new_state(), where(tmp_path))
    assert (tmp_path / "plain.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt"]  # no temporary left behind


@pytest.mark.parametrize("batch", [0, -2])
def test_a_batch_below_one_is_refused_naming_it(rt, batch):
    with pytest.raises(RuntimeInputError, match=rf"batch must be an int >= 1, got {batch}$"):
        rt.new_state(batch)


def test_a_state_whose_buffers_are_not_this_backends_is_refused(rt):
    state = rt.new_state()
    state.handles = {name: handle.tolist() if hasattr(handle, "tolist") else [0.0] for name, handle in
                     ((n, rt.runner.to_host(h)) for n, h in state.handles.items())}
    with pytest.raises(RuntimeInputError, match="state holds buffers of another backend: a state belongs to the "
                                                "runtime that made it"):
        rt.feed(state, _ids(3))


def test_a_fresh_state_counts_segments_in_integers_and_its_file_restores(rt, tmp_path):
    """Counters stay int64 from new_state through a state file and back (a float counter
    would be written to the file as float64)."""
    state = rt.new_state(2)
    assert state.segments_done.dtype == state.tokens_seen.dtype == np.int64
    rt.save_state(state, tmp_path / "fresh.npz")
    restored = rt.restore_state(tmp_path / "fresh.npz")
    assert restored.segments_done.dtype == restored.tokens_seen.dtype == np.int64
    with np.load(tmp_path / "fresh.npz") as members:
        assert {members[name].dtype for name in members.files if "segments" in name or "tokens_seen" in name} \
            == {np.dtype(np.int64)}
