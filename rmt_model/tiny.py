"""Tiny random-initialised RMT configs: for tests, demos and smoke benchmarks (no downloads)."""
from __future__ import annotations

from typing import Any

from .backbone import family_config_dict
from .config import RMTConfig

DECODER_FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2")
ENCODER_FAMILIES = ("bert", "roberta")

# Small enough to build in milliseconds; initializer_range 0.02 keeps the recurrence tame
# (FIELD_NOTES: at 0.2 a tiny Llama amplifies rounding noise chaotically).
_TINY_BACKBONES: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=4, n_positions=64),
    "gpt_neox": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, rotary_pct=0.5),
    "llama": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=64),
    "qwen2": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=64),
    "bert": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64, num_labels=3, pad_token_id=0),
    "roberta": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=66, num_labels=3, pad_token_id=1),
}

# Encoder framing ids inside the tiny vocabulary (BERT-like / RoBERTa-like layouts).
_ENCODER_IDS = {"bert": dict(cls_token_id=2, sep_token_id=3, pad_token_id=0),
                "roberta": dict(cls_token_id=0, sep_token_id=2, pad_token_id=1)}


def tiny_config(family: str = "gpt2", *, num_mem_tokens: int = 4, segment_size: int = 16,
                vocab_size: int = 97, attn_implementation: str = "sdpa",
                **backbone_overrides: Any) -> RMTConfig:
    """A tiny RMTConfig of ``family`` (decoder for causal LMs, encoder for BERT/RoBERTa)."""
    values = dict(_TINY_BACKBONES[family], vocab_size=vocab_size, initializer_range=0.02)
    values.update(backbone_overrides)
    if family in DECODER_FAMILIES:
        # GPT-2's default bos/eos 50256 is outside a tiny vocabulary.
        values.setdefault("bos_token_id", None)
        values.setdefault("eos_token_id", None)
    kind = "encoder" if family in ENCODER_FAMILIES else "decoder"
    extra_ids = _ENCODER_IDS.get(family, {})
    return RMTConfig(kind=kind, backbone=family_config_dict(family, **values),
                     num_mem_tokens=num_mem_tokens, segment_size=segment_size,
                     attn_implementation=attn_implementation, **extra_ids)
