"""Property-based: any token stream, chunking, batch composition and save/restore point gives
what the one-shot reference gives, for a decoder (left-aligned segments) and an encoder
(right-aligned segments, class logits of the last one)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmt_runtime import RMTRuntime

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Ids from 4: an encoder's framing ids (pad, cls, sep) stay out of the text, as in a tokenized document.
streams = st.lists(st.integers(min_value=4, max_value=96), min_size=1, max_size=120)


@pytest.fixture(scope="module", params=["gpt2", "bert"])
def runtime(request, bundle_factory):
    return RMTRuntime.load(bundle_factory(request.param, "fp32")[1].path)


def one_shot(runtime, ids):
    """The whole stream fed at once, then flushed (for a decoder also what run() gives)."""
    state = runtime.new_state()
    runtime.feed(state, ids)
    return runtime.flush(state)


@SETTINGS
@given(tokens=streams, cuts=st.lists(st.integers(min_value=0, max_value=120), max_size=8))
def test_any_chunking_equals_one_shot(runtime, tokens, cuts):
    ids = np.array(tokens, np.int64)
    expected = one_shot(runtime, ids)
    if runtime.kind == "decoder":  # a stream is the same as run() for a decoder
        np.testing.assert_array_equal(runtime.run(ids).memory, expected.memory)
    state = runtime.new_state()
    for chunk in np.split(ids, sorted(set(c for c in cuts if c < len(ids)))):
        runtime.feed(state, chunk)
    got = runtime.flush(state)
    np.testing.assert_array_equal(got.memory, expected.memory)
    np.testing.assert_array_equal(got.last_logits, expected.last_logits)


@SETTINGS
@given(batch=st.lists(streams, min_size=1, max_size=4), split=st.integers(min_value=0, max_value=120))
def test_any_batch_composition_equals_each_stream_alone(runtime, batch, split):
    """Rows of different lengths fed together, in two feeds: each row equals that stream alone
    (1e-5: the batched matmuls have other shapes; measured differences are ~1e-7)."""
    state = runtime.new_state(len(batch))
    runtime.feed(state, [np.array(s[:split], np.int64) for s in batch])
    runtime.feed(state, [np.array(s[split:], np.int64) for s in batch])
    together = runtime.flush(state)
    for row, tokens in enumerate(batch):
        alone = one_shot(runtime, np.array(tokens, np.int64))
        np.testing.assert_allclose(together.memory[row], alone.memory[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(together.last_logits[row], alone.last_logits[0], rtol=0, atol=1e-5)


@SETTINGS
@given(rows=st.lists(st.tuples(streams, st.integers(min_value=0, max_value=120)), min_size=1, max_size=3))
def test_save_and_restore_at_any_point_is_bit_identical(runtime, rows, tmp_path_factory):
    """A batch saved with each row at its own point (nothing pending, a partial segment, several
    segments; the whole row, so that nothing new follows), restored, and continued equals the
    batch never saved, in peek and flush alike."""
    streams_ = [np.array(tokens, np.int64) for tokens, _ in rows]
    points = [min(point, len(tokens)) for tokens, point in rows]
    saved, kept = runtime.new_state(len(rows)), runtime.new_state(len(rows))
    for state in (saved, kept):
        runtime.feed(state, [ids[:p] for ids, p in zip(streams_, points)])
    path = runtime.save_state(saved, tmp_path_factory.mktemp("state") / "s.npz")
    restored = runtime.restore_state(path)
    for state in (restored, kept):
        runtime.feed(state, [ids[p:] for ids, p in zip(streams_, points)])
    for read in (runtime.peek, runtime.flush):
        got, expected = read(restored), read(kept)
        np.testing.assert_array_equal(got.memory, expected.memory)
        np.testing.assert_array_equal(got.last_logits, expected.last_logits)
