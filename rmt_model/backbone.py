"""Building Hugging Face backbones from the plain config dict an RMT checkpoint carries."""
from __future__ import annotations

from typing import Any

from .config import RMTConfig
from .errors import ConfigError


def backbone_config(config: RMTConfig, vocab_size: int | None = None):
    """The transformers ``PretrainedConfig`` for ``config.backbone`` (vocab optionally widened)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    family = config.family
    if family not in CONFIG_MAPPING:
        raise ConfigError(f"unknown backbone family {family!r}: transformers has no config for it")
    values: dict[str, Any] = {k: v for k, v in config.backbone.items() if k != "model_type"}
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    try:
        hf_config = AutoConfig.for_model(family).__class__.from_dict(values)
    except Exception as exc:  # noqa: BLE001 - transformers validates fields with its own error types
        first = str(exc).strip().splitlines()
        raise ConfigError(f"backbone config is not a valid {family} config: "
                          f"{' '.join(line.strip() for line in first[:3])}") from None
    hf_config._attn_implementation = config.attn_implementation
    return hf_config


def build_backbone(config: RMTConfig, vocab_size: int | None = None):
    """A randomly initialised backbone of the right head type for ``config.kind``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    backbone_config(config)  # raises for an unknown family before the head check
    if config.kind == "decoder":
        auto_class, names, head = AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "causal LM"
    else:
        auto_class, names = AutoModelForSequenceClassification, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
        head = "sequence classification"
    if config.family not in names:
        raise ConfigError(f"backbone family {config.family!r} has no {head} model in transformers; "
                          f"a {config.kind} RMT needs one (e.g. {', '.join(sorted(names)[:6])}, ...)")
    hf_config = backbone_config(config, vocab_size)
    return auto_class.from_config(hf_config, attn_implementation=config.attn_implementation)


def family_config_dict(family: str, **overrides: Any) -> dict[str, Any]:
    """A backbone config dict for ``family`` with ``overrides`` (e.g. for tiny test models)."""
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.for_model(family, **overrides)
    except ValueError as exc:
        raise ConfigError(f"unknown backbone family {family!r}: {exc}") from None
    return hf_config.to_dict()
