"""The bundle on disk: manifest.json, the graphs, memory_init.npy, optional tokenizer files.

Torch-free: the exporter writes manifests through ``write_manifest`` and every runtime
reads them through ``Bundle.load``. The manifest is checked by its one schema
(``rmt_runtime.schema.ManifestDoc``: types, ranges, unknown fields, the graphs rebuilt from
the geometry and compared), every file it or its graphs refer to must be hashed in it, and
every file's sha256 is checked before anything runs. Fields are read only from the checked
document (``Bundle.doc``) through the properties below.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import limits
from .atomic import as_path
from .errors import BundleError  # noqa: F401 (rmt_runtime.bundle.BundleError, as before)
from .onnx_refs import OnnxFormatError, external_data_files
from .schema import (ARCHITECTURES, MANIFEST_LIMIT, MANIFEST_SCHEMA_VERSION, PRECISIONS,  # noqa: F401 (re-exported)
                     DocumentError, ManifestDoc, check_manifest_document, extra_positions, parse_json, read_document,
                     relative_path, sink)
from .spec import GENERATION_GRAPHS, PREFILL, SEGMENT_GRAPHS, SEQ, GraphSpec, resolve_dim

MANIFEST_NAME = "manifest.json"
MEMORY_INIT_NAME = "memory_init.npy"
# Written into a bundle after export by rmt-build (engines/<graph>-<key>.plan|.json, timing-*.cache).
ENGINE_DIR = "engines"
# Manifest fields that report on a bundle rather than define it: not part of its identity.
REPORT_FIELDS = ("created", "producer", "validation")
# The largest initial-state file: far above any real memory (M x D float32).
STATE_INIT_LIMIT = 1 << 30


def manifest_paths(doc: ManifestDoc) -> list[str]:
    """Every file path a checked manifest names: hashed files, graphs, initial state, tokenizer files."""
    return sorted({*doc.files, *doc.referenced_files()})


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (graphs can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Hash every file the manifest lists and write manifest.json (fsynced) into ``directory``."""
    directory = Path(directory)
    manifest = dict(manifest)
    manifest["files"] = {name: sha256_file(directory / name) for name in sorted(manifest["files"])}
    check_manifest(manifest, source=str(directory))
    path = directory / MANIFEST_NAME
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    return path


def check_manifest(manifest: Any, source: str) -> ManifestDoc:
    """The manifest checked by its schema; BundleError naming every field that is wrong."""
    try:
        return check_manifest_document(manifest, source)
    except DocumentError as exc:
        raise BundleError(str(exc)) from None


def read_manifest(directory: str | os.PathLike) -> tuple[dict[str, Any], ManifestDoc]:
    """manifest.json of ``directory``, read (a regular file, size-bounded, strict JSON) and checked."""
    path = Path(directory) / MANIFEST_NAME
    try:
        manifest = parse_json(read_document(path, MANIFEST_LIMIT, "manifest"), str(path), "manifest")
    except DocumentError as exc:
        raise BundleError(str(exc)) from None
    return manifest, check_manifest(manifest, str(directory))


def not_a_bundle(directory: str | os.PathLike) -> str | None:
    """Why ``directory`` is not a complete rmt-edge bundle (None when it is one): a readable
    manifest of this schema, and no file besides those it lists and the engines rmt-build
    and the ONNX Runtime TensorRT provider wrote (anything under engines/). What
    ``rmt-export --force`` checks before it replaces a directory."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        return f"no {MANIFEST_NAME}"
    try:
        _, doc = read_manifest(directory)
    except BundleError as exc:
        return f"its {MANIFEST_NAME} is not an rmt-edge manifest ({exc})"
    known = {MANIFEST_NAME, *manifest_paths(doc)}
    unknown = []
    for entry in sorted(directory.rglob("*")):
        name = entry.relative_to(directory).as_posix()
        if entry.is_symlink() or (entry.is_file() and name not in known and not name.startswith(f"{ENGINE_DIR}/")):
            unknown.append(name)
        elif (entry.is_dir() and name != ENGINE_DIR and not name.startswith(f"{ENGINE_DIR}/")
              and not any(k.startswith(f"{name}/") for k in known)):
            unknown.append(name + "/")
        elif not (entry.is_file() or entry.is_dir()):
            unknown.append(name)
    if unknown:
        return f"it holds files the manifest does not list: {', '.join(unknown[:5])}" + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    return None


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle: geometry, graph specs and file paths. Immutable.

    ``manifest`` is the document as written (for reports); ``doc`` is its checked model,
    which every property reads."""

    path: Path
    manifest: dict[str, Any]
    doc: ManifestDoc = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.doc is None:  # Bundle(path, manifest) built by hand: checked all the same
            object.__setattr__(self, "doc", check_manifest(self.manifest, str(self.path)))

    @classmethod
    def load(cls, path: str | os.PathLike, verify_hashes: bool = True) -> "Bundle":
        """Read and check manifest.json; with verify_hashes, every file must match its sha256
        and every file the graphs refer to must be one the manifest hashes."""
        path = as_path(path, "the bundle path", BundleError)
        if not path.exists():
            raise BundleError(f"{path}: no such bundle directory")
        if not path.is_dir():
            raise BundleError(f"{path}: is a file; a bundle is a directory holding {MANIFEST_NAME}")
        if not (path / MANIFEST_NAME).exists():
            raise BundleError(f"{path}: no {MANIFEST_NAME}: not a complete bundle "
                              "(an interrupted export leaves none)")
        manifest, doc = read_manifest(path)
        root = path.resolve()
        for name in manifest_paths(doc):  # symlinks included: nothing is read from outside
            target = (path / name).resolve()
            if target != root and root not in target.parents:
                raise BundleError(f"{path}: {name} resolves to {target}, outside the bundle directory; refusing "
                                  "to read it")
        bundle = cls(path=path, manifest=manifest, doc=doc)
        if verify_hashes:
            bundle.verify()
            bundle.check_references()
        return bundle

    def verify(self) -> None:
        """Raise BundleError naming each file that is missing, not a regular file, or differs
        from the manifest."""
        problems = []
        for name, expected in self.doc.files.items():
            file = self.path / name
            if not file.is_file():
                problems.append(f"{name} is missing" if not file.exists() else f"{name} is not a regular file")
            elif sha256_file(file) != expected:
                problems.append(f"{name} differs from the manifest's sha256")
        if problems:
            raise BundleError(f"{self.path}: files do not match the manifest: " + "; ".join(problems))

    def check_references(self) -> None:
        """Every file a graph refers to (its external data) is a file the manifest hashes, so
        that nothing unhashed is read and the bundle's identity covers it."""
        for graph in self.graph_names:
            file = self.doc.graphs[graph].file
            try:
                locations = external_data_files(self.path / file)
            except (OnnxFormatError, OSError, ValueError) as exc:
                raise BundleError(f"{self.path / file}: not a readable ONNX graph ({exc})") from None
            for location in locations:
                try:
                    name = relative_path((Path(file).parent / location).as_posix() if "/" in file else location)
                except ValueError as exc:
                    raise BundleError(f"{self.path / file}: external data {location!r}: {exc}") from None
                if name not in self.doc.files:
                    raise BundleError(f"{self.path / file} reads external data from {location!r}, which the "
                                      f"manifest does not hash; every file a graph refers to must be listed in "
                                      "'files' (re-export the bundle)")

    # ---- geometry: read from the checked document -----------------------------------------
    @property
    def kind(self) -> str:
        return self.doc.kind

    @property
    def family(self) -> str:
        return self.doc.family

    @property
    def num_mem_tokens(self) -> int:
        return self.doc.num_mem_tokens

    @property
    def segment_size(self) -> int:
        return self.doc.segment_size

    @property
    def hidden_size(self) -> int:
        return self.doc.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.doc.vocab_size

    @property
    def num_labels(self) -> int | None:
        return self.doc.num_labels

    @property
    def max_positions(self) -> int | None:
        """The backbone's positions, when the export recorded them."""
        return self.doc.max_positions

    @property
    def tokenizer_files(self) -> list[str]:
        """The tokenizer files the bundle ships (tokenizer.json for the runtime's text)."""
        return list(self.doc.tokenizer or [])

    @property
    def id2label(self) -> dict[int, str]:
        """An encoder's class names by label id, from the backbone config ({} when it has none)."""
        backbone = self.doc.rmt_config.backbone if self.doc.rmt_config is not None else None
        return {int(key): value for key, value in ((backbone.id2label or {}) if backbone else {}).items()}

    @property
    def rmt_config(self) -> dict[str, Any] | None:
        """The model config the bundle was exported from, as written (rmt_model's ``to_dict``;
        None when the manifest has none): what a checkpoint's config is compared with."""
        config = self.doc.rmt_config
        return None if config is None else config.model_dump(exclude_unset=True)

    @property
    def num_layers(self) -> int:
        """The backbone's layer count from its config (0 when the manifest does not say)."""
        backbone = self.doc.rmt_config.backbone if self.doc.rmt_config is not None else None
        return (backbone.n_layer or backbone.num_hidden_layers or 0) if backbone is not None else 0

    @property
    def file_names(self) -> list[str]:
        """Every file of the bundle but manifest.json: those hashed and those the manifest names."""
        return manifest_paths(self.doc)

    @property
    def has_memory_init(self) -> bool:
        """Whether the RMT's initial memory comes from a file (memory_init.npy) rather than zeros."""
        return self.doc.memory_init is not None

    @property
    def file_hashes(self) -> dict[str, str]:
        """Each file of the bundle and its sha256, as the manifest lists them."""
        return dict(self.doc.files)

    @property
    def eos_token_ids(self) -> list[int]:
        """The backbone's end-of-sequence token ids ([] when it has none)."""
        backbone = self.doc.rmt_config.backbone if self.doc.rmt_config is not None else None
        eos = backbone.eos_token_id if backbone is not None else None
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @property
    def validation(self) -> dict[str, Any]:
        """The export's validation report, as written ({} when the manifest has none): for
        reports (``rmt_export.validate.summary_lines``); the runtime itself reads only ``validated_bf16``."""
        report = self.doc.validation
        return {} if report is None else report.model_dump(exclude_unset=True)

    @property
    def validated_bf16(self) -> bool:
        """Whether the export validated these graphs computed in bf16 (rmt-export --bf16)."""
        return self.doc.validation is not None and self.doc.validation.bf16 is not None

    @property
    def architecture(self) -> str:
        """"rmt" (memory tokens carried as the state ``memory``) or "armt" (per-layer associative
        memory: the state pairs ``W_mem.{l}``, ``z.{l}``)."""
        return self.doc.architecture

    @property
    def sink(self) -> int:
        """An ARMT's sink token ahead of each segment (0 or 1; rmt_config says, 1 if it does not)."""
        return sink(self.doc)

    @property
    def extra_positions(self) -> int:
        """Positions one segment takes besides its tokens (rmt_model.config.positions_needed):
        an RMT decoder reads and writes memory (2M), an encoder reads it once and frames the
        segment with 3 special tokens, an ARMT has its M write tokens and a sink."""
        return extra_positions(self.doc)

    @property
    def cache_prefix(self) -> int:
        """Key/value cache positions ahead of the prompt when generating: k in the prefill
        graph's present caches' "seq + k" (the RMT's M memory tokens, an ARMT's sink, 0 or 1);
        without generation graphs what the architecture puts there."""
        if PREFILL in self.doc.graphs:
            dims = next((t.dims for t in self.graph_spec(PREFILL).outputs if t.name.startswith("present.")), None)
            if dims is not None and len(dims) == 4:
                return resolve_dim(dims[2], {SEQ: 0})
        return self.sink if self.architecture == "armt" else self.num_mem_tokens

    @property
    def precision(self) -> str:
        return self.doc.precision

    @property
    def graph_names(self) -> list[str]:
        return sorted(self.doc.graphs)

    @property
    def segment_graph_names(self) -> list[str]:
        """The segment loop's graphs (step, ingest): what every backend runs."""
        return [name for name in self.graph_names if name in SEGMENT_GRAPHS]

    @property
    def has_generation(self) -> bool:
        """True when the bundle holds the KV-cached generation graphs (prefill, decode)."""
        return all(name in self.doc.graphs for name in GENERATION_GRAPHS)

    def graph_spec(self, name: str) -> GraphSpec:
        if name not in self.doc.graphs:
            raise BundleError(f"{self.path}: no graph {name!r} (has {self.graph_names})")
        return self.doc.graphs[name].spec.spec()

    def graph_path(self, name: str) -> Path:
        self.graph_spec(name)
        return self.path / self.doc.graphs[name].file

    def graph_sha256(self, name: str) -> str:
        """The sha256 of a graph's file (hashed in the manifest)."""
        self.graph_spec(name)
        return self.doc.files[self.doc.graphs[name].file]

    def graph_data_sha256(self, name: str) -> dict[str, str]:
        """The sha256 of each of a graph's external-data files (``<graph file>.<suffix>``)."""
        file = self.doc.graphs[name].file
        return {other: sha for other, sha in sorted(self.doc.files.items()) if other.startswith(f"{file}.")}

    @property
    def memory_init_path(self) -> Path:
        if self.doc.memory_init is None:
            raise BundleError(f"{self.path}: this {self.architecture} bundle has no memory_init (its state is "
                              f"{sorted(self.state_pairs)})")
        return self.path / self.doc.memory_init

    # ---- state: the named pairs of the segment graphs --------------------------------------
    @property
    def state_pairs(self) -> dict[str, str]:
        """State input -> the output that replaces it, shared by every segment graph (the schema
        checked that step and ingest declare the same pairs)."""
        return dict(self.graph_spec(self.segment_graph_names[0]).state)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each state tensor's shape after the batch axis (fixed by the spec, checked by the schema)."""
        spec = self.graph_spec(self.segment_graph_names[0])
        return {name: tuple(spec.input(name).dims[1:]) for name in self.state_pairs}

    def initial_state(self) -> dict[str, np.ndarray]:
        """Each state tensor's value for a new sequence (no batch axis): from the file the manifest
        names (``memory_init`` for the RMT's memory, ``state_init`` for others), zeros otherwise."""
        files = dict(self.doc.state_init or {})
        if "memory" in self.state_pairs and self.doc.memory_init is not None:
            files.setdefault("memory", self.doc.memory_init)
        initial = {}
        for name, shape in self.state_shapes().items():
            if name not in files:
                initial[name] = np.zeros(shape, np.float32)
                continue
            path = self.path / files[name]
            try:  # a regular file, checked before it is opened (a FIFO would block the open)
                limits.check_regular(path, STATE_INIT_LIMIT, f"the initial {name!r}")
            except (limits.LimitError, OSError) as exc:
                raise BundleError(f"{path}: {exc}" if isinstance(exc, OSError) else str(exc)) from None
            try:  # the header first: a header claiming 10^12 elements must not allocate them
                with open(path, "rb") as handle:
                    version = np.lib.format.read_magic(handle)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    declared, fortran, dtype = read(handle, max_header_size=1 << 16)
                    if dtype != np.float32 or tuple(declared) != shape or fortran:
                        raise BundleError(f"{path}: initial {name!r} is {dtype}{list(declared)}, the spec needs "
                                          f"float32{list(shape)}")
                    handle.seek(0)
                    value = np.lib.format.read_array(handle, allow_pickle=False)
            except (OSError, ValueError, EOFError) as exc:
                raise BundleError(f"{path}: not a readable .npy array ({exc})") from None
            if value.shape != shape:
                raise BundleError(f"{path}: initial {name!r} holds {value.size} values, the spec needs {list(shape)}")
            if not np.isfinite(value).all():
                raise BundleError(f"{path}: initial {name!r} holds NaN or Inf")
            initial[name] = value
        return initial

    @property
    def identity(self) -> str:
        """A short id of this exact bundle: the sha256 of its checked manifest, less what is a
        report about it (when it was made, by which versions, the validation figures). The
        manifest holds every file's hash (and every file the runtime reads is among them:
        Bundle.check_references) and every field the runtime interprets (segment size, state
        pairs, tokens, labels), so a state saved on it continues only on this very bundle."""
        identified = {k: v for k, v in self.manifest.items() if k not in REPORT_FIELDS}
        text = json.dumps(identified, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
