"""Generation at its boundaries: contexts one token past a segment, rows rolling over at
different steps, the position limit without rollover reached exactly, no work after the last
token, and each refusal word for word; the penalty and the sampler's last draw."""
import json
import shutil

import numpy as np
import pytest

from rmt_model.generation import generate_reference
from rmt_runtime import GenerationConfig, RMTRuntime, RuntimeInputError
from rmt_runtime.generation import choose_tokens, penalized

VOCAB, SEGMENT = 97, 16


@pytest.fixture(scope="module")
def generator(bundle_factory):
    model, result = bundle_factory("gpt2", initializer_range=0.2)  # varied tokens: see test_generation.py
    return model, RMTRuntime.load(result.path, backend="onnxruntime")


def prompt(length, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, length).tolist()


@pytest.mark.parametrize("length", [1, 17, 33])  # one token past 0, 1 and 2 full segments
@pytest.mark.parametrize("rollover", [True, False])
def test_a_context_one_token_past_a_segment_boundary_generates_as_the_reference(generator, length, rollover):
    model, rt = generator
    expected = generate_reference(model, prompt(length, seed=length), 12, rollover=rollover)
    got = rt.generate(prompt(length, seed=length), GenerationConfig(max_new_tokens=12, rollover=rollover))
    assert got.tokens[0] == expected


def test_rows_rolling_over_at_different_steps_equal_each_row_alone(generator):
    _, rt = generator
    prompts = [prompt(14, seed=1), prompt(3, seed=2)]  # the first fills its segment after 3 tokens
    config = GenerationConfig(max_new_tokens=10)
    together = rt.generate(prompts, config)
    for row, ids in enumerate(prompts):
        alone = rt.generate(ids, config)
        assert together.tokens[row] == alone.tokens[0], row
        np.testing.assert_allclose(rt.memory(together.state)[row], rt.memory(alone.state)[0], rtol=0, atol=1e-5)


def test_without_rollover_the_position_limit_may_be_reached_exactly(generator):
    _, rt = generator
    limit = rt.bundle.manifest["max_positions"]
    room = limit - rt.bundle.num_mem_tokens - SEGMENT
    got = rt.generate(prompt(SEGMENT), GenerationConfig(max_new_tokens=room, rollover=False))
    assert len(got.tokens[0]) == room
    with pytest.raises(RuntimeInputError) as info:
        rt.generate(prompt(SEGMENT), GenerationConfig(max_new_tokens=room + 1, rollover=False))
    assert str(info.value) == (f"without rollover the context grows to 4 memory + 16 context + {room + 1} new tokens, "
                               f"past the backbone's {limit} positions: lower max_new_tokens or keep rollover on")


def test_nothing_runs_after_the_last_token(generator):
    """The last token fills the segment: it stays pending (a later feed or flush writes it)."""
    _, rt = generator
    state = rt.new_state()
    rt.generate(prompt(SEGMENT), GenerationConfig(max_new_tokens=1), state=state)
    assert state.segments_done.tolist() == [0] and len(state.pending[0]) == SEGMENT + 1
    assert state.tokens_seen.tolist() == [SEGMENT + 1]


def test_refusals_word_for_word(generator, tmp_path):
    _, rt = generator
    with pytest.raises(RuntimeInputError) as info:
        rt.generate([[1, 2], []])
    assert str(info.value) == ("rows [1] have no context to generate from: give each row a prompt of at least one "
                               "token (or pending tokens in its state)")
    with pytest.raises(RuntimeInputError) as info:
        rt.generate([1, 2], GenerationConfig(use_cache=False, rollover=False))
    assert str(info.value) == ("use_cache=False recomputes the segment with the prefill graph, which takes at most "
                               "segment_size tokens: it needs rollover")
    copy = tmp_path / "no-generation"
    shutil.copytree(rt.bundle.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for graph in ("prefill", "decode"):
        del manifest["graphs"][graph]
        del manifest["files"][f"{graph}.onnx"]
        (copy / f"{graph}.onnx").unlink()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    bare = RMTRuntime.load(copy, backend="onnxruntime")
    with pytest.raises(RuntimeInputError) as info:
        bare.generate([1, 2])
    assert str(info.value) == (f"bundle {bare.bundle.path} has no prefill/decode graphs (exported with "
                               "--no-generation or by an older rmt-export); re-export it to generate")


def test_the_penalty_is_applied_in_float64_whatever_its_value():
    logits = np.array([[2.0, -2.0, 1.0, 3.0]], np.float32)
    for penalty in (2.0, 0.5):
        got = penalized(logits, [np.array([0, 1, 1])], penalty)
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, [[2.0 / penalty, -2.0 * penalty, 1.0, 3.0]])
    assert penalized(logits, [np.array([0])], 1.0).dtype == np.float64


class TopOfTheRange:
    """A generator whose draw is the largest float below 1 (numpy's Generator.random() can return it)."""

    def random(self):
        return float(np.nextafter(1.0, 0.0))


def test_a_draw_past_the_rounded_cumulative_probability_takes_the_last_token():
    # These probabilities sum to 0.9999999999999998 in float64: a draw above that is the last token.
    values = np.array([[-0.45772582566733916, 0.2201951234700494, -1.009618183538736, -0.20917557487171307,
                        -0.15922500991447772, 0.5408455846858077, 0.2146591225063409]])
    chosen = choose_tokens(values, [np.zeros(0, np.int64)], GenerationConfig(temperature=1.0), TopOfTheRange())
    assert chosen.tolist() == [int(np.argsort(-values[0], kind="stable")[-1])]


def test_feed_reports_progress_per_segment(generator):
    _, rt = generator
    calls = []
    rt.feed(rt.new_state(), prompt(3 * SEGMENT + 5), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]
    calls.clear()
    rt.feed(rt.new_state(), prompt(5), progress=lambda done, total: calls.append((done, total)))
    assert calls == []  # no full segment: nothing to report
