"""RMTConfig: geometry checks with clear errors, and a lossless dict round trip."""
import pytest

from rmt_model import ConfigError, RMTConfig, build_model, family_config_dict
from rmt_model.tiny import tiny_config


def test_dict_round_trip():
    config = tiny_config("llama")
    assert RMTConfig.from_dict(config.to_dict()) == config


def test_positions_must_fit_the_backbone():
    with pytest.raises(ConfigError, match=r"segment_size 60 \+ 2 x 4 memory tokens = 68 positions, "
                                          r"but the gpt2 backbone has only 64.*at most 56"):
        tiny_config("gpt2", segment_size=60)
    with pytest.raises(ConfigError, match="3 special tokens"):
        tiny_config("bert", segment_size=60)
    assert tiny_config("gpt2", segment_size=56).positions_needed == 64


@pytest.mark.parametrize("field, value, message", [
    ("num_mem_tokens", 0, "num_mem_tokens must be an integer >= 1"),
    ("segment_size", -1, "segment_size must be an integer >= 1"),
    ("kind", "seq2seq", "kind must be one of"),
    ("attn_implementation", "flash", "attn_implementation must be one of"),
])
def test_bad_fields_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("gpt2").replace(**{field: value})


def test_unknown_and_missing_fields_are_named():
    data = tiny_config("gpt2").to_dict()
    with pytest.raises(ConfigError, match=r"unknown RMT config field\(s\) \['colour'\]"):
        RMTConfig.from_dict(dict(data, colour="red"))
    del data["segment_size"]
    with pytest.raises(ConfigError, match=r"missing field\(s\) \['segment_size'\]"):
        RMTConfig.from_dict(data)


def test_encoder_needs_its_framing_ids():
    with pytest.raises(ConfigError, match="cls_token_id"):
        tiny_config("bert").replace(cls_token_id=None)


def test_unknown_family_and_wrong_head_are_refused():
    config = tiny_config("gpt2")
    with pytest.raises(ConfigError, match="unknown backbone family 'not_a_model'"):
        build_model(config.replace(backbone=dict(config.backbone, model_type="not_a_model")))
    t5 = family_config_dict("t5", d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64, vocab_size=97)
    with pytest.raises(ConfigError, match="'t5' has no causal LM model"):
        build_model(config.replace(backbone=t5))
    with pytest.raises(ConfigError, match="not a valid gpt2 config"):
        build_model(config.replace(backbone=dict(config.backbone, n_head="four")))
