"""stack carries every row's last logits (zeros and has_logits False for rows without any, in
float32), and refuses anything but a non-empty sequence of states."""
import numpy as np
import pytest

from rmt_runtime import RMTRuntime, RuntimeInputError


@pytest.fixture(scope="module")
def rt(bundle_factory):
    return RMTRuntime.load(bundle_factory("gpt2", "fp32")[1].path)


def test_stacked_rows_keep_their_logits_and_rows_without_get_zeros(rt):
    fed, fresh, other = rt.new_state(), rt.new_state(), rt.new_state()
    rt.feed(fed, np.arange(20) % 97)      # one segment run: logits
    rt.feed(other, np.arange(35) % 97)    # two segments
    stacked = rt.stack([fed, fresh, other])
    assert stacked.last_logits.dtype == np.float32 and stacked.last_logits.shape == (3, 97)
    np.testing.assert_array_equal(stacked.last_logits[0], fed.last_logits[0])
    np.testing.assert_array_equal(stacked.last_logits[1], np.zeros(97, np.float32))
    np.testing.assert_array_equal(stacked.last_logits[2], other.last_logits[0])
    assert stacked.has_logits.tolist() == [True, False, True]
    # Read out with nothing new to run: each row's own logits, as float32.
    out = rt.peek(stacked)
    assert out.last_logits.dtype == np.float32
    np.testing.assert_allclose(out.last_logits[0], rt.peek(fed).last_logits[0], rtol=0, atol=1e-5)


def test_states_without_logits_stack_to_a_state_without_logits(rt):
    stacked = rt.stack([rt.new_state(), rt.new_state(2)])
    assert stacked.last_logits is None and stacked.batch == 3
    assert rt.flush(stacked).last_logits is None


@pytest.mark.parametrize("states", [[], (), None, 5])
def test_stack_needs_a_non_empty_sequence_of_states(rt, states):
    with pytest.raises(RuntimeInputError, match="stack needs a non-empty sequence of states"):
        rt.stack(states)


def test_a_single_state_or_a_generator_of_states_is_refused(rt):
    state = rt.new_state()
    with pytest.raises(RuntimeInputError, match="stack needs a non-empty sequence of states"):
        rt.stack(state)
    with pytest.raises(RuntimeInputError, match="stack needs a non-empty sequence of states"):
        rt.stack(s for s in [state, rt.new_state()])
