"""ARMT in rmt_model: state layout, segment semantics, padding, generation, config, and parity
with the independent implementation in tests/armt_reference.py over 16 segments.

Tiny GPT-2 and Llama backbones (2 layers, D 32), M 4, segment 16. The reference initialises
W_mv to zero, which makes the memory a no-op; every model here gets W_mv ~ N(0, 0.3^2) so
that reads move the logits by O(1) (asserted) and parity means something.
"""
import copy

import pytest
import torch

from rmt_model import ARMTSettings, ConfigError, RMTConfig, build_armt_model
from rmt_model.tiny import tiny_config
from tests.armt_reference import reference_segment, zero_state

SEGMENT, M, SEGMENTS = 16, 4, 16
NEWER = dict(d_mem=8, heads=2, use_sink=True)                 # heads, L2-normalised features, sink
OLDER = dict(d_mem=8, heads=1, version="unnormalized")        # the Aug 2024 default branch
VARIANTS = [("gpt2", NEWER), ("gpt2", OLDER), ("llama", NEWER), ("llama", OLDER)]
IDS = ["gpt2-newer", "gpt2-older", "llama-newer", "llama-older"]


def armt_config(family="gpt2", **settings):
    return tiny_config(family, num_mem_tokens=M, segment_size=SEGMENT).replace(
        kind="armt", armt=ARMTSettings(**settings))


def make_armt(family="gpt2", seed=0, w_mv_std=0.3, **settings):
    torch.manual_seed(seed)
    model = build_armt_model(armt_config(family, **settings))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model._layers():
            layer.W_mv.weight.copy_(torch.randn(layer.W_mv.weight.shape, generator=generator) * w_mv_std)
    return model


def token_ids(batch, length, seed=2):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def segments(ids):
    return [ids[:, start:start + SEGMENT] for start in range(0, ids.shape[1], SEGMENT)]


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---- state and segment semantics ----------------------------------------------------------------
def test_state_is_named_per_layer_float32_zeros_of_the_documented_shapes():
    model = make_armt("gpt2", **NEWER)
    state = model.initial_state(3)
    features = 6 * 8 // 2
    assert list(state) == ["W_mem.0", "z.0", "W_mem.1", "z.1"]
    assert state["W_mem.1"].shape == (3, 2, features, 32 // 2) and state["z.0"].shape == (3, 2, features)
    assert all(v.dtype == torch.float32 and not v.any() for v in state.values())
    assert not any(name.startswith(("W_mem", "z.")) for name in model.state_dict())


def test_a_step_returns_logits_of_the_tokens_only_and_a_new_state():
    model = make_armt("gpt2", **NEWER)
    ids = token_ids(2, SEGMENT)
    with torch.no_grad():
        logits, state = model.step(ids, torch.ones_like(ids), model.initial_state(2))
    assert logits.shape == (2, SEGMENT, 97)
    assert set(state) == set(model.initial_state(2)) and all(v.abs().sum() > 0 for v in state.values())


@pytest.mark.parametrize("settings", [NEWER, OLDER], ids=["newer", "older"])
def test_last_logits_are_each_rows_last_real_token_of_all_logits_with_the_same_state(settings):
    model = make_armt("gpt2", **settings)
    ids = token_ids(2, SEGMENT)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0                            # row 1: 6 tokens, right-padded
    state = model.step(token_ids(2, SEGMENT, seed=5), torch.ones_like(ids), model.initial_state(2))[1]
    with torch.no_grad():
        every, every_state = model.step(ids, mask, state)
        last, last_state = model.step(ids, mask, state, logits="last")
    assert last.shape == (2, 97)
    assert max_diff(last[0], every[0, -1]) < 1e-5 and max_diff(last[1], every[1, 5]) < 1e-5
    assert max_diff(last[1], every[1, -1]) > 1e-3   # not the padded position's
    assert all(torch.equal(every_state[name], last_state[name]) for name in every_state)
    with pytest.raises(ValueError, match="logits must be 'all' or 'last'"):
        model.step(ids, mask, state, logits="first")


def test_the_first_segment_reads_nothing_so_its_logits_are_the_plain_backbones():
    """No sink: the tokens come first and causally never see the memory tokens after them."""
    model = make_armt("gpt2", d_mem=8, heads=2)
    ids = token_ids(2, SEGMENT)
    with torch.no_grad():
        logits, _ = model.step(ids, torch.ones_like(ids), model.initial_state(2))
        plain = model.model(input_ids=ids).logits
    assert max_diff(logits, plain) < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_memory_moves_the_second_segments_logits(family):
    model = make_armt(family, **NEWER)
    first, second = segments(token_ids(2, 2 * SEGMENT))
    with torch.no_grad():
        _, state = model.step(first, torch.ones_like(first), model.initial_state(2))
        with_memory, _ = model.step(second, torch.ones_like(second), state)
        without, _ = model.step(second, torch.ones_like(second), model.initial_state(2))
    assert max_diff(with_memory, without) > 0.1


def test_a_wrong_state_is_refused_by_name():
    model = make_armt("gpt2", **NEWER)
    ids = token_ids(1, SEGMENT)
    state = model.initial_state(1)
    with pytest.raises(ValueError, match="missing.*z.1"):
        model.step(ids, torch.ones_like(ids), {k: v for k, v in state.items() if k != "z.1"})
    with pytest.raises(ValueError, match=r"W_mem.0 has shape \(2,"):
        model.step(ids, torch.ones_like(ids), {**state, "W_mem.0": torch.zeros(2, 2, 24, 16)})


def test_without_writing_the_state_is_returned_unchanged_and_the_logits_match_the_reference():
    """The reference's last segment before generating: [sink, tokens], reads on, writes off."""
    model = make_armt("llama", **NEWER)
    first, second = segments(token_ids(2, 2 * SEGMENT))
    ref_state = zero_state(model, 2, torch.float32)
    _, ref_state = reference_segment(model, first, ref_state)
    ref_logits, unchanged = reference_segment(model, second, ref_state, write=False)
    with torch.no_grad():
        logits, state = model.step(second, torch.ones_like(second), ref_state.as_dict(), write=False)
    assert all(torch.equal(state[k], v) for k, v in ref_state.as_dict().items())
    assert unchanged.W[0] is ref_state.W[0]
    assert max_diff(logits, ref_logits) < 1e-5


def test_a_padded_row_computes_what_it_computes_alone_and_an_empty_segment_keeps_its_state():
    model = make_armt("gpt2", **NEWER)
    ids = token_ids(2, 3 * SEGMENT)
    mask = torch.ones_like(ids)
    mask[1, 26:] = 0                          # row 1: 16 tokens, 10 + 6 padding, then nothing
    with torch.no_grad():
        both = model(ids, mask)
        alone = model(ids[1:, :26])
    assert max_diff(both.logits[1, :26], alone.logits[0]) < 1e-5
    for name, value in alone.state.items():
        assert max_diff(both.state[name][1], value[0]) < 1e-6, name
    assert max_diff(both.state["W_mem.1"][0], both.state["W_mem.1"][1]) > 1e-3


def test_forward_is_the_step_loop_and_its_loss_is_the_shifted_cross_entropy():
    model = make_armt("gpt2", **OLDER)
    ids = token_ids(2, 40)
    with torch.no_grad():
        out = model(ids, labels=ids)
        state, logits = model.initial_state(2), []
        for seg in segments(ids):
            seg_logits, state = model.step(seg, torch.ones_like(seg), state)
            logits.append(seg_logits)
    logits = torch.cat(logits, dim=1)
    assert torch.equal(out.logits, logits)
    assert all(torch.equal(out.state[k], v) for k, v in state.items())
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert abs(out.loss.item() - expected.item()) < 1e-6


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_greedy_generation_equals_recomputing_each_token_without_a_cache(family):
    model = make_armt(family, **NEWER)
    prompt = token_ids(1, 2 * SEGMENT + 5)
    generated = model.generate(prompt, max_new_tokens=6)
    state = model.initial_state(1)
    with torch.no_grad():
        for seg in segments(prompt)[:2]:
            _, state = model.step(seg, torch.ones_like(seg), state)
        context, expected = prompt[:, 2 * SEGMENT:], []
        for _ in range(6):
            logits, _ = model.step(context, torch.ones_like(context), state, write=False)
            token = logits[:, -1].argmax(dim=-1, keepdim=True)
            expected.append(int(token))
            context = torch.cat([context, token], dim=1)
    assert generated.tolist() == [expected]


# ---- parity with tests/armt_reference.py -----------------------------------------------------
@pytest.mark.parametrize("family, settings", VARIANTS, ids=IDS)
def test_teacher_forced_parity_over_16_segments_in_fp32(family, settings):
    """Each segment starts from the reference's own state: the per-segment error of one step.
    Measured: logits <= 3.5e-7, state <= 1.1e-6 (relative to the state's scale)."""
    model = make_armt(family, **settings)
    ids = token_ids(2, SEGMENTS * SEGMENT)
    ref = zero_state(model, 2, torch.float32)
    worst_logits = worst_state = effect = 0.0
    with torch.no_grad():
        for seg in segments(ids):
            ref_logits, ref_next = reference_segment(model, seg, ref)
            logits, state = model.step(seg, torch.ones_like(seg), ref.as_dict())
            worst_logits = max(worst_logits, max_diff(logits, ref_logits))
            for name, value in ref_next.as_dict().items():
                worst_state = max(worst_state, max_diff(state[name], value) / (1 + value.abs().max().item()))
            effect = max(effect, max_diff(logits, model.model(input_ids=seg).logits))
            ref = ref_next
    assert worst_logits < 1e-5 and worst_state < 1e-5
    assert effect > 0.04  # the memory really is in play (measured 0.13-0.87)


@pytest.mark.parametrize("family, settings", VARIANTS, ids=IDS)
def test_chained_parity_over_16_segments_in_float64(family, settings):
    """Both carry their own state all the way; in float64 they agree to rounding (measured <= 1.2e-13)."""
    model = copy.deepcopy(make_armt(family, **settings)).double()
    ids = token_ids(2, SEGMENTS * SEGMENT)
    ref = zero_state(model, 2, torch.float64)
    state = model.initial_state(2)
    state = {k: v.double() for k, v in state.items()}
    worst = 0.0
    with torch.no_grad():
        for seg in segments(ids):
            ref_logits, ref = reference_segment(model, seg, ref)
            logits, state = model.step(seg, torch.ones_like(seg), state)
            worst = max(worst, max_diff(logits, ref_logits))
    assert state["W_mem.0"].dtype == torch.float64
    assert worst < 1e-10
    for name, value in ref.as_dict(torch.float64).items():
        assert max_diff(state[name], value) < 1e-10, name


@pytest.mark.parametrize("family, settings", VARIANTS, ids=IDS)
def test_chained_fp32_drift_stays_within_the_models_own_sensitivity(family, settings):
    """fp32 chained against the float64 reference drifts (measured up to 2.8e-5 on logits over
    16 segments); the yardstick is the fp32 model's own sensitivity to a perturbation of one
    float32 rounding (1.2e-7 relative) on its memory embeddings, measured in the same run."""
    model = make_armt(family, **settings)
    model64 = copy.deepcopy(model).double()
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.memory.mul_(1 + 1.2e-7 * torch.randn(perturbed.memory.shape,
                                                       generator=torch.Generator().manual_seed(5)).sign())
    ids = token_ids(2, SEGMENTS * SEGMENT)
    ref = zero_state(model64, 2, torch.float64)
    state, other = model.initial_state(2), perturbed.initial_state(2)
    drift = sensitivity = 0.0
    with torch.no_grad():
        for seg in segments(ids):
            ref_logits, ref = reference_segment(model64, seg, ref)
            logits, state = model.step(seg, torch.ones_like(seg), state)
            moved, other = perturbed.step(seg, torch.ones_like(seg), other)
            drift = max(drift, max_diff(logits, ref_logits))
            sensitivity = max(sensitivity, max_diff(logits, moved))
    assert drift < 1e-3
    assert drift <= 20 * sensitivity + 1e-6, (drift, sensitivity)


# ---- config ---------------------------------------------------------------------------------------
def test_an_armt_config_round_trips_and_an_rmt_config_serialises_as_before():
    config = armt_config("llama", **NEWER)
    assert RMTConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["armt"] == dict(d_mem=8, heads=2, use_sink=True, correction=True,
                                            version="normalized")
    assert "armt" not in tiny_config("gpt2").to_dict()
    assert config.positions_needed == SEGMENT + M + 1


@pytest.mark.parametrize("change, message", [
    (dict(heads=3), "must divide both d_mem 8"),
    (dict(version="v3"), "armt.version must be one of"),
    (dict(d_mem=0), "armt.d_mem must be an integer >= 1"),
    (dict(use_sink=1), "armt.use_sink must be true or false"),
])
def test_bad_armt_settings_are_refused_by_name(change, message):
    with pytest.raises(ConfigError, match=message):
        armt_config("gpt2", **{**NEWER, **change})


def test_armt_settings_on_another_kind_and_an_unsupported_family_are_refused():
    with pytest.raises(ConfigError, match="belong to kind='armt'"):
        tiny_config("gpt2").replace(armt=ARMTSettings())
    with pytest.raises(ConfigError, match="unknown armt setting"):
        RMTConfig.from_dict({**armt_config().to_dict(), "armt": {"d_mem": 8, "gating": True}})
    with pytest.raises(ConfigError, match="ARMT supports the backbone families"):
        build_armt_model(tiny_config("gpt_neox").replace(kind="armt", armt=ARMTSettings(d_mem=8)))
