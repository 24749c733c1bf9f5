"""The step spec: the one contract between export and runtime.

Read by the exporter (names, dtypes, dynamic axes), the validator, the TensorRT profile
builder and every runtime backend. Torch-free on purpose: the runtime imports it.

Dims are ints or the symbols ``batch`` and ``seq`` (seq runs 1..segment_size). State
inputs are paired with the outputs that replace them by name (``memory -> new_memory``);
a model family with more state adds named pairs, never positional lists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

SPEC_VERSION = 1

Dim = Union[int, str]
BATCH, SEQ = "batch", "seq"

# Graph names inside a bundle.
STEP, INGEST = "step", "ingest"


@dataclass(frozen=True)
class TensorSpec:
    """One named graph input or output."""

    name: str
    dtype: str  # numpy dtype name: "int64", "float32"
    dims: tuple[Dim, ...]

    def shape(self, batch: int, seq: int) -> tuple[int, ...]:
        """Concrete shape for a batch size and segment length."""
        return tuple(batch if d == BATCH else seq if d == SEQ else int(d) for d in self.dims)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorSpec":
        return cls(name=data["name"], dtype=data["dtype"], dims=tuple(data["dims"]))


@dataclass(frozen=True)
class GraphSpec:
    """Inputs, outputs and state pairs of one exported graph."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    state: dict[str, str] = field(default_factory=dict)  # state input -> output replacing it

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "state": dict(self.state)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GraphSpec":
        return cls(name=data["name"], inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
                   outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
                   state=dict(data.get("state", {})))


def step_specs(kind: str, num_mem_tokens: int, hidden_size: int, vocab_size: int,
               num_labels: int | None = None) -> dict[str, GraphSpec]:
    """The graphs a bundle of ``kind`` holds, by name.

    step:   input_ids, attention_mask, memory -> logits, new_memory
            (decoder logits [batch, seq, vocab]; encoder [batch, labels]).
    ingest: the same inputs -> new_memory (+ ``last_logits`` [batch, vocab] for a decoder:
            the logits at each row's last real token), skipping the per-token LM head.
    Memory is float32 in every precision; fp16 lives inside the graph.
    """
    memory_dims = (BATCH, num_mem_tokens, hidden_size)
    inputs = (TensorSpec("input_ids", "int64", (BATCH, SEQ)),
              TensorSpec("attention_mask", "int64", (BATCH, SEQ)),
              TensorSpec("memory", "float32", memory_dims))
    new_memory = TensorSpec("new_memory", "float32", memory_dims)
    state = {"memory": "new_memory"}
    if kind == "decoder":
        logits = TensorSpec("logits", "float32", (BATCH, SEQ, vocab_size))
        ingest_outputs: tuple[TensorSpec, ...] = (
            TensorSpec("last_logits", "float32", (BATCH, vocab_size)), new_memory)
    elif kind == "encoder":
        if not num_labels:
            raise ValueError("an encoder spec needs num_labels")
        logits = TensorSpec("logits", "float32", (BATCH, num_labels))
        ingest_outputs = (new_memory,)
    else:
        raise ValueError(f"kind must be 'decoder' or 'encoder', got {kind!r}")
    return {STEP: GraphSpec(STEP, inputs, (logits, new_memory), state),
            INGEST: GraphSpec(INGEST, inputs, ingest_outputs, state)}
