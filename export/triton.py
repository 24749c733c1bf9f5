"""Triton Inference Server model repositories for a bundle: two kinds.

``onnxruntime`` (the GPU deployment; also ``tensorrt`` later): the bundle's ingest or step
graph served by Triton's ONNX Runtime backend, with implicit sequence state, one ``state``
entry per named state pair: the ``new_memory`` output of one request becomes the ``memory``
input of the next request of the same sequence id, starting from ``memory_init.npy``
(``initial_state.data_file``); an ARMT's ``new_W_mem.{l}``/``new_z.{l}`` become
``W_mem.{l}``/``z.{l}``, starting from zeros (``initial_state.zero_data``). Requests are whole
segments. Layout written:

    REPO/<name>/config.pbtxt
    REPO/<name>/1/model.onnx                    (the bundle's ingest or step graph)
    REPO/<name>/initial_state/memory_init.bin   (an RMT: float32 [M, D], row-major)

``python`` (CPU nodes): Triton's Python backend runs ``rmt_runtime`` (ONNX Runtime inside the
server process) and keeps each sequence's memory and partial segment itself, keyed by
correlation id (the Python backend does not carry implicit state; see
``rmt_runtime.triton_model``). Requests are chunks of any length. Layout written:

    REPO/<name>/config.pbtxt
    REPO/<name>/1/model.py                      (imports rmt_runtime.triton_model)
    REPO/<name>/1/bundle/                       (a copy of the bundle)

Every model folder also holds ``.rmt-edge-model.json``: the sha256 of each file written.
``--force`` replaces only a folder whose files are exactly those, unchanged (``not_our_model``).

Either kind is streamed by ``rmt_runtime.triton_client``. Torch-free: reads a bundle,
writes files.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmt_runtime.bundle import Bundle, sha256_file
from rmt_runtime.owned_files import (check_name, directory_reason, new_sibling_directory, remove_tree,
                                     replace_directory)
from rmt_runtime.spec import BATCH, INGEST, SEQ, STEP, GraphSpec
from rmt_runtime.triton_model import (BUNDLE_FOLDER, INPUT_IDS, LAST_LOGITS, MEMORY_OUT, RESUME_MEMORY,
                                      START_MEMORY, TOKENS_SEEN)

from .errors import ExportError

TRITON_TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}
INITIAL_STATE_FILE = "memory_init.bin"
REPOSITORY_KINDS = ("onnxruntime", "python")
MODEL_MARKER = ".rmt-edge-model.json"
MARKER_FORMAT = "rmt-edge/triton-model"
MODEL_PY = '''"""Triton Python-backend model for an rmt-edge bundle (written by rmt-triton --kind python).

The bundle is in bundle/ beside this file; the server's Python environment needs rmt-edge,
onnxruntime and numpy<2 (for Triton 2.51's Python backend). See docs/SCALING.md.
"""
from rmt_runtime.triton_model import TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class TritonOptions:
    """How the model is served.

    repository_kind: ``onnxruntime`` (GPU deployment, implicit state, whole segments) or
    ``python`` (CPU nodes, rmt_runtime inside the server, chunks of any length).
    instance_kind: KIND_GPU or KIND_CPU; default KIND_GPU for onnxruntime, KIND_CPU for python.
    max_sequences: live sequences per instance (the sequence batcher's max_candidate_sequences;
    default 4 x max_batch_size). A sequence beyond it waits in Triton's backlog until one ends.
    threads: ONNX Runtime intra-op threads per instance (python kind).
    """

    name: str = "rmt"
    graph: str = INGEST            # onnxruntime kind: ingest (last-token logits per segment) or step
    max_batch_size: int = 8        # sequences batched into one step
    instances: int = 1
    kind: str | None = None        # instance kind: KIND_GPU or KIND_CPU (None: the repository kind's)
    max_sequence_idle_us: int = 60_000_000
    max_queue_delay_us: int = 1000
    repository_kind: str = "onnxruntime"
    max_sequences: int | None = None
    threads: int = 1

    @property
    def instance_kind(self) -> str:
        if self.kind is not None:
            return self.kind
        return "KIND_CPU" if self.repository_kind == "python" else "KIND_GPU"

    @property
    def candidate_sequences(self) -> int:
        return self.max_sequences if self.max_sequences is not None else self.max_batch_size * 4

    def check(self) -> None:
        check_name(self.name, "model name (--name)", ExportError)  # one folder of the repository
        if self.repository_kind not in REPOSITORY_KINDS:
            raise ExportError(f"repository kind must be one of {REPOSITORY_KINDS}, got {self.repository_kind!r}")
        if self.graph not in (INGEST, STEP):
            raise ExportError(f"graph must be {INGEST!r} or {STEP!r}, got {self.graph!r}")
        if self.repository_kind == "python" and self.graph != INGEST:
            raise ExportError("the python kind returns last-token logits (the ingest graph); --graph step is for "
                              "the onnxruntime kind")
        if self.max_batch_size < 1 or self.instances < 1:
            raise ExportError("max_batch_size and instances must be >= 1")
        if self.candidate_sequences < self.max_batch_size:
            raise ExportError(f"max_sequences ({self.candidate_sequences}) must be >= max_batch_size "
                              f"({self.max_batch_size}): a batch holds one request of each of several sequences")
        if self.threads < 1:
            raise ExportError(f"threads must be >= 1, got {self.threads}")
        if self.max_sequence_idle_us < 1 or self.max_queue_delay_us < 0:
            raise ExportError("max_sequence_idle_us must be >= 1 and max_queue_delay_us >= 0")
        if self.instance_kind not in ("KIND_GPU", "KIND_CPU"):
            raise ExportError(f"kind must be KIND_GPU or KIND_CPU, got {self.instance_kind!r}")
        if self.repository_kind == "python" and self.instance_kind != "KIND_CPU":
            raise ExportError("the python kind runs ONNX Runtime on the CPU inside the server: use KIND_CPU "
                              "(the onnxruntime kind is the GPU deployment)")


def _dims(spec_dims) -> str:
    """Triton dims without the batch axis (max_batch_size > 0): symbolic axes become -1."""
    dims = [-1 if d == SEQ else int(d) for d in spec_dims if d != BATCH]
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _tensor(name: str, data_type: str, dims, extra: str = "") -> str:
    return f'  {{\n    name: "{name}"\n    data_type: {data_type}\n    dims: {dims}{extra}\n  }}'


def _instances_and_parameters(bundle: Bundle, options: TritonOptions) -> list[str]:
    return [f"instance_group [\n  {{\n    count: {options.instances}\n    kind: {options.instance_kind}\n  }}\n]",
            f'parameters {{ key: "rmt.repository_kind" value: {{ string_value: "{options.repository_kind}" }} }}',
            f'parameters {{ key: "rmt.segment_size" value: {{ string_value: "{bundle.segment_size}" }} }}',
            f'parameters {{ key: "rmt.bundle_identity" value: {{ string_value: "{bundle.identity}" }} }}']


def _oldest(options: TritonOptions) -> str:
    return ("  oldest {\n"
            f"    max_candidate_sequences: {options.candidate_sequences}\n"
            f"    preferred_batch_size: [ {options.max_batch_size} ]\n"
            f"    max_queue_delay_microseconds: {options.max_queue_delay_us}\n"
            "  }\n")


def config_text(bundle: Bundle, options: TritonOptions) -> str:
    """config.pbtxt of the repository kind ``options.repository_kind``."""
    if options.repository_kind == "python":
        return python_config_text(bundle, options)
    return onnxruntime_config_text(bundle, options)


# Implicit state, one ``state`` entry per named pair of the graph (an RMT: ``memory``; an ARMT:
# ``W_mem.{l}`` and ``z.{l}`` per layer). What this relies on, from Triton's own documentation:
# ModelSequenceBatching.state is a repeated field, "each sequence holds an implicit state local
# to itself" per entry; State/InitialState ``dims`` are "the shape of the state tensor, not
# including the batch dimension"; InitialState's ``state_data`` is a oneof of ``zero_data``
# ("zero data will be used as long as the field is set") and ``data_file`` (row-major, in the
# model's ``initial_state/`` folder). (model_config.proto, triton-inference-server/common, and
# docs/user_guide/implicit_state_management.md, "State Initialization", triton-inference-server/server.)
def _initial_state_files(bundle: Bundle) -> dict[str, tuple[str | None, np.ndarray]]:
    """Each state's initial-state data file in the repository (None: zeros, zero_data) and its
    value, read once. The RMT's memory keeps its memory_init.bin; any other state starting from
    non-zero values gets ``<name>_init.bin``."""
    files: dict[str, tuple[str | None, np.ndarray]] = {}
    for name, initial in bundle.initial_state().items():
        if name == "memory" and bundle.has_memory_init:
            files[name] = (INITIAL_STATE_FILE, initial)
        else:
            files[name] = (f"{name}_init.bin" if initial.any() else None, initial)
    return files


def _state_entry(state_input: str, state_output: str, spec: GraphSpec, data_file: str | None) -> str:
    tensor = spec.input(state_input)
    data_type, dims = TRITON_TYPES[tensor.dtype], _dims(tensor.dims)
    source = "zero_data: true" if data_file is None else f'data_file: "{data_file}"'
    return (f'    {{\n      input_name: "{state_input}"\n      output_name: "{state_output}"\n'
            f"      data_type: {data_type}\n      dims: {dims}\n"
            f'      initial_state: {{\n        name: "{state_input}_init"\n'
            f"        data_type: {data_type}\n        dims: {dims}\n"
            f"        {source}\n      }}\n    }}")


def onnxruntime_config_text(bundle: Bundle, options: TritonOptions) -> str:
    """config.pbtxt for the bundle's graph: I/O from the step spec, memory as implicit state."""
    spec: GraphSpec = bundle.graph_spec(options.graph)
    state_inputs = set(spec.state)
    state_outputs = set(spec.state.values())
    lines = [f'name: "{options.name}"', 'backend: "onnxruntime"', f"max_batch_size: {options.max_batch_size}", ""]
    for section, tensors, hidden in (("input", spec.inputs, state_inputs), ("output", spec.outputs, state_outputs)):
        entries = [_tensor(t.name, TRITON_TYPES[t.dtype], _dims(t.dims)) for t in tensors if t.name not in hidden]
        lines.append(f"{section} [\n" + ",\n".join(entries) + "\n]")
    files = _initial_state_files(bundle)
    states = [_state_entry(state_input, state_output, spec, files[state_input][0])
              for state_input, state_output in spec.state.items()]
    lines.append(
        "sequence_batching {\n"
        f"  max_sequence_idle_microseconds: {options.max_sequence_idle_us}\n"
        + _oldest(options) +
        "  state [\n" + ",\n".join(states) + "\n  ]\n}")
    lines += _instances_and_parameters(bundle, options)
    return "\n".join(lines) + "\n"


def _control(name: str, kind: str) -> str:
    value = ("data_type: TYPE_UINT64" if kind == "CONTROL_SEQUENCE_CORRID" else "int32_false_true: [ 0, 1 ]")
    return f'    {{\n      name: "{name}"\n      control [ {{ kind: {kind} {value} }} ]\n    }}'


def python_config_text(bundle: Bundle, options: TritonOptions) -> str:
    """config.pbtxt of the python kind: chunks of ids in, last-token logits (and, when asked, the
    memory) out; control inputs START/END/READY/CORRID; the model keeps the state. The memory
    tensors (start_memory, memory, resume_memory) are the RMT's: a bundle without a ``memory``
    state (an ARMT) has none of them, its state never leaves the server."""
    inputs = [_tensor(INPUT_IDS, "TYPE_INT64", "[ -1 ]", "\n    allow_ragged_batch: true")]
    outputs = [_tensor(LAST_LOGITS, "TYPE_FP32", f"[ {bundle.vocab_size} ]")]
    if "memory" in bundle.state_pairs:
        memory_dims = f"[ {bundle.num_mem_tokens}, {bundle.hidden_size} ]"
        inputs.append(_tensor(START_MEMORY, "TYPE_FP32", memory_dims, "\n    optional: true"))
        outputs += [_tensor(MEMORY_OUT, "TYPE_FP32", memory_dims), _tensor(RESUME_MEMORY, "TYPE_FP32", memory_dims)]
    outputs.append(_tensor(TOKENS_SEEN, "TYPE_INT64", "[ 1 ]"))
    controls = [_control("START", "CONTROL_SEQUENCE_START"), _control("END", "CONTROL_SEQUENCE_END"),
                _control("READY", "CONTROL_SEQUENCE_READY"), _control("CORRID", "CONTROL_SEQUENCE_CORRID")]
    lines = [f'name: "{options.name}"', 'backend: "python"', f"max_batch_size: {options.max_batch_size}", "",
             "input [\n" + ",\n".join(inputs) + "\n]",
             "output [\n" + ",\n".join(outputs) + "\n]",
             "sequence_batching {\n"
             f"  max_sequence_idle_microseconds: {options.max_sequence_idle_us}\n"
             "  control_input [\n" + ",\n".join(controls) + "\n  ]\n"
             + _oldest(options) + "}"]
    lines += _instances_and_parameters(bundle, options)
    lines.append(f'parameters {{ key: "rmt.threads" value: {{ string_value: "{options.threads}" }} }}')
    return "\n".join(lines) + "\n"


def _check_python_kind(bundle: Bundle) -> None:
    if bundle.kind != "decoder":
        raise ExportError(f"the python kind serves decoder bundles (last-token logits); {bundle.path} is a "
                          f"{bundle.kind} with state {sorted(bundle.state_pairs)}")


def _fill_onnxruntime(staging: Path, bundle: Bundle, options: TritonOptions) -> None:
    (staging / "1").mkdir()
    shutil.copyfile(bundle.graph_path(options.graph), staging / "1" / "model.onnx")
    files = {data_file: value for data_file, value in _initial_state_files(bundle).values() if data_file}
    if files:
        (staging / "initial_state").mkdir()
    for data_file, value in files.items():  # the RMT's memory: memory_init.npy's values as they are
        (staging / "initial_state" / data_file).write_bytes(value.astype("<f4").tobytes(order="C"))


def _fill_python(staging: Path, bundle: Bundle) -> None:
    (staging / "1").mkdir()
    (staging / "1" / "model.py").write_text(MODEL_PY)
    copy = staging / "1" / BUNDLE_FOLDER
    copy.mkdir()
    for name in sorted({"manifest.json", *bundle.file_names}):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle.path / name, copy / name)
    Bundle.load(copy)  # the copy verifies (hashes) as the server will load it


def write_marker(model_dir: Path) -> None:
    """List every file under ``model_dir`` with its sha256 in MODEL_MARKER (written last)."""
    files = {path.relative_to(model_dir).as_posix(): sha256_file(path)
             for path in sorted(model_dir.rglob("*")) if path.is_file()}
    (model_dir / MODEL_MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "version": 1, "files": files},
                                                     indent=2, sort_keys=True) + "\n")


def _made_from_ours(name: str, path: Path) -> bool:
    """Files the server makes from what rmt-triton wrote: the bytecode Python writes when the
    Python backend imports 1/model.py, and the bundle copy's engines/ (ONNX Runtime TensorRT
    caches, as ``not_a_bundle`` allows)."""
    engines = f"1/{BUNDLE_FOLDER}/engines"
    if name == engines or name.startswith(engines + "/"):
        return True
    if name == "1/__pycache__":
        return path.is_dir()
    return re.fullmatch(r"1/__pycache__/model\.[A-Za-z0-9_.-]+\.pyc", name) is not None and path.is_file()


def not_our_model(model_dir: Path) -> str | None:
    """Why ``model_dir`` is not a model folder rmt-triton wrote and nobody changed since (None: it
    is): its MODEL_MARKER lists every file in it with the sha256 each still has (besides the
    bytecode and engine caches the server makes from them). What ``--force`` checks before it
    replaces a folder."""
    marker = model_dir / MODEL_MARKER
    if not marker.is_file():
        return f"is not a model folder rmt-triton wrote (no {MODEL_MARKER})"
    try:
        listed = json.loads(marker.read_text(encoding="utf-8"))
        if listed.get("format") != MARKER_FORMAT or not isinstance(listed.get("files"), dict):
            raise ValueError(f"format {listed.get('format')!r}, expected {MARKER_FORMAT!r} with 'files'")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        return f"is not a model folder rmt-triton wrote (its {MODEL_MARKER} is unreadable: {exc})"
    files = listed["files"]
    foreign, changed = [], []
    for path in sorted(model_dir.rglob("*")):
        name = path.relative_to(model_dir).as_posix()
        if _made_from_ours(name, path) and not path.is_symlink():
            continue
        if path.is_dir() and not path.is_symlink():
            if not any(k.startswith(f"{name}/") for k in files):
                foreign.append(name + "/")
        elif name != MODEL_MARKER and name not in files:
            foreign.append(name)
        elif name != MODEL_MARKER and (not path.is_file() or sha256_file(path) != files[name]):
            changed.append(name)
    if foreign:
        return f"holds files rmt-triton did not write: {', '.join(foreign[:5])}" + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    if changed:
        return f"holds files changed since rmt-triton wrote them: {', '.join(changed[:5])}"
    return None


def write_triton_repository(bundle_dir: str | os.PathLike, repository: str | os.PathLike,
                            options: TritonOptions = TritonOptions(), force: bool = False) -> Path:
    """Write ``repository/<name>/`` for the bundle, atomically; return the model directory.
    ``force`` replaces only a model folder rmt-triton wrote (``not_our_model``), never a link."""
    options.check()
    bundle = Bundle.load(bundle_dir)
    repository = Path(repository)
    model_dir = repository / options.name
    if (model_dir.exists() or model_dir.is_symlink()) and not force:
        raise ExportError(f"{model_dir} already exists; pass --force to replace it")
    reason = directory_reason(model_dir, not_our_model)
    if reason:
        raise ExportError(f"{model_dir} {reason}; --force replaces only a model folder that rmt-triton wrote, "
                          "so nothing was deleted")
    if options.repository_kind == "python":
        _check_python_kind(bundle)
    elif bundle.graph_path(options.graph).with_name(bundle.graph_path(options.graph).name + ".data").exists():
        raise ExportError("graphs with external weights (.onnx.data) are not supported here yet")
    repository.mkdir(parents=True, exist_ok=True)
    staging = new_sibling_directory(model_dir, "partial")
    try:
        if options.repository_kind == "python":
            _fill_python(staging, bundle)
        else:
            _fill_onnxruntime(staging, bundle, options)
        (staging / "config.pbtxt").write_text(config_text(bundle, options))
        write_marker(staging)
        os.chmod(staging, 0o755)
        replace_directory(staging, model_dir, not_our_model, ExportError)  # checked again: it may have changed
    except BaseException:
        remove_tree(staging)
        raise
    return model_dir
