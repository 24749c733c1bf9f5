"""One declared schema for every document the runtime reads, checked in one place.

A bundle's ``manifest.json``, a state file's header and counters, a TensorRT engine's
metadata and the Triton model's parameters are untrusted input: an edited field must be a
typed error naming it, never a wrong result later. Each document is a pydantic model (typed,
ranged, unknown fields refused, cross-field rules in its validator); ``read_document`` is the
one way their files are read (regular files only, size-bounded, strict JSON). Code reads
fields only through these checked models.

pydantic, because its models declare types, ranges and cross-field rules in one place and
install on a Jetson (pydantic-core ships aarch64 wheels); it is torch-free.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from . import limits
from .spec import (DECODE, GENERATION_GRAPHS, INGEST, PREFILL, SEGMENT_GRAPHS, SPEC_VERSION, STEP, CacheLayer,
                   GraphSpec, TensorSpec, cached_generation_specs)

MANIFEST_SCHEMA_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8")
KINDS = ("decoder", "encoder")
ARCHITECTURES = ("rmt", "armt")
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")
GRAPH_NAMES = (*SEGMENT_GRAPHS, *GENERATION_GRAPHS)
# A state input's output is its name with this prefix (memory -> new_memory, W_mem.0 -> new_W_mem.0).
NEW_STATE = "new_"

# Bounds: far above any real model, low enough that no size computed from them overflows int64
# or allocates without end.
MAX_SIZE = 1 << 24           # vocabulary, hidden size, memory tokens, segment size, any fixed dim
MAX_TENSORS = 4096           # inputs or outputs of one graph
MAX_DIMS = 8
MAX_NAME = 256               # a tensor's, a file's name
MAX_FILES = 4096
# One bound per number: rmt_runtime.limits declares them.
MAX_BATCH = int(limits.BATCH.high)               # sequences in one state
MAX_THREADS = int(limits.THREADS.high)           # a backend's intra-op threads
MAX_ENGINE_BATCH = int(limits.MAX_BATCH.high)    # the largest batch of an engine's profile
# Tokens one sequence may be fed over its life: far beyond any stream (2^53 tokens at 10^6
# tokens/s is 285 years), and every sum of counters stays exact in int64 and in float64.
MAX_TOKENS = 1 << 53
MANIFEST_LIMIT = 64 << 20    # bytes: the validation report and the backbone config dominate
ENGINE_METADATA_LIMIT = 1 << 20
STATE_HEADER_LIMIT = 1 << 16

SHA256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
IDENTITY = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
TENSOR_NAME = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*$", max_length=MAX_NAME)]
SIZE = Annotated[int, Field(ge=1, le=MAX_SIZE)]
# A dim: a fixed size, a symbol (batch, seq, past) or "symbol + k".
DIM_SYMBOL = Annotated[str, StringConstraints(pattern=r"^(batch|seq|past)( \+ [1-9][0-9]{0,3})?$")]


class DocumentError(ValueError):
    """A document that is not what its schema declares (wrapped by the caller's typed error)."""


def _strict(**extra: Any) -> ConfigDict:
    return ConfigDict(extra="forbid", strict=True, frozen=True, **extra)


def relative_path(name: str) -> str:
    """A plain relative path inside a bundle: no absolute path, '..', '~', backslash, NUL,
    empty part or hidden part (a name rmt-edge's own temporaries use)."""
    if not isinstance(name, str) or not name or len(name) > 1024 or "\x00" in name or "\\" in name:
        raise ValueError(f"{name!r} is not a file name inside the bundle")
    parts = PurePosixPath(name).parts
    if (name.startswith(("/", "~")) or any(p in (".", "..") or p.startswith(".") for p in parts)
            or "//" in name or name.endswith("/")):
        raise ValueError(f"manifest path {name!r} leaves the bundle directory or is hidden; every file of a "
                         "bundle must be inside it (a relative path without '..')")
    return name


def _relative(value: Any) -> Any:
    if isinstance(value, str):
        relative_path(value)
    return value


REL_PATH = Annotated[str, AfterValidator(_relative)]


# ---- reading ------------------------------------------------------------------------------------
def read_document(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, through rmt_runtime.limits'
    one reader (a FIFO, device or directory refused without blocking, a larger file refused
    before it is read). Raises DocumentError naming the file."""
    try:
        return limits.read_regular(path, limit, f"the {what}")
    except limits.LimitError as exc:
        raise DocumentError(str(exc)) from None
    except OSError as exc:
        raise DocumentError(f"{path}: cannot read the {what} ({exc.strerror})") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes, source: str, what: str) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, bounded nesting and number sizes."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DocumentError(f"{source}: the {what} is not valid JSON ({str(exc)[:200]})") from None


def describe(exc: ValidationError, what: str, prefix: str = "") -> str:
    """A pydantic error as one line: each field's dotted path (``prefix`` before it), what was
    wrong, what it got and what was expected."""
    errors = exc.errors(include_url=False)
    unknown = [prefix + ".".join(str(p) for p in e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    parts = [f"{what} has unknown field(s) {unknown}"] if unknown else []
    for error in [e for e in errors if e["type"] != "extra_forbidden"][:4]:
        loc = error.get("loc", ())
        where = prefix + ".".join(str(p) for p in loc) if loc else "(document)"
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        got = error.get("input")
        shown = (repr(got) if not isinstance(got, (dict, list)) else type(got).__name__)[:80]
        kind = error.get("type", "")
        if kind == "missing":
            parts.append(f"{what} has no {where!r} field")
        elif kind == "literal_error":
            expected = (error.get("ctx") or {}).get("expected", "")
            parts.append(f"unknown {str(loc[-1]) if loc else what} {shown} in {what} field {where!r} "
                         f"(expected {expected})")
        elif kind.endswith("_type") or kind in ("int_from_float", "model_type"):
            parts.append(f"{what} field {where!r} has the wrong type ({type(got).__name__}: {shown}); {message}")
        elif loc:
            parts.append(f"{what} field {where!r}: {message} (got {shown})")
        else:
            parts.append(message)
    more = len(errors) - len(unknown) - 4
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def validated(model: type[BaseModel], document: Any, source: str, what: str, prefix: str = "") -> Any:
    """``document`` checked by ``model``: the one place a schema is applied, so every document's
    errors read alike (DocumentError naming the source, the field, what it got and expected)."""
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise DocumentError(f"{source}: {describe(exc, what, prefix)}") from None
    except RecursionError:
        raise DocumentError(f"{source}: the {what} is nested too deeply") from None


# ---- the manifest ---------------------------------------------------------------------------------
class TensorDoc(BaseModel):
    model_config = _strict()
    name: TENSOR_NAME
    dtype: Literal[DTYPES]  # type: ignore[valid-type]
    dims: Annotated[list[Union[Annotated[int, Field(ge=1, le=MAX_SIZE)], DIM_SYMBOL]],
                    Field(min_length=1, max_length=MAX_DIMS)]

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, tuple(self.dims))


class GraphSpecDoc(BaseModel):
    model_config = _strict()
    name: Literal[GRAPH_NAMES]  # type: ignore[valid-type]
    inputs: Annotated[list[TensorDoc], Field(min_length=1, max_length=MAX_TENSORS)]
    outputs: Annotated[list[TensorDoc], Field(min_length=1, max_length=MAX_TENSORS)]
    state: Annotated[dict[TENSOR_NAME, TENSOR_NAME], Field(max_length=MAX_TENSORS)] = {}

    @model_validator(mode="after")
    def _pairs(self) -> "GraphSpecDoc":
        inputs = {t.name: t for t in self.inputs}
        outputs = {t.name: t for t in self.outputs}
        if len(inputs) != len(self.inputs) or len(outputs) != len(self.outputs):
            raise ValueError(f"graph {self.name!r} names a tensor twice")
        for source, target in self.state.items():
            if source not in inputs or target not in outputs:
                raise ValueError(f"graph {self.name!r} pairs state {source!r} -> {target!r}, which are not one of "
                                 "its inputs and one of its outputs")
            a, b = inputs[source], outputs[target]
            if a.dtype != b.dtype or len(a.dims) != len(b.dims):  # a cache grows: "past" -> "past + 1"
                raise ValueError(f"graph {self.name!r}: state {source!r} and {target!r} differ in rank or dtype")
        return self

    def spec(self) -> GraphSpec:
        return GraphSpec(self.name, tuple(t.spec() for t in self.inputs), tuple(t.spec() for t in self.outputs),
                         dict(self.state))


class GraphDoc(BaseModel):
    model_config = _strict()
    file: REL_PATH
    spec: GraphSpecDoc


class EncoderIds(BaseModel):
    model_config = _strict()
    cls: Annotated[int, Field(ge=0, le=MAX_SIZE)]
    sep: Annotated[int, Field(ge=0, le=MAX_SIZE)]
    pad: Annotated[int, Field(ge=0, le=MAX_SIZE)]


class BackboneDoc(BaseModel):
    """The parts of the backbone's config the runtime reads; the rest is kept as written."""
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    id2label: Optional[Annotated[dict[Annotated[str, StringConstraints(pattern=r"^[0-9]{1,7}$")],
                                      Annotated[str, StringConstraints(max_length=1024)]],
                                 Field(max_length=1 << 16)]] = None
    eos_token_id: Optional[Union[Annotated[int, Field(ge=0, le=MAX_SIZE)],
                                 Annotated[list[Annotated[int, Field(ge=0, le=MAX_SIZE)]], Field(max_length=64)]]] = None
    n_layer: Optional[Annotated[int, Field(ge=1, le=4096)]] = None             # GPT-2's name
    num_hidden_layers: Optional[Annotated[int, Field(ge=1, le=4096)]] = None   # the others'


class ARMTSettings(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    use_sink: bool = True


class RMTConfigDoc(BaseModel):
    """The model config the bundle was exported from (rmt_model's to_dict): what the runtime
    reads is typed; the rest rebuilds the PyTorch model and is kept as written."""
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    backbone: Optional[BackboneDoc] = None
    armt: Optional[ARMTSettings] = None


class ValidationDoc(BaseModel):
    """The export's validation report: the runtime reads only whether bf16 was validated."""
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    passed: Optional[bool] = None
    bf16: Optional[dict[str, Any]] = None


class ManifestDoc(BaseModel):
    """manifest.json of a bundle (schema version 1)."""
    model_config = _strict()

    schema_version: Literal[MANIFEST_SCHEMA_VERSION]  # type: ignore[valid-type]
    spec_version: Literal[SPEC_VERSION]  # type: ignore[valid-type]
    kind: Literal[KINDS]  # type: ignore[valid-type]
    architecture: Literal[ARCHITECTURES] = "rmt"  # type: ignore[valid-type]
    family: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    num_mem_tokens: SIZE
    segment_size: SIZE
    hidden_size: SIZE
    vocab_size: SIZE
    precision: Literal[PRECISIONS]  # type: ignore[valid-type]
    opset: Annotated[int, Field(ge=7, le=64)]
    graphs: Annotated[dict[Literal[GRAPH_NAMES], GraphDoc], Field(min_length=1)]  # type: ignore[valid-type]
    files: Annotated[dict[REL_PATH, SHA256], Field(min_length=1, max_length=MAX_FILES)]
    producer: Annotated[dict[Annotated[str, StringConstraints(max_length=64)],
                             Annotated[str, StringConstraints(max_length=256)]], Field(max_length=64)]
    validation: Optional[ValidationDoc]
    num_labels: Optional[SIZE] = None
    encoder_ids: Optional[EncoderIds] = None
    tokenizer: Optional[Annotated[list[REL_PATH], Field(max_length=16)]] = None
    rmt_config: Optional[RMTConfigDoc] = None
    created: Optional[Annotated[str, StringConstraints(max_length=64)]] = None
    max_positions: Optional[Annotated[int, Field(ge=1, le=MAX_SIZE)]] = None
    memory_init: Optional[REL_PATH] = None
    state_init: Optional[Annotated[dict[TENSOR_NAME, REL_PATH], Field(max_length=MAX_TENSORS)]] = None

    @model_validator(mode="after")
    def _consistent(self) -> "ManifestDoc":
        check_manifest_rules(self)
        return self

    # Every file the manifest refers to: each must be hashed in ``files``.
    def referenced_files(self) -> list[str]:
        names = [graph.file for graph in self.graphs.values()]
        names += [self.memory_init] if self.memory_init else []
        names += list((self.state_init or {}).values()) + list(self.tokenizer or [])
        return names


def _problem(message: str) -> None:
    raise ValueError(message)


def check_manifest_rules(doc: ManifestDoc) -> None:
    """The cross-field rules: the graphs are what the manifest's kind, architecture and sizes
    say (rebuilt from them and compared), every referenced file is hashed, the options that
    belong to one kind appear with it only."""
    for name, graph in doc.graphs.items():
        if graph.spec.name != name:
            _problem(f"graph {name!r} holds the spec of {graph.spec.name!r}")
    unhashed = [n for n in doc.referenced_files() if n not in doc.files]
    if unhashed:
        _problem(f"files {unhashed[:4]} are named by the manifest but not hashed in 'files'; every file a bundle "
                 "refers to is hashed")
    if STEP not in doc.graphs:
        _problem(f"the manifest has no {STEP!r} graph (has {sorted(doc.graphs)})")
    if doc.kind == "encoder":
        if doc.architecture != "rmt":
            _problem(f"unknown architecture {doc.architecture!r} for kind 'encoder' (expected 'rmt' for an "
                     "encoder)")
        if any(g in doc.graphs for g in GENERATION_GRAPHS):
            _problem("an encoder bundle has no generation graphs (prefill, decode)")
    elif doc.num_labels is not None or doc.encoder_ids is not None:
        _problem("'num_labels' and 'encoder_ids' belong to an encoder; this manifest's kind is 'decoder'")
    if sum(g in doc.graphs for g in GENERATION_GRAPHS) == 1:
        _problem(f"generation needs both {list(GENERATION_GRAPHS)} graphs; the manifest has one")
    needed = doc.segment_size + extra_positions(doc)
    if doc.max_positions is not None and needed > doc.max_positions:
        _problem(f"segment_size {doc.segment_size} with M={doc.num_mem_tokens} needs {needed} positions, the "
                 f"backbone has {doc.max_positions}")
    state = _segment_state(doc)
    if doc.architecture == "rmt":
        memory = next((t for t in state if t.name == "memory"), None)
        if memory is None or memory.dims != ("batch", doc.num_mem_tokens, doc.hidden_size):
            _problem(f"an RMT carries the state 'memory' [batch, M={doc.num_mem_tokens}, D={doc.hidden_size}]; the "
                     f"step graph carries {[(t.name, list(t.dims)) for t in state]}")
        if doc.memory_init is None:
            _problem("manifest has no 'memory_init' field, which a bundle whose graphs carry the state 'memory' "
                     "needs")
    elif doc.memory_init is not None:
        _problem("'memory_init' belongs to an RMT; an ARMT's state starts from 'state_init' or zeros")
    expected = segment_specs(doc, state)
    for name in SEGMENT_GRAPHS:
        if name in doc.graphs and doc.graphs[name].spec.spec() != expected[name]:
            _problem(f"graph {name!r} is not what a {doc.architecture} {doc.kind} of vocab_size={doc.vocab_size}, "
                     f"M={doc.num_mem_tokens}, D={doc.hidden_size}"
                     + (f", num_labels={doc.num_labels}" if doc.num_labels else "")
                     + f" has: {_difference(doc.graphs[name].spec.spec(), expected[name])}")
    if all(g in doc.graphs for g in GENERATION_GRAPHS):
        _check_generation(doc, state)
    unknown_init = sorted(set(doc.state_init or {}) - {t.name for t in state})
    if unknown_init:
        _problem(f"'state_init' names {unknown_init}, which are not state of the graphs")


def extra_positions(doc: ManifestDoc) -> int:
    """Positions one segment takes besides its tokens (rmt_model.config.positions_needed)."""
    if doc.architecture == "armt":
        return doc.num_mem_tokens + sink(doc)
    return 2 * doc.num_mem_tokens if doc.kind == "decoder" else doc.num_mem_tokens + 3


def sink(doc: ManifestDoc) -> int:
    """An ARMT's sink token ahead of each segment (0 or 1; 1 unless rmt_config says otherwise)."""
    if doc.architecture != "armt":
        return 0
    settings = doc.rmt_config.armt if doc.rmt_config is not None else None
    return int(settings.use_sink) if settings is not None else 1


def _segment_state(doc: ManifestDoc) -> tuple[TensorSpec, ...]:
    """The state inputs the step graph declares, in order, each [batch, fixed sizes...] float32."""
    spec = doc.graphs[STEP].spec
    names = set(spec.state)
    state = tuple(t.spec() for t in spec.inputs if t.name in names)
    for tensor in state:
        if tensor.dtype != "float32" or tensor.dims[0] != "batch" or not all(isinstance(d, int)
                                                                              for d in tensor.dims[1:]):
            _problem(f"state {tensor.name!r} must be float32 [batch, fixed sizes...], the step graph says "
                     f"{tensor.dtype}{list(tensor.dims)}")
    return state


def segment_specs(doc: ManifestDoc, state: tuple[TensorSpec, ...]) -> dict[str, GraphSpec]:
    """The step and ingest specs the manifest's geometry implies for the state the step graph
    declares (runtime.spec.step_specs for an RMT's memory; per-layer state for an ARMT)."""
    if doc.architecture == "armt":
        bad = [t.name for t in state if not re.fullmatch(r"(W_mem|z)\.[0-9]{1,4}", t.name)]
        if bad or not state:
            _problem(f"an ARMT's state is W_mem.<layer> and z.<layer>; the step graph carries "
                     f"{[t.name for t in state]}")
    new = {t.name: NEW_STATE + t.name for t in state}
    outputs = tuple(TensorSpec(new[t.name], t.dtype, t.dims) for t in state)
    inputs = (TensorSpec("input_ids", "int64", ("batch", "seq")),
              TensorSpec("attention_mask", "int64", ("batch", "seq")), *state)
    if doc.kind == "decoder":
        logits = TensorSpec("logits", "float32", ("batch", "seq", doc.vocab_size))
        ingest_out: tuple[TensorSpec, ...] = (TensorSpec("last_logits", "float32", ("batch", doc.vocab_size)), *outputs)
    else:
        # num_labels (optional in older manifests) or the step graph's own class count
        labels = doc.num_labels or doc.graphs[STEP].spec.outputs[0].dims[-1]
        logits = TensorSpec("logits", "float32", ("batch", labels))
        ingest_out = outputs
    return {STEP: GraphSpec(STEP, inputs, (logits, *outputs), new), INGEST: GraphSpec(INGEST, inputs, ingest_out, new)}


def _check_generation(doc: ManifestDoc, state: tuple[TensorSpec, ...]) -> None:
    """prefill/decode are what runtime.spec.cached_generation_specs makes from their own cache
    layers, with the reads the architecture takes (RMT: memory in prefill; ARMT: the state in both)."""
    prefill, decode = doc.graphs[PREFILL].spec.spec(), doc.graphs[DECODE].spec.spec()
    caches = [t for t in decode.inputs if t.name.startswith("past.")]
    if not caches or len(caches) % 2 or any(len(t.dims) != 4 or not isinstance(t.dims[1], int)
                                            or not isinstance(t.dims[3], int) for t in caches):
        _problem("the decode graph's key/value caches are not past.<layer>.key/value [batch, heads, past, head_dim]")
    layers = [CacheLayer(heads=t.dims[1], head_dim=t.dims[3]) for t in caches[::2]]
    present = [t for t in prefill.outputs if t.name.startswith("present.")]
    prefix_dim = present[0].dims[2] if present and len(present[0].dims) == 4 else None
    match = re.fullmatch(r"seq(?: \+ ([0-9]+))?", prefix_dim) if isinstance(prefix_dim, str) else None
    if match is None:
        _problem("the prefill graph's present caches are not [batch, heads, seq + k, head_dim]")
    prefix = int(match.group(1) or 0)
    wanted_prefix = sink(doc) if doc.architecture == "armt" else doc.num_mem_tokens
    if prefix != wanted_prefix:
        _problem(f"the prefill graph puts {prefix} positions ahead of the prompt; a {doc.architecture} with these "
                 f"settings puts {wanted_prefix}")
    reads = state
    expected = cached_generation_specs(reads, reads if doc.architecture == "armt" else (), prefix, doc.vocab_size,
                                       layers, caches[0].dtype)
    for name, spec in ((PREFILL, prefill), (DECODE, decode)):
        if spec != expected[name]:
            _problem(f"graph {name!r} is not the generation graph this bundle's geometry implies: "
                     f"{_difference(spec, expected[name])}")


def _difference(have: GraphSpec, want: GraphSpec) -> str:
    """The first way two specs differ, for the error message."""
    for what, mine, theirs in (("inputs", have.inputs, want.inputs), ("outputs", have.outputs, want.outputs)):
        if [t.name for t in mine] != [t.name for t in theirs]:
            return f"{what} {[t.name for t in mine]}, expected {[t.name for t in theirs]}"
        for a, b in zip(mine, theirs):
            if a != b:
                return f"{a.name} is {a.dtype}{list(a.dims)}, expected {b.dtype}{list(b.dims)}"
    return f"state pairs {have.state}, expected {want.state}"


def check_manifest_document(document: Any, source: str) -> ManifestDoc:
    """The manifest's checked model; DocumentError naming every field that is wrong."""
    if not isinstance(document, dict):
        raise DocumentError(f"{source}: manifest must be a JSON object")
    version = document.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > MANIFEST_SCHEMA_VERSION:
        raise DocumentError(f"{source}: manifest schema_version {version} is newer than this rmt-edge reads "
                            f"({MANIFEST_SCHEMA_VERSION}); upgrade rmt-edge or re-export")
    return validated(ManifestDoc, document, source, "manifest")


# ---- the state file's header and counters --------------------------------------------------------
STATE_FORMAT = "rmt-edge/state"
STATE_VERSION = 2
READABLE_STATE_VERSIONS = (1, 2)  # version 1 held the RMT's one state tensor as "memory"


class StateHeaderDoc(BaseModel):
    """The JSON header of a state file."""
    model_config = _strict()
    format: Literal[STATE_FORMAT]  # type: ignore[valid-type]
    version: Literal[READABLE_STATE_VERSIONS]  # type: ignore[valid-type]
    bundle_identity: Annotated[str, StringConstraints(max_length=64)]  # compared with the bundle's own
    bundle_path: Annotated[str, StringConstraints(max_length=4096)]
    batch: Annotated[int, Field(ge=1, le=MAX_BATCH)]
    state: Annotated[list[TENSOR_NAME], Field(max_length=MAX_TENSORS)] = []


def check_state_header(document: Any, source: str) -> StateHeaderDoc:
    """A state file's header, checked (DocumentError naming the field)."""
    if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
        shown = document.get("format") if isinstance(document, dict) else None
        raise DocumentError(f"{source}: not an rmt-edge state file (format {shown!r})")
    version = document.get("version")
    if version not in READABLE_STATE_VERSIONS or isinstance(version, bool):
        raise DocumentError(f"{source}: state version {version!r} is not supported (this rmt-edge reads "
                            f"{list(READABLE_STATE_VERSIONS)})")
    return validated(StateHeaderDoc, document, source, "state header")


def check_state_counters(source: str, lengths, seen, done, has_logits, segment_size: int | None) -> None:
    """The counters of a state's rows agree with each other and stay in range: pending tokens
    are part of tokens_seen; every segment run took 1..segment_size tokens of the rest; a row
    with logits has seen tokens; nothing is above MAX_TOKENS, so no later sum overflows int64."""
    for name, values in (("pending lengths", lengths), ("tokens_seen", seen), ("segments_done", done)):
        if (values < 0).any() or (values > MAX_TOKENS).any():
            raise DocumentError(f"{source}: {name} {values.tolist()} out of range (0..{MAX_TOKENS})")
    run = seen - lengths
    too_many = segment_size is not None and (run > done * segment_size).any()
    if (run < 0).any() or (done > run).any() or too_many:
        raise DocumentError(f"{source}: counters do not add up (tokens_seen {seen.tolist()}, segments_done "
                            f"{done.tolist()}, pending {lengths.tolist()}): each segment run takes 1 to "
                            f"{segment_size or 'segment_size'} of the tokens seen before the pending ones")
    if (has_logits & (seen == 0)).any():
        raise DocumentError(f"{source}: has_logits {has_logits.tolist()} is set for a row that has seen no "
                            f"tokens (tokens_seen {seen.tolist()})")


# ---- TensorRT engine metadata --------------------------------------------------------------------
class EngineMetadataDoc(BaseModel):
    """engines/<graph>-<key>.json: what the engine beside it was built for, and its plan's hash."""
    model_config = _strict()
    builder: Literal["tensorrt", "tensorrt_rtx"]
    trt_version: Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z.+_-]{1,64}$")]
    gpu: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    compute_capability: Annotated[str, StringConstraints(pattern=r"^([0-9]{1,2}\.[0-9]{1,2}|aot)$")]
    precision: Literal[PRECISIONS]  # type: ignore[valid-type]
    fp16_flag: bool
    tf32: bool
    graph: Literal[SEGMENT_GRAPHS]  # type: ignore[valid-type]
    max_batch: Annotated[int, Field(ge=1, le=MAX_ENGINE_BATCH)]
    opt_batch: Annotated[int, Field(ge=1, le=MAX_ENGINE_BATCH)]
    graph_sha256: SHA256
    data_sha256: Annotated[dict[REL_PATH, SHA256], Field(max_length=MAX_FILES)]
    profile: Annotated[dict[TENSOR_NAME, Annotated[list[Annotated[list[Annotated[int, Field(ge=0, le=MAX_SIZE)]],
                                                                   Field(max_length=MAX_DIMS)]],
                                                   Field(min_length=3, max_length=3)]],
                       Field(max_length=MAX_TENSORS)]
    built_at: Annotated[str, StringConstraints(max_length=64)]
    workspace_mb: Annotated[int, Field(ge=1, le=1 << 20)]
    plan_sha256: SHA256
    plan_bytes: Annotated[int, Field(ge=1, le=1 << 40)]

    @model_validator(mode="after")
    def _consistent(self) -> "EngineMetadataDoc":
        if self.opt_batch > self.max_batch:
            _problem(f"opt_batch {self.opt_batch} is above max_batch {self.max_batch}")
        return self

    def fields(self) -> dict[str, Any]:
        """The fields the engine key hashes (everything but when, the workspace and the plan)."""
        return self.model_dump(exclude={"built_at", "workspace_mb", "plan_sha256", "plan_bytes"})


def check_engine_metadata(document: Any, source: str) -> EngineMetadataDoc:
    return validated(EngineMetadataDoc, document, source, "engine metadata")


# ---- the Triton model's parameters ----------------------------------------------------------------
TRITON_PROVIDERS = ("cpu", "cuda", "tensorrt")


def _integer_text(low: int, high: int):
    """A parameter that Triton gives as a string and that must hold an integer in [low, high]."""
    def check(value: str) -> str:
        if not re.fullmatch(r"[0-9]{1,12}", value) or not low <= int(value) <= high:
            raise ValueError(f"expected an integer from {low} to {high}")
        return value
    return AfterValidator(check)


class TritonParametersDoc(BaseModel):
    """The ``rmt.*`` parameters of a Triton model's config.pbtxt (strings, as Triton gives them);
    parameters of other names belong to the user and are left alone."""
    model_config = _strict()
    repository_kind: Optional[Literal["python", "onnxruntime", "tensorrt"]] = None
    segment_size: Optional[Annotated[str, _integer_text(1, MAX_SIZE)]] = None
    bundle_identity: Optional[IDENTITY] = None
    threads: Annotated[str, _integer_text(1, MAX_THREADS)] = "1"
    provider: Literal[TRITON_PROVIDERS] = "cpu"  # type: ignore[valid-type]
    allow_numpy2: Literal["true", "false", ""] = ""


def check_triton_parameters(config: Any, source: str = "config.pbtxt") -> TritonParametersDoc:
    """The model config's ``rmt.*`` parameters, checked; DocumentError naming the parameter."""
    if not isinstance(config, dict):
        raise DocumentError(f"{source}: the model config is not an object")
    raw = config.get("parameters") or {}
    if not isinstance(raw, dict):
        raise DocumentError(f"{source}: 'parameters' is not a map")
    values = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key.startswith("rmt."):
            continue
        if not isinstance(value, dict) or not isinstance(value.get("string_value", ""), str):
            raise DocumentError(f"{source}: parameter {key!r} must have a string_value")
        values[key[len("rmt."):]] = value.get("string_value", "")
    return validated(TritonParametersDoc, values, source, "the model config", prefix="rmt.")


__all__ = ["DocumentError", "ManifestDoc", "StateHeaderDoc", "EngineMetadataDoc", "TritonParametersDoc",
           "read_document", "parse_json", "check_manifest_document", "check_state_header", "check_state_counters",
           "check_engine_metadata", "check_triton_parameters", "relative_path", "MAX_TOKENS"]
