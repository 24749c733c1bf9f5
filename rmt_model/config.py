"""The RMT configuration: everything needed to rebuild a model from a checkpoint alone."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

Kind = Literal["decoder", "encoder", "armt"]
KINDS = ("decoder", "encoder", "armt")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")

# Special tokens around an encoder segment: [CLS] mem.. [SEP] tokens.. [SEP].
ENCODER_SPECIAL_SLOTS = 3

# The two revisions of the ARMT reference code whose numbers rmt_model reproduces (docs/ARMT.md).
# "normalized": DPFP features L2-normalised, gamma = 1 - den / ||k||^2 (experimental branch
# from 4587ca0, 2024-08-28, and the later single-file Hugging Face version);
# "unnormalized": raw DPFP features, gamma = 1 - den / (||k||^2 + 1e-5) (the default branch
# framework_accel, modeling_amt/language_modeling.py as of 98ea91b, 2024-06-17).
ARMT_VERSIONS = ("normalized", "unnormalized")

# Upper bounds of the geometry a config (a checkpoint's, a user's) may declare, checked before a
# model is built from it. The same numbers as rmt_runtime.limits (which rmt_model may not import;
# tests/reliability/test_bounds.py checks they agree). Memory tokens and segment tokens take
# backbone positions in every segment, and the graphs' attention grows with their square.
MAX_NUM_MEM_TOKENS = 4096
MAX_SEGMENT_SIZE = 65536
# The backbone's width and vocabulary size the embedding table, allocated when a model is built:
# the widest published models are 16k-32k wide, the largest vocabularies 256k tokens.
MAX_HIDDEN_SIZE = 65536
MAX_VOCAB_SIZE = 2 ** 22
MAX_D_MEM = 65536


def _is_int_in(value: Any, low: int, high: int) -> bool:
    """``value`` is an int (not a bool) in ``low..high``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_fields(cls, data: Any, what: str, fields: str) -> None:
    """``data`` is a dict holding only fields of dataclass ``cls``; else a ConfigError naming them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a dict, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {fields} {unknown}; expected only {sorted(known)}")


@dataclass(frozen=True)
class ARMTSettings:
    """The associative memory of an ARMT (kind="armt"): per layer a matrix W_mem and a
    normaliser z per head, written from the M memory tokens at the end of each segment.

    d_mem: width of the key/query projections (split over ``heads``); each head's DPFP
    features are 6 * d_mem / heads wide. use_sink: a learned token in front of each segment.
    correction: the reference's gamma ("new information") coefficient on z.
    version: which reference revision's arithmetic (ARMT_VERSIONS).
    """

    d_mem: int = 64
    heads: int = 1
    use_sink: bool = False
    correction: bool = True
    version: str = "normalized"

    def validate(self, hidden_size: int) -> None:
        if not _is_int_in(self.d_mem, 1, MAX_D_MEM):
            raise ConfigError(f"armt.d_mem must be an integer >= 1 and at most {MAX_D_MEM}, got {self.d_mem!r}")
        if not _is_int_in(self.heads, 1, self.d_mem):
            raise ConfigError(f"armt.heads must be an integer >= 1 and at most d_mem ({self.d_mem}), "
                              f"got {self.heads!r}")
        if self.d_mem % self.heads or hidden_size % self.heads:
            raise ConfigError(f"armt.heads {self.heads} must divide both d_mem {self.d_mem} and the "
                              f"hidden size {hidden_size}")
        for name in ("use_sink", "correction"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"armt.{name} must be true or false, got {getattr(self, name)!r}")
        if self.version not in ARMT_VERSIONS:
            raise ConfigError(f"armt.version must be one of {ARMT_VERSIONS}, got {self.version!r}")

    @property
    def features(self) -> int:
        """Per-head DPFP feature width: 2 * nu * d_mem / heads with nu = 3."""
        return 6 * self.d_mem // self.heads

    @classmethod
    def from_value(cls, value: "ARMTSettings | dict[str, Any]") -> "ARMTSettings":
        if isinstance(value, cls):
            return value
        _check_fields(cls, value, "armt settings", "armt setting(s)")
        return cls(**value)


@dataclass(frozen=True)
class RMTConfig:
    """Geometry of a Recurrent Memory Transformer around a Hugging Face backbone.

    ``backbone`` is the backbone's config as a plain dict (``PretrainedConfig.to_dict()``,
    including ``model_type``), so a checkpoint carries everything needed to rebuild it.
    For an encoder, ``backbone['vocab_size']`` is the base vocabulary; the M memory token
    ids ``vocab_size .. vocab_size + M - 1`` are added on top, as the reference code does.
    """

    kind: Kind
    backbone: dict[str, Any]
    num_mem_tokens: int
    segment_size: int
    attn_implementation: str = "sdpa"
    # Encoder only: the ids that frame each segment ([CLS] mem [SEP] tokens [SEP] pad..).
    cls_token_id: int | None = None
    sep_token_id: int | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # kind="armt" only: the associative memory's settings (defaults when left out).
    armt: ARMTSettings | None = None

    def __post_init__(self) -> None:
        if self.kind == "armt" and self.armt is None:
            object.__setattr__(self, "armt", ARMTSettings())
        elif self.armt is not None:
            object.__setattr__(self, "armt", ARMTSettings.from_value(self.armt))
        if isinstance(self.backbone, dict):
            # Normalise through JSON (int dict keys become strings) so that a config equals
            # itself after a checkpoint round trip.
            object.__setattr__(self, "backbone", json.loads(json.dumps(self.backbone)))
        self.validate()

    # ---- derived geometry -------------------------------------------------------------
    @property
    def family(self) -> str:
        """The backbone family, as Hugging Face names it (``gpt2``, ``llama``, ``bert``...)."""
        return str(self.backbone["model_type"])

    @property
    def hidden_size(self) -> int:
        """D: the width of every memory token."""
        for key in ("hidden_size", "n_embd", "d_model"):
            if key in self.backbone and self.backbone[key] is not None:
                return int(self.backbone[key])
        raise ConfigError(f"backbone config of family {self.family!r} names no hidden size "
                          "(expected one of hidden_size, n_embd, d_model)")

    @property
    def vocab_size(self) -> int:
        """The vocabulary that user token ids must fall in (without memory token ids)."""
        return int(self.backbone["vocab_size"])

    @property
    def max_positions(self) -> int | None:
        """The backbone's position table size, or None where it declares none."""
        for key in ("n_positions", "max_position_embeddings"):
            if self.backbone.get(key) is not None:
                return int(self.backbone[key])
        return None

    @property
    def positions_needed(self) -> int:
        """Positions one full segment occupies in the backbone, memory slots included."""
        if self.kind == "decoder":
            return self.segment_size + 2 * self.num_mem_tokens
        if self.kind == "armt":  # [sink?, tokens, mem]
            return self.segment_size + self.num_mem_tokens + int(self.armt.use_sink)
        return self.segment_size + self.num_mem_tokens + ENCODER_SPECIAL_SLOTS

    @property
    def num_labels(self) -> int:
        """Encoder only: the classifier's number of classes."""
        if "num_labels" in self.backbone:
            return int(self.backbone["num_labels"])
        return len(self.backbone.get("id2label") or {0: 0, 1: 1})

    # ---- checks ------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot build a model."""
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.backbone, dict) or "model_type" not in self.backbone:
            raise ConfigError("backbone must be a Hugging Face config dict with a 'model_type' key")
        if not _is_int_in(self.num_mem_tokens, 1, MAX_NUM_MEM_TOKENS):
            raise ConfigError(f"num_mem_tokens must be an integer >= 1 and at most {MAX_NUM_MEM_TOKENS}, "
                              f"got {self.num_mem_tokens!r}")
        if not _is_int_in(self.segment_size, 1, MAX_SEGMENT_SIZE):
            raise ConfigError(f"segment_size must be an integer >= 1 and at most {MAX_SEGMENT_SIZE}, "
                              f"got {self.segment_size!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                              f"got {self.attn_implementation!r}")
        if self.kind == "encoder":
            missing = [name for name in ("cls_token_id", "sep_token_id", "pad_token_id")
                       if getattr(self, name) is None]
            if missing:
                raise ConfigError(f"an encoder RMT needs {', '.join(missing)} "
                                  "(the ids framing each segment: [CLS] mem [SEP] tokens [SEP] pad)")
        for name, value, high in (("hidden size", self.hidden_size, MAX_HIDDEN_SIZE),
                                  ("vocab_size", self.backbone.get("vocab_size"), MAX_VOCAB_SIZE)):
            if value is not None and not _is_int_in(value, 1, high):  # before a model allocates by them
                raise ConfigError(f"the backbone's {name} must be an integer >= 1 and at most {high}, got {value!r}")
        if self.armt is not None:
            if self.kind != "armt":
                raise ConfigError(f"armt settings belong to kind='armt', not kind={self.kind!r}")
            self.armt.validate(self.hidden_size)
        limit = self.max_positions
        if limit is not None and self.positions_needed > limit:
            if self.kind == "decoder":
                layout = f"segment_size {self.segment_size} + 2 x {self.num_mem_tokens} memory tokens"
            elif self.kind == "armt":
                layout = (f"segment_size {self.segment_size} + {self.num_mem_tokens} memory tokens"
                          + (" + 1 sink" if self.armt.use_sink else ""))
            else:
                layout = (f"segment_size {self.segment_size} + {self.num_mem_tokens} memory tokens "
                          f"+ {ENCODER_SPECIAL_SLOTS} special tokens")
            raise ConfigError(f"{layout} = {self.positions_needed} positions, but the {self.family} "
                              f"backbone has only {limit}; use a smaller segment_size "
                              f"(at most {self.segment_size - (self.positions_needed - limit)})")

    # ---- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``from_dict`` rebuilds the same config."""
        data = json.loads(json.dumps(dataclasses.asdict(self)))
        if data.get("armt") is None:
            data.pop("armt", None)  # RMT configs serialise as they always have
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RMTConfig":
        """Rebuild a config from ``to_dict``'s output; unknown keys are an error."""
        _check_fields(cls, data, "an RMT config", "RMT config field(s)")
        missing = sorted(name for name in ("kind", "backbone", "num_mem_tokens", "segment_size")
                         if name not in data)
        if missing:
            raise ConfigError(f"RMT config is missing field(s) {missing}")
        return cls(**data)

    def replace(self, **changes: Any) -> "RMTConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
