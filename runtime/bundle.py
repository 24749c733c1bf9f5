"""The bundle on disk: manifest.json, the graphs, memory_init.npy, optional tokenizer files.

Torch-free: the exporter writes manifests through ``write_manifest`` and every runtime
reads them through ``Bundle.load``, which checks the schema and every file's sha256
before anything runs.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import as_path
from .spec import GENERATION_GRAPHS, PREFILL, SEGMENT_GRAPHS, SEQ, SPEC_VERSION, GraphSpec, resolve_dim

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
MEMORY_INIT_NAME = "memory_init.npy"
# Written into a bundle after export by rmt-build (engines/<graph>-<key>.plan|.json, timing-*.cache).
ENGINE_DIR = "engines"
PRECISIONS = ("fp32", "fp16", "int8")

# Fields every manifest of this schema has, with their JSON types.
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema_version": int, "spec_version": int, "kind": str, "family": str,
    "num_mem_tokens": int, "segment_size": int, "hidden_size": int, "vocab_size": int,
    "precision": str, "opset": int, "graphs": dict, "files": dict,
    "producer": dict, "validation": (dict, type(None)),
}
# memory_init: the RMT's initial memory (required when a graph has the state "memory").
# architecture: "rmt" (absent) or "armt", whose state is per-layer W_mem/z pairs (docs/ARMT.md).
OPTIONAL_FIELDS = {"num_labels", "encoder_ids", "tokenizer", "rmt_config", "created", "max_positions", "state_init",
                   "memory_init", "architecture"}
ARCHITECTURES = ("rmt", "armt")


class BundleError(Exception):
    """A bundle that cannot be used: missing, malformed, from a newer schema, or altered."""


def manifest_paths(manifest: dict[str, Any]) -> list[str]:
    """Every file path a manifest names: hashed files, graphs, initial state, tokenizer files."""
    names = list(manifest.get("files", {}))
    names += [g.get("file") for g in manifest.get("graphs", {}).values() if isinstance(g, dict)]
    names += [manifest.get("memory_init")] + list(dict(manifest.get("state_init") or {}).values())
    names += list(manifest.get("tokenizer") or [])
    return [n for n in names if n is not None]


def _check_relative(name: Any, source: str) -> None:
    """A manifest path must be a plain relative path that stays inside the bundle."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"{source}: manifest names a file as {name!r}; expected a file name inside the bundle")
    path = Path(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or name.startswith("~"):
        raise BundleError(f"{source}: manifest path {name!r} leaves the bundle directory; every file of a bundle "
                          "must be inside it (a relative path without '..')")


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


def check_manifest(manifest: Any, source: str) -> None:
    """Raise BundleError naming the first field that is missing, unknown or mistyped."""
    if not isinstance(manifest, dict):
        raise BundleError(f"{source}: manifest must be a JSON object")
    version = manifest.get("schema_version")
    if isinstance(version, int) and version > MANIFEST_SCHEMA_VERSION:
        raise BundleError(f"{source}: manifest schema_version {version} is newer than this rmt-edge "
                          f"reads ({MANIFEST_SCHEMA_VERSION}); upgrade rmt-edge or re-export")
    for name, kind in REQUIRED_FIELDS.items():
        if name not in manifest:
            raise BundleError(f"{source}: manifest has no {name!r} field")
        if not isinstance(manifest[name], kind) or (kind is int and isinstance(manifest[name], bool)):
            raise BundleError(f"{source}: manifest field {name!r} has the wrong type "
                              f"({type(manifest[name]).__name__})")
    unknown = sorted(set(manifest) - set(REQUIRED_FIELDS) - OPTIONAL_FIELDS)
    if unknown:
        raise BundleError(f"{source}: manifest has unknown field(s) {unknown}")
    if version != MANIFEST_SCHEMA_VERSION:
        raise BundleError(f"{source}: manifest schema_version {version!r} is not supported "
                          f"(expected {MANIFEST_SCHEMA_VERSION})")
    if manifest["spec_version"] != SPEC_VERSION:
        raise BundleError(f"{source}: step spec version {manifest['spec_version']} is not supported "
                          f"(expected {SPEC_VERSION})")
    if manifest["precision"] not in PRECISIONS:
        raise BundleError(f"{source}: unknown precision {manifest['precision']!r} (expected one of {PRECISIONS})")
    if manifest["kind"] not in ("decoder", "encoder"):
        raise BundleError(f"{source}: unknown kind {manifest['kind']!r} (expected decoder or encoder)")
    architecture = manifest.get("architecture", "rmt")
    if architecture not in ARCHITECTURES or (architecture == "armt" and manifest["kind"] != "decoder"):
        raise BundleError(f"{source}: unknown architecture {architecture!r} for kind {manifest['kind']!r} (expected "
                          "'rmt', or 'armt' for a decoder)")
    for name, graph in manifest["graphs"].items():
        if not isinstance(graph, dict) or "file" not in graph or "spec" not in graph:
            raise BundleError(f"{source}: graph {name!r} needs 'file' and 'spec'")
    memory_init = manifest.get("memory_init")
    if memory_init is not None and not isinstance(memory_init, str):
        raise BundleError(f"{source}: manifest field 'memory_init' has the wrong type ({type(memory_init).__name__})")
    has_memory = any(isinstance(graph.get("spec"), dict) and "memory" in dict(graph["spec"].get("state") or {})
                     for graph in manifest["graphs"].values())
    if has_memory and memory_init is None:
        raise BundleError(f"{source}: manifest has no 'memory_init' field, which a bundle whose graphs carry the "
                          "state 'memory' needs")
    if not isinstance(manifest.get("state_init", {}), dict) or not isinstance(manifest.get("tokenizer") or [], list):
        raise BundleError(f"{source}: manifest fields 'state_init' (an object) or 'tokenizer' (a list) have the "
                          "wrong type")
    for path in manifest_paths(manifest):
        _check_relative(path, source)
    for name, graph in manifest["graphs"].items():
        if graph["file"] not in manifest["files"]:
            raise BundleError(f"{source}: graph {name!r} file {graph['file']!r} is not hashed in 'files'")


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
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        check_manifest(manifest, str(directory))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, BundleError) as exc:
        return f"its {MANIFEST_NAME} is not an rmt-edge manifest ({exc})"
    known = {MANIFEST_NAME, *manifest_paths(manifest)}
    unknown = []
    for entry in sorted(directory.rglob("*")):
        name = entry.relative_to(directory).as_posix()
        if entry.is_symlink() or (entry.is_file() and name not in known and not name.startswith(f"{ENGINE_DIR}/")):
            unknown.append(name)
        elif (entry.is_dir() and name != ENGINE_DIR and not name.startswith(f"{ENGINE_DIR}/")
              and not any(k.startswith(f"{name}/") for k in known)):
            unknown.append(name + "/")
    if unknown:
        return f"it holds files the manifest does not list: {', '.join(unknown[:5])}" + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    return None


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle: geometry, graph specs and file paths. Immutable."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: str | os.PathLike, verify_hashes: bool = True) -> "Bundle":
        """Read and check manifest.json; with verify_hashes, every file must match its sha256."""
        path = as_path(path, "the bundle path", BundleError)
        if not path.exists():
            raise BundleError(f"{path}: no such bundle directory")
        if not path.is_dir():
            raise BundleError(f"{path}: is a file; a bundle is a directory holding {MANIFEST_NAME}")
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise BundleError(f"{path}: no {MANIFEST_NAME}: not a complete bundle "
                              "(an interrupted export leaves none)")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from None
        check_manifest(manifest, source=str(path))
        root = path.resolve()
        for name in manifest_paths(manifest):  # symlinks included: nothing is read from outside
            target = (path / name).resolve()
            if target != root and root not in target.parents:
                raise BundleError(f"{path}: {name} resolves to {target}, outside the bundle directory; refusing "
                                  "to read it")
        bundle = cls(path=path, manifest=manifest)
        bundle.check_geometry()
        if verify_hashes:
            bundle.verify()
        return bundle

    def check_geometry(self) -> None:
        """The manifest's sizes agree with its graph specs: the id check (vocab_size) and the
        state shapes (num_mem_tokens, hidden_size) come from here, so an edited field must not
        disagree with the graphs it describes."""
        size = {"vocab_size": self.vocab_size, "num_mem_tokens": self.num_mem_tokens,
                "hidden_size": self.hidden_size, "segment_size": self.segment_size}
        bad = [f"{name} {value}" for name, value in size.items() if not 1 <= value <= 1 << 24]
        if bad:
            raise BundleError(f"{self.path}: manifest sizes out of range: {', '.join(bad)}")
        problems = []
        limit = self.manifest.get("max_positions")
        needed = self.segment_size + self.extra_positions
        if limit is not None and (not isinstance(limit, int) or needed > limit):
            problems.append(f"segment_size {self.segment_size} with M={self.num_mem_tokens} needs {needed} positions, "
                            f"the backbone has {limit!r}")
        for name in self.graph_names:
            spec = self.graph_spec(name)
            for tensor in (*spec.inputs, *spec.outputs):
                if tensor.name in ("memory", "new_memory") and tuple(tensor.dims[1:]) != (
                        self.num_mem_tokens, self.hidden_size):
                    problems.append(f"{name}.{tensor.name} is {list(tensor.dims)}, the manifest says "
                                    f"M={self.num_mem_tokens}, D={self.hidden_size}")
                if self.kind == "decoder" and tensor.name in ("logits", "last_logits") and tensor.dims[-1] != self.vocab_size:
                    problems.append(f"{name}.{tensor.name} is {list(tensor.dims)}, the manifest says "
                                    f"vocab_size={self.vocab_size}")
        if problems:
            raise BundleError(f"{self.path}: the manifest disagrees with its graph specs: " + "; ".join(problems))

    def verify(self) -> None:
        """Raise BundleError naming each file that is missing or differs from the manifest."""
        problems = []
        for name, expected in self.manifest["files"].items():
            file = self.path / name
            if not file.is_file():
                problems.append(f"{name} is missing")
            elif sha256_file(file) != expected:
                problems.append(f"{name} differs from the manifest's sha256")
        if problems:
            raise BundleError(f"{self.path}: files do not match the manifest: " + "; ".join(problems))

    # ---- geometry ---------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def num_mem_tokens(self) -> int:
        return self.manifest["num_mem_tokens"]

    @property
    def segment_size(self) -> int:
        return self.manifest["segment_size"]

    @property
    def hidden_size(self) -> int:
        return self.manifest["hidden_size"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def architecture(self) -> str:
        """"rmt" (memory tokens carried as the state ``memory``) or "armt" (per-layer associative
        memory: the state pairs ``W_mem.{l}``, ``z.{l}``)."""
        return self.manifest.get("architecture", "rmt")

    @property
    def sink(self) -> int:
        """An ARMT's sink token ahead of each segment (0 or 1; rmt_config says, 1 if it does not)."""
        if self.architecture != "armt":
            return 0
        settings = dict(self.manifest.get("rmt_config") or {}).get("armt")
        return int(bool(settings.get("use_sink", True))) if isinstance(settings, dict) else 1

    @property
    def extra_positions(self) -> int:
        """Positions one segment takes besides its tokens (rmt_model.config.positions_needed):
        an RMT decoder reads and writes memory (2M), an encoder reads it once and frames the
        segment with 3 special tokens, an ARMT has its M write tokens and a sink."""
        if self.architecture == "armt":
            return self.num_mem_tokens + self.sink
        return 2 * self.num_mem_tokens if self.kind == "decoder" else self.num_mem_tokens + 3

    @property
    def cache_prefix(self) -> int:
        """Key/value cache positions ahead of the prompt when generating: k in the prefill
        graph's present caches' "seq + k" (the RMT's M memory tokens, an ARMT's sink, 0 or 1);
        without generation graphs what the architecture puts there."""
        if PREFILL in self.manifest["graphs"]:
            dims = next((t.dims for t in self.graph_spec(PREFILL).outputs if t.name.startswith("present.")), None)
            if dims is not None and len(dims) == 4:
                return resolve_dim(dims[2], {SEQ: 0})
        return self.sink if self.architecture == "armt" else self.num_mem_tokens

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def graph_names(self) -> list[str]:
        return sorted(self.manifest["graphs"])

    @property
    def segment_graph_names(self) -> list[str]:
        """The segment loop's graphs (step, ingest): what every backend runs."""
        return [name for name in self.graph_names if name in SEGMENT_GRAPHS]

    @property
    def has_generation(self) -> bool:
        """True when the bundle holds the KV-cached generation graphs (prefill, decode)."""
        return all(name in self.manifest["graphs"] for name in GENERATION_GRAPHS)

    def graph_spec(self, name: str) -> GraphSpec:
        if name not in self.manifest["graphs"]:
            raise BundleError(f"{self.path}: no graph {name!r} (has {self.graph_names})")
        return GraphSpec.from_dict(self.manifest["graphs"][name]["spec"])

    def graph_path(self, name: str) -> Path:
        self.graph_spec(name)
        return self.path / self.manifest["graphs"][name]["file"]

    @property
    def memory_init_path(self) -> Path:
        if "memory_init" not in self.manifest:
            raise BundleError(f"{self.path}: this {self.architecture} bundle has no memory_init (its state is "
                              f"{sorted(self.state_pairs)})")
        return self.path / self.manifest["memory_init"]

    # ---- state: the named pairs of the segment graphs --------------------------------------
    @property
    def state_pairs(self) -> dict[str, str]:
        """State input -> the output that replaces it, shared by every segment graph."""
        pairs = {name: self.graph_spec(name).state for name in self.segment_graph_names}
        distinct = {tuple(sorted(p.items())) for p in pairs.values()}
        if len(distinct) != 1:
            raise BundleError(f"{self.path}: the segment graphs declare different state pairs: {pairs}")
        return dict(next(iter(pairs.values())))

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each state tensor's shape after the batch axis (fixed by the spec)."""
        spec = self.graph_spec(self.segment_graph_names[0])
        shapes = {}
        for name in self.state_pairs:
            dims = spec.input(name).dims
            if dims[0] != "batch" or not all(isinstance(d, int) for d in dims[1:]):
                raise BundleError(f"{self.path}: state {name!r} must be [batch, fixed sizes...], spec says {dims}")
            shapes[name] = tuple(dims[1:])
        return shapes

    def initial_state(self) -> dict[str, np.ndarray]:
        """Each state tensor's value for a new sequence (no batch axis): from the file the manifest
        names (``memory_init`` for the RMT's memory, ``state_init`` for others), zeros otherwise."""
        files = dict(self.manifest.get("state_init", {}))
        if "memory" in self.state_pairs and "memory_init" in self.manifest:
            files.setdefault("memory", self.manifest["memory_init"])
        initial = {}
        for name, shape in self.state_shapes().items():
            if name not in files:
                initial[name] = np.zeros(shape, np.float32)
                continue
            path = self.path / files[name]
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
            initial[name] = value
        return initial

    @property
    def identity(self) -> str:
        """A short id of this exact bundle: the sha256 of its manifest's file hashes."""
        text = json.dumps(self.manifest["files"], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
