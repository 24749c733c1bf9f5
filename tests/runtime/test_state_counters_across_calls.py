"""A state's counters and logits carried across calls: generating after feeding keeps counting,
an encoder's class logits survive save and restore, and generate_stream names a wrong config."""
import numpy as np
import pytest

from rmt_runtime import RMTRuntime, RuntimeInputError
from rmt_runtime.generation import GenerationConfig


def test_generating_after_feeding_counts_every_token(bundle_factory):
    rt = RMTRuntime.load(bundle_factory("gpt2", "fp32")[1].path)
    state = rt.new_state()
    rt.feed(state, np.arange(20) % 97)
    assert state.tokens_seen.tolist() == [20]
    generation = rt.generate([5, 6, 7], GenerationConfig(max_new_tokens=4), state=state)
    assert len(generation.tokens[0]) == 4
    assert state.tokens_seen.tolist() == [20 + 3 + 4]
    assert sum(len(p) for p in state.pending) + 16 * int(state.segments_done[0]) == 27


def test_an_encoders_class_logits_survive_save_and_restore(bundle_factory, tmp_path):
    rt = RMTRuntime.load(bundle_factory("bert", "fp32")[1].path)
    state = rt.new_state(2)
    rt.feed(state, [np.arange(4, 40) % 90 + 4, np.arange(4, 24) % 90 + 4])
    assert state.last_logits.shape == (2, rt.bundle.manifest["num_labels"])
    rt.save_state(state, tmp_path / "s.npz")
    restored = rt.restore_state(tmp_path / "s.npz")
    np.testing.assert_array_equal(restored.last_logits, state.last_logits)
    assert restored.has_logits.tolist() == state.has_logits.tolist() == [True, True]
    np.testing.assert_array_equal(rt.flush(restored).last_logits, rt.flush(state).last_logits)


def test_generate_stream_names_a_config_of_another_type(bundle_factory):
    rt = RMTRuntime.load(bundle_factory("gpt2", "fp32")[1].path)
    with pytest.raises(RuntimeInputError) as info:
        rt.generate_stream(rt.new_state(), [1, 2], config={"max_new_tokens": 2})
    assert str(info.value) == "config must be a GenerationConfig, got dict"
