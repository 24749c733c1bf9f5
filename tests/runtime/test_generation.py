"""KV-cached generation through exported prefill/decode graphs against the PyTorch reference.

The tiny models here use initializer_range 0.2: at the default 0.02 a random model
repeats one token forever, which would make token-identity checks weak.
"""
import numpy as np
import pytest
import torch

from rmt_export.reference_backend import reference_runtime
from rmt_export.exporter import ExportOptions, export_model
from rmt_export.validate import ValidationPlan
from rmt_model import save_checkpoint
from rmt_model.generation import generate_reference, split_context
from rmt_runtime import GenerationConfig, RMTRuntime
from rmt_runtime.errors import BackendError, RuntimeInputError
from rmt_runtime.generation import choose_tokens, penalized, sampling_distribution

SEGMENT, MEM, VOCAB = 16, 4, 97
FAMILIES = ("gpt2", "llama")


@pytest.fixture(scope="module", params=FAMILIES)
def generator(request, bundle_factory):
    model, result = bundle_factory(request.param, initializer_range=0.2)
    return model, RMTRuntime.load(result.path, backend="onnxruntime")


def result_path(bundle_factory):
    return bundle_factory("gpt2")[1].path


def prompt(length, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, length).tolist()


def test_the_bundle_holds_validated_prefill_and_decode_graphs_with_named_cache_pairs(generator):
    _, rt = generator
    manifest = rt.bundle.manifest
    assert {"prefill", "decode"} <= set(manifest["graphs"])
    decode = rt.bundle.graph_spec("decode")
    layers = rt.bundle.manifest["rmt_config"]["backbone"].get("n_layer") or \
        rt.bundle.manifest["rmt_config"]["backbone"]["num_hidden_layers"]
    assert decode.state == {f"past.{i}.{p}": f"present.{i}.{p}" for i in range(layers) for p in ("key", "value")}
    generation = manifest["validation"]["generation"]
    assert generation["argmax_agreement"]["cached_decisive"] == 1.0
    assert max(generation["worst"].values()) < 1e-4


@pytest.mark.parametrize("length", [5, 16, 37, 64])  # 1 to 4 segments, ending inside and on a boundary
@pytest.mark.parametrize("rollover", [True, False])
def test_greedy_tokens_equal_the_pytorch_reference(generator, length, rollover):
    model, rt = generator
    new = 40 if rollover else 20  # with rollover: two or three segment rollovers
    expected = generate_reference(model, prompt(length, seed=length), new, rollover=rollover)
    got = rt.generate(prompt(length, seed=length), GenerationConfig(max_new_tokens=new, rollover=rollover))
    assert got.tokens[0] == expected
    assert not rollover or len(set(expected)) >= 3  # a varied sequence, not one token repeated


def test_reference_generation_equals_transformers_generate_from_the_same_memory(make_model):
    """rmt_model's reference mode is the reference code's generation: HF generate on [mem, last segment]."""
    for family in FAMILIES:
        model = make_model(family, initializer_range=0.2)
        ids = prompt(37, seed=3)
        commit = split_context(len(ids), model.segment_size)
        with torch.no_grad():
            memory = model.initial_memory(1)
            for start in range(0, commit, model.segment_size):
                segment = torch.tensor([ids[start:start + model.segment_size]])
                _, memory = model.step(segment, torch.ones_like(segment), memory)
            embeds = torch.cat([memory, model.model.get_input_embeddings()(torch.tensor([ids[commit:]]))], dim=1)
            hf = model.model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                      max_new_tokens=20, do_sample=False, pad_token_id=0)
        assert hf[0].tolist() == generate_reference(model, ids, 20, rollover=False), family


def test_cached_decoding_equals_recomputing_the_segment_every_token(generator):
    _, rt = generator
    prompts = [prompt(n, seed=n) for n in (3, 20, 33)]
    cached = rt.generate(prompts, GenerationConfig(max_new_tokens=50))
    recomputed = rt.generate(prompts, GenerationConfig(max_new_tokens=50, use_cache=False))
    assert cached.tokens == recomputed.tokens
    np.testing.assert_allclose(rt.memory(cached.state), rt.memory(recomputed.state), atol=1e-5)


def test_batched_prompts_of_different_lengths_equal_each_prompt_alone(generator):
    _, rt = generator
    prompts = [prompt(n, seed=n + 1) for n in (1, 16, 29, 50)]
    batched = rt.generate(prompts, GenerationConfig(max_new_tokens=40))
    for row, ids in enumerate(prompts):
        assert batched.tokens[row] == rt.generate(ids, GenerationConfig(max_new_tokens=40)).tokens[0], row


def test_prompts_from_a_generator_equal_the_same_prompts_in_a_list(generator):
    """A one-shot iterable is read once, at the start: rows are counted and read from that copy."""
    _, rt = generator
    prompts = [prompt(n, seed=n + 2) for n in (3, 21)]
    config = GenerationConfig(max_new_tokens=12)
    listed = rt.generate(prompts, config)
    rows = rt.generate((ids for ids in prompts), config)
    one = rt.generate((token for token in prompts[1]), config)  # one sequence's ids, one at a time
    assert rows.tokens == listed.tokens and len(rows.tokens) == 2 and rows.state.batch == 2
    assert one.tokens == [listed.tokens[1]]
    state = rt.new_state(2)
    streamed = [step.tolist() for step in rt.generate_stream(state, iter(prompts), config)]
    assert [list(column) for column in zip(*streamed)] == listed.tokens


def test_sampling_is_reproducible_with_a_seed_and_matches_the_reference_sampler(generator):
    model, rt = generator
    config = GenerationConfig(max_new_tokens=40, temperature=1.0, top_k=20, top_p=0.9,
                              repetition_penalty=1.2, seed=3)
    ids = prompt(40, seed=9)
    first = rt.generate(ids, config).tokens[0]
    assert rt.generate(ids, config).tokens[0] == first
    other_seed = rt.generate(ids, GenerationConfig(**{**config.__dict__, "seed": 4})).tokens[0]
    assert other_seed != first
    rng, history = np.random.default_rng(3), [np.array(ids)]

    def choose(logits):
        token = int(choose_tokens(logits.numpy()[None], history, config, rng)[0])
        history[0] = np.append(history[0], token)
        return token

    assert generate_reference(model, ids, 40, choose=choose) == first


@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("top_k", [0, 5, 40])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.4])
@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.8])
def test_the_sampling_distribution_equals_transformers_logits_processors(temperature, top_k, top_p, penalty):
    """An independent reference: transformers' own processors, in generate()'s order, on fixed
    logits (float64 both sides: the only difference left is summation order)."""
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    rng = np.random.default_rng(17)
    logits = rng.normal(0, 3, (1, VOCAB))
    history = rng.integers(0, VOCAB, 12)
    config = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    order, probs = sampling_distribution(penalized(logits, [history], penalty)[0], config)
    ours = np.zeros(VOCAB)
    ours[order] = probs
    scores, seen = torch.from_numpy(logits.copy()), torch.from_numpy(history[None])
    processors = [RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature)]
    processors += [TopKLogitsWarper(top_k)] if top_k else []
    processors += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    for processor in processors:
        scores = processor(seen, scores)
    reference = torch.softmax(scores, dim=-1)[0].numpy()
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12)
    assert (ours > 0).sum() == (reference > 0).sum()


def test_sampled_tokens_follow_the_distribution():
    """The draw itself: 20,000 draws from one distribution match its probabilities (a binomial
    4-sigma band per token: a wrong searchsorted side or an off-by-one shows at once)."""
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 1.5, (1, VOCAB))
    config = GenerationConfig(temperature=0.9, top_k=8, top_p=0.95)
    order, probs = sampling_distribution(logits[0], config)
    draws = 20_000
    counts = np.bincount([int(choose_tokens(logits, [np.zeros(0, np.int64)], config, rng)[0]) for _ in range(draws)],
                         minlength=VOCAB)
    expected = np.zeros(VOCAB)
    expected[order] = probs * draws
    assert counts[expected == 0].sum() == 0
    sigma = np.sqrt(expected * (1 - expected / draws))
    assert (np.abs(counts - expected) <= 4 * sigma + 1).all(), (counts[order], expected[order])


def test_the_state_after_generating_equals_feeding_the_whole_conversation(generator):
    """With rollover, generating is reading: the memory and pending tokens are what feeding
    prompt + generated tokens gives, so a conversation continues from the state."""
    _, rt = generator
    ids = prompt(21, seed=5)
    generated = rt.generate(ids, GenerationConfig(max_new_tokens=45))
    fed = rt.new_state()
    rt.feed(fed, ids + generated.tokens[0])
    state = generated.state
    np.testing.assert_allclose(rt.memory(state), rt.memory(fed), atol=1e-6)
    assert state.pending[0].tolist() == fed.pending[0].tolist()
    assert int(state.tokens_seen[0]) == 21 + 45 and int(state.segments_done[0]) == int(fed.segments_done[0]) == 4
    # ... and the next turn continues it exactly like a fresh state holding the whole text
    follow = prompt(7, seed=6)
    continued = rt.generate(follow, GenerationConfig(max_new_tokens=10), state=state).tokens[0]
    assert continued == rt.generate(ids + generated.tokens[0] + follow, GenerationConfig(max_new_tokens=10)).tokens[0]


def test_stop_tokens_end_each_row_on_its_own(generator):
    _, rt = generator
    prompts = [prompt(9, seed=11), prompt(30, seed=12)]
    free = rt.generate(prompts, GenerationConfig(max_new_tokens=30)).tokens
    stops = (free[0][5], free[1][8])
    stopped = rt.generate(prompts, GenerationConfig(max_new_tokens=30, stop_tokens=stops)).tokens
    for row in range(2):
        end = next(i for i, token in enumerate(free[row]) if token in stops) + 1
        assert end <= (6, 9)[row]  # each row ends early, at its own first stop token
        assert stopped[row] == free[row][:end], row


def test_streaming_yields_one_token_per_row_per_step_and_minus_one_after_a_stop(generator):
    _, rt = generator
    state = rt.new_state(2)
    prompts = [prompt(4, seed=1), prompt(4, seed=2)]
    first = rt.generate(prompts, GenerationConfig(max_new_tokens=12)).tokens
    stop = first[0][2]
    assert stop not in first[1]  # row 1 runs on to 12 tokens, so row 0 has a tail of -1s
    steps = list(rt.generate_stream(state, prompts, GenerationConfig(max_new_tokens=12, stop_tokens=(stop,))))
    assert len(steps) == 12 and all(step.shape == (2,) and step.dtype == np.int64 for step in steps)
    end = first[0].index(stop) + 1
    column = [int(step[0]) for step in steps]
    assert end < 12 and column[:end] == first[0][:end] and column[end:] == [-1] * (12 - end)
    assert [int(step[1]) for step in steps] == first[1]


@pytest.mark.parametrize("settings, fragment", [
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_k=-2), "top_k must be an int >= 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(stop_tokens=(VOCAB,)), "outside the vocabulary"),
    (dict(max_new_tokens=60, rollover=False), "past the backbone's 64 positions"),
    (dict(use_cache=False, rollover=False), "needs rollover"),
])
def test_bad_generation_settings_are_refused_before_any_work(generator, settings, fragment):
    """Field ranges fail when the config is made; what depends on the bundle fails at generation."""
    _, rt = generator
    state = rt.new_state()
    with pytest.raises(RuntimeInputError) as error:
        next(iter(rt.generate_stream(state, prompt(10), GenerationConfig(**settings))))
    assert fragment in str(error.value)
    assert state.pending[0].size == 0 and int(state.segments_done[0]) == 0


def test_bad_prompts_are_refused_before_any_work(generator):
    _, rt = generator
    state = rt.new_state(2)
    with pytest.raises(RuntimeInputError, match=r"rows \[1\] have no context"):
        rt.generate_stream(state, [prompt(3), []])
    with pytest.raises(RuntimeInputError, match=r"token id 97 at row 0, position 2 is outside the vocabulary 0..96 \(in the prompt\)"):
        rt.generate_stream(state, [[1, 2, 97], [3]])
    with pytest.raises(RuntimeInputError, match="got 1 prompts for a state of batch 2"):
        rt.generate_stream(state, [[1, 2]])
    assert [p.size for p in state.pending] == [0, 0]


def test_bundles_that_cannot_generate_say_why(bundle_factory, tmp_path):
    _, encoder = bundle_factory("bert")
    with pytest.raises(RuntimeInputError, match="encoder"):
        RMTRuntime.load(encoder.path, backend="onnxruntime").generate([1, 2, 3])
    model, _ = bundle_factory("gpt2")
    plain = export_model(model, tmp_path / "plain", ExportOptions(generation=False, plan=ValidationPlan(segments=2)))
    assert "prefill" not in plain.manifest["graphs"]
    with pytest.raises(RuntimeInputError, match="no prefill/decode graphs"):
        RMTRuntime.load(plain.path, backend="onnxruntime").generate([1, 2, 3])
    checkpoint = save_checkpoint(model, tmp_path / "model.pt")
    torch_rt = reference_runtime(result_path(bundle_factory), checkpoint)
    with pytest.raises(BackendError, match="generate with the onnxruntime backend"):
        torch_rt.generate([1, 2, 3])
