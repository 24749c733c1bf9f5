"""Property-based: any token stream, chunking, batch composition and save/restore point gives
what the one-shot reference gives."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmt_runtime import RMTRuntime

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
streams = st.lists(st.integers(min_value=0, max_value=96), min_size=1, max_size=120)


@pytest.fixture(scope="module")
def runtime(bundle_factory):
    return RMTRuntime.load(bundle_factory("gpt2", "fp32")[1].path)


@SETTINGS
@given(tokens=streams, cuts=st.lists(st.integers(min_value=0, max_value=120), max_size=8))
def test_any_chunking_equals_one_shot(runtime, tokens, cuts):
    ids = np.array(tokens, np.int64)
    expected = runtime.run(ids)
    state = runtime.new_state()
    for chunk in np.split(ids, sorted(set(c for c in cuts if c < len(ids)))):
        runtime.feed(state, chunk)
    got = runtime.flush(state)
    np.testing.assert_array_equal(got.memory, expected.memory)
    np.testing.assert_array_equal(got.last_logits, expected.last_logits)


@SETTINGS
@given(batch=st.lists(streams, min_size=1, max_size=4))
def test_any_batch_composition_equals_each_stream_alone(runtime, batch):
    state = runtime.new_state(len(batch))
    runtime.feed(state, [np.array(s, np.int64) for s in batch])
    together = runtime.flush(state)
    for row, tokens in enumerate(batch):
        alone = runtime.run(np.array(tokens, np.int64))
        np.testing.assert_allclose(together.memory[row], alone.memory[0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(together.last_logits[row], alone.last_logits[0], rtol=0, atol=1e-5)


@SETTINGS
@given(tokens=streams, point=st.integers(min_value=0, max_value=120))
def test_save_and_restore_at_any_point_is_bit_identical(runtime, tokens, point, tmp_path_factory):
    ids = np.array(tokens, np.int64)
    point = min(point, len(ids))
    state = runtime.new_state()
    runtime.feed(state, ids[:point])
    path = runtime.save_state(state, tmp_path_factory.mktemp("state") / "s.npz")
    restored = runtime.restore_state(path)
    runtime.feed(restored, ids[point:])
    np.testing.assert_array_equal(runtime.flush(restored).memory, runtime.run(ids).memory)
