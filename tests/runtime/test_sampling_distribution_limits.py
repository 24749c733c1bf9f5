"""The sampler at its limits: logits too large to exponentiate, temperatures that overflow,
ties under top_k, and top_p = 1 keeping every token however unlikely."""
import warnings

import numpy as np
import pytest

from rmt_runtime.generation import GenerationConfig, choose_tokens, sampling_distribution


def test_large_logits_give_their_softmax_not_nan():
    """exp(1000) overflows: the distribution is computed from logits shifted by their maximum."""
    order, probs = sampling_distribution(np.array([1000.0, 999.0, 990.0]), GenerationConfig(temperature=1.0))
    expected = np.exp([0.0, -1.0, -10.0]) / np.exp([0.0, -1.0, -10.0]).sum()
    assert order.tolist() == [0, 1, 2]
    np.testing.assert_allclose(probs, expected, rtol=1e-12)
    rows = np.tile([1000.0, 999.0], (2000, 1))
    drawn = choose_tokens(rows, [np.zeros(0, np.int64)] * 2000, GenerationConfig(temperature=1.0),
                          np.random.default_rng(0))
    assert abs(drawn.mean() - expected[1] / (expected[0] + expected[1])) < 0.03


def test_a_tiny_temperature_is_greedy_without_a_floating_point_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        order, probs = sampling_distribution(np.array([0.5, 2.0, 1.0]), GenerationConfig(temperature=1e-310))
    assert order.tolist() == [1, 2, 0] and probs.tolist() == [1.0, 0.0, 0.0]


def test_ties_keep_the_lower_token_ids_first():
    """top_k among equal logits keeps the lowest ids (a stable order), whatever the vocabulary size."""
    values = np.tile([1.0, 0.0], 500)
    order, probs = sampling_distribution(values, GenerationConfig(temperature=1.0, top_k=3))
    assert order.tolist() == [0, 2, 4]
    np.testing.assert_allclose(probs, [1 / 3] * 3)


@pytest.mark.parametrize("top_k", [0, 3])
def test_top_p_one_keeps_every_token_however_unlikely(top_k):
    """top_p = 1 is off: tokens whose probability rounds away in the cumulative sum stay."""
    values = np.array([0.0, -50.0, -100.0, -200.0])
    order, probs = sampling_distribution(values, GenerationConfig(temperature=1.0, top_p=1.0, top_k=top_k))
    assert order.tolist() == [0, 1, 2, 3][:top_k or 4]
    assert probs[1] == pytest.approx(np.exp(-50.0), rel=1e-9)
