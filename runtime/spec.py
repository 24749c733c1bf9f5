"""The step spec: the one contract between export and runtime.

Read by the exporter (names, dtypes, dynamic axes), the validator, the TensorRT profile
builder and every runtime backend. Torch-free on purpose: the runtime imports it.

Dims are ints, the symbols ``batch``, ``seq`` (1..segment_size) and ``past`` (key/value
cache positions), or ``symbol + k`` (a cache that grows by k). State inputs are paired
with the outputs that replace them by name (``memory -> new_memory``,
``past.0.key -> present.0.key``): named pairs, never positional lists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

SPEC_VERSION = 1

Dim = Union[int, str]
BATCH, SEQ, PAST = "batch", "seq", "past"

# Graph names inside a bundle: the segment loop's, and the decoder's generation graphs.
STEP, INGEST = "step", "ingest"
PREFILL, DECODE = "prefill", "decode"
SEGMENT_GRAPHS = (STEP, INGEST)
GENERATION_GRAPHS = (PREFILL, DECODE)


@dataclass(frozen=True)
class TensorSpec:
    """One named graph input or output."""

    name: str
    dtype: str  # numpy dtype name: "int64", "float32"
    dims: tuple[Dim, ...]

    def shape(self, batch: int, seq: int, past: int = 0) -> tuple[int, ...]:
        """Concrete shape for a batch size, segment length and cache length."""
        return self.resolve({BATCH: batch, SEQ: seq, PAST: past})

    def resolve(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape for the symbols' sizes (``bind_symbols``)."""
        return tuple(resolve_dim(d, sizes) for d in self.dims)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorSpec":
        return cls(name=data["name"], dtype=data["dtype"], dims=tuple(data["dims"]))


def resolve_dim(dim: Dim, sizes: dict[str, int]) -> int:
    """An int dim, a symbol, or ``symbol + k``, given the symbols' sizes."""
    if isinstance(dim, int):
        return dim
    symbol, _, offset = dim.partition(" + ")
    return sizes[symbol] + (int(offset) if offset else 0)


class ShapeMismatch(ValueError):
    """A tensor whose shape does not fit its spec (or the sizes the other inputs gave)."""


def bind_symbols(tensors: "tuple[TensorSpec, ...]", shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """The sizes of the symbols (batch, seq, past) that ``shapes`` give ``tensors``, checking
    every int dim and that each symbol has one size across tensors."""
    sizes: dict[str, int] = {}
    for tensor in tensors:
        shape = tuple(shapes[tensor.name])
        if len(shape) != len(tensor.dims):
            raise ShapeMismatch(f"{tensor.name} must have {len(tensor.dims)} dims {list(tensor.dims)}, got shape "
                                f"{list(shape)}")
        for axis, (dim, have) in enumerate(zip(tensor.dims, shape)):
            if isinstance(dim, str):
                symbol, _, offset = dim.partition(" + ")
                sizes.setdefault(symbol, have - (int(offset) if offset else 0))
            expected = resolve_dim(dim, sizes)
            if have != expected:
                raise ShapeMismatch(f"{tensor.name} shape {list(shape)} does not fit the spec {list(tensor.dims)} "
                                    f"(axis {axis} is {have}, expected {expected} from the other inputs)")
    return sizes


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


@dataclass(frozen=True)
class CacheLayer:
    """Key/value cache geometry of one attention layer: [batch, heads, positions, head_dim]."""

    heads: int
    head_dim: int


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """(past inputs, present outputs) in layer order: ``past.i.key``, ``past.i.value``, ..."""
    past = [f"past.{i}.{part}" for i in range(layers) for part in ("key", "value")]
    return past, [name.replace("past.", "present.", 1) for name in past]


def generation_specs(num_mem_tokens: int, hidden_size: int, vocab_size: int,
                     layers: list[CacheLayer], cache_dtype: str) -> dict[str, GraphSpec]:
    """The RMT decoder's generation graphs (the reference's generation: ``[mem, tokens]``, no
    write slots): ``cached_generation_specs`` with the memory read by prefill, M positions
    ahead of the prompt in the cache, and nothing read by decode."""
    memory = TensorSpec("memory", "float32", (BATCH, num_mem_tokens, hidden_size))
    return cached_generation_specs((memory,), (), num_mem_tokens, vocab_size, layers, cache_dtype)


def _plus(symbol: str, offset: int) -> Dim:
    """``symbol + k``, plain ``symbol`` for k = 0."""
    return f"{symbol} + {offset}" if offset else symbol


def cached_generation_specs(prefill_reads: tuple[TensorSpec, ...], decode_reads: tuple[TensorSpec, ...],
                            cache_prefix: int, vocab_size: int, layers: list[CacheLayer],
                            cache_dtype: str) -> dict[str, GraphSpec]:
    """A decoder's key/value-cached generation graphs.

    prefill: input_ids, attention_mask [batch, seq], ``prefill_reads`` -> last_logits [batch,
             vocab] at each row's last real token, present.i.key/value over the
             ``cache_prefix`` + seq positions (the RMT's M memory tokens, an ARMT's sink).
    decode:  input_ids [batch, 1], attention_mask [batch, past + 1], position_ids [batch, 1],
             past.i.key/value [.., past, ..], ``decode_reads`` -> logits [batch, vocab],
             present.i.key/value [.., past + 1, ..]; state pairs past.i.* -> present.i.*.
    The reads are state the graphs take and never replace. Caches are ``cache_dtype``.
    """
    past_names, present_names = cache_names(len(layers))

    def caches(names: list[str], positions: Dim) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(name, cache_dtype, (BATCH, layer.heads, positions, layer.head_dim))
                     for name, layer in zip(names, (l for l in layers for _ in range(2))))

    prefill = GraphSpec(
        PREFILL,
        (TensorSpec("input_ids", "int64", (BATCH, SEQ)), TensorSpec("attention_mask", "int64", (BATCH, SEQ)),
         *prefill_reads),
        (TensorSpec("last_logits", "float32", (BATCH, vocab_size)), *caches(present_names, _plus(SEQ, cache_prefix))))
    decode = GraphSpec(
        DECODE,
        (TensorSpec("input_ids", "int64", (BATCH, 1)), TensorSpec("attention_mask", "int64", (BATCH, f"{PAST} + 1")),
         TensorSpec("position_ids", "int64", (BATCH, 1)), *caches(past_names, PAST), *decode_reads),
        (TensorSpec("logits", "float32", (BATCH, vocab_size)), *caches(present_names, f"{PAST} + 1")),
        dict(zip(past_names, present_names)))
    return {PREFILL: prefill, DECODE: decode}
