"""A Triton Inference Server model repository for a bundle, with implicit sequence state.

Triton's sequence batcher keeps each sequence's memory inside the server: the
``new_memory`` output of one request becomes the ``memory`` input of the next request of
the same sequence id, starting from ``memory_init.npy`` (``initial_state.data_file``). A
client then only streams token segments under one sequence id (``rmt_runtime.triton_client``).

Torch-free: reads a bundle, writes files. Layout written:

    REPO/<name>/config.pbtxt
    REPO/<name>/1/model.onnx                    (the bundle's ingest or step graph)
    REPO/<name>/initial_state/memory_init.bin   (float32 [M, D], row-major)
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmt_runtime.bundle import Bundle
from rmt_runtime.spec import BATCH, INGEST, SEQ, STEP, GraphSpec

from .errors import ExportError

TRITON_TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}
INITIAL_STATE_FILE = "memory_init.bin"


@dataclass(frozen=True)
class TritonOptions:
    """How the model is served."""

    name: str = "rmt"
    graph: str = INGEST            # ingest: last-token logits per segment; step: every position
    max_batch_size: int = 8        # sequences batched into one step
    instances: int = 1
    kind: str = "KIND_GPU"         # KIND_GPU or KIND_CPU
    max_sequence_idle_us: int = 60_000_000
    max_queue_delay_us: int = 1000

    def check(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ExportError(f"model name {self.name!r}: use letters, digits, '-', '_' and '.'")
        if self.graph not in (INGEST, STEP):
            raise ExportError(f"graph must be {INGEST!r} or {STEP!r}, got {self.graph!r}")
        if self.max_batch_size < 1 or self.instances < 1:
            raise ExportError("max_batch_size and instances must be >= 1")
        if self.kind not in ("KIND_GPU", "KIND_CPU"):
            raise ExportError(f"kind must be KIND_GPU or KIND_CPU, got {self.kind!r}")


def _dims(spec_dims) -> str:
    """Triton dims without the batch axis (max_batch_size > 0): symbolic axes become -1."""
    dims = [-1 if d == SEQ else int(d) for d in spec_dims if d != BATCH]
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def config_text(bundle: Bundle, options: TritonOptions) -> str:
    """config.pbtxt for the bundle's graph: I/O from the step spec, memory as implicit state."""
    spec: GraphSpec = bundle.graph_spec(options.graph)
    state_inputs = set(spec.state)
    state_outputs = set(spec.state.values())
    lines = [f'name: "{options.name}"', 'backend: "onnxruntime"', f"max_batch_size: {options.max_batch_size}", ""]
    for section, tensors, hidden in (("input", spec.inputs, state_inputs), ("output", spec.outputs, state_outputs)):
        entries = [f'  {{\n    name: "{t.name}"\n    data_type: {TRITON_TYPES[t.dtype]}\n    dims: {_dims(t.dims)}\n  }}'
                   for t in tensors if t.name not in hidden]
        lines.append(f"{section} [\n" + ",\n".join(entries) + "\n]")
    memory = spec.input("memory")
    states = []
    for state_input, state_output in spec.state.items():
        states.append(
            f'    {{\n      input_name: "{state_input}"\n      output_name: "{state_output}"\n'
            f"      data_type: {TRITON_TYPES[memory.dtype]}\n      dims: {_dims(memory.dims)}\n"
            f'      initial_state: {{\n        name: "{state_input}_init"\n'
            f"        data_type: {TRITON_TYPES[memory.dtype]}\n        dims: {_dims(memory.dims)}\n"
            f'        data_file: "{INITIAL_STATE_FILE}"\n      }}\n    }}')
    lines.append(
        "sequence_batching {\n"
        f"  max_sequence_idle_microseconds: {options.max_sequence_idle_us}\n"
        "  oldest {\n"
        f"    max_candidate_sequences: {options.max_batch_size * 4}\n"
        f"    preferred_batch_size: [ {options.max_batch_size} ]\n"
        f"    max_queue_delay_microseconds: {options.max_queue_delay_us}\n"
        "  }\n"
        "  state [\n" + ",\n".join(states) + "\n  ]\n}")
    lines.append(f"instance_group [\n  {{\n    count: {options.instances}\n    kind: {options.kind}\n  }}\n]")
    lines.append(f'parameters {{ key: "rmt.segment_size" value: {{ string_value: "{bundle.segment_size}" }} }}')
    lines.append(f'parameters {{ key: "rmt.bundle_identity" value: {{ string_value: "{bundle.identity}" }} }}')
    return "\n".join(lines) + "\n"


def write_triton_repository(bundle_dir: str | os.PathLike, repository: str | os.PathLike,
                            options: TritonOptions = TritonOptions(), force: bool = False) -> Path:
    """Write ``repository/<name>/`` for the bundle, atomically; return the model directory."""
    options.check()
    bundle = Bundle.load(bundle_dir)
    repository = Path(repository)
    model_dir = repository / options.name
    if model_dir.exists() and not force:
        raise ExportError(f"{model_dir} already exists; pass --force to replace it")
    if bundle.graph_path(options.graph).with_name(bundle.graph_path(options.graph).name + ".data").exists():
        raise ExportError("graphs with external weights (.onnx.data) are not supported here yet")
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{options.name}.partial-", dir=repository))
    try:
        (staging / "1").mkdir()
        shutil.copyfile(bundle.graph_path(options.graph), staging / "1" / "model.onnx")
        (staging / "initial_state").mkdir()
        memory_init = np.load(bundle.memory_init_path, allow_pickle=False).astype("<f4")
        (staging / "initial_state" / INITIAL_STATE_FILE).write_bytes(memory_init.tobytes(order="C"))
        (staging / "config.pbtxt").write_text(config_text(bundle, options))
        os.chmod(staging, 0o755)
        if model_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{options.name}.old-", dir=repository))
            os.replace(model_dir, retired / options.name)
            os.replace(staging, model_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model_dir
