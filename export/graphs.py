"""One segment of an RMT as an ONNX graph that follows the step spec.

The loop over segments stays in the runtime; only ``step`` is traced (icefall's streaming
export does the same with its step module).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from rmt_model import RMTBase
from rmt_runtime.spec import INGEST, SPEC_VERSION, GraphSpec

from .errors import ExportError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DEFAULT_OPSET = 18
# Dynamo at opset 17 writes opset-18 attributes (invalid); TensorRT 10.x parses up to 20.
SUPPORTED_OPSETS = range(18, 21)
# Beyond 2 GB a single protobuf cannot hold the weights.
EXTERNAL_DATA_BYTES = 1_800_000_000


class StepModule(nn.Module):
    """The traced function: (input_ids, attention_mask, memory) -> the graph's outputs.

    Memory enters and leaves as float32 in every precision; the model inside may be fp16.
    """

    def __init__(self, model: RMTBase, graph: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.graph = graph
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor):
        memory = memory.to(self.dtype)
        if self.model.config.kind == "encoder":
            logits, new_memory = self.model.step(input_ids, attention_mask, memory)
            if self.graph == INGEST:
                return (new_memory.float(),)
            return logits.float(), new_memory.float()
        logits, new_memory = self.model.step(input_ids, attention_mask, memory,
                                             logits="last" if self.graph == INGEST else "all")
        return logits.float(), new_memory.float()


def model_in_precision(model: RMTBase, precision: str) -> RMTBase:
    """The model to trace: the model itself for fp32, an fp16 copy otherwise."""
    if precision == "fp32":
        return model
    return copy.deepcopy(model).to(DTYPES[precision]).eval()


def export_graph(model: RMTBase, spec: GraphSpec, precision: str, opset: int,
                 path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Trace ``spec.name`` of ``model`` with the dynamo exporter and save it to ``path``.

    Batch and segment length are dynamic (seq 1..segment_size). The geometry goes into
    the graph's metadata_props so that a bare .onnx still says what it is.
    """
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} is not supported: use {SUPPORTED_OPSETS.start}.."
                          f"{SUPPORTED_OPSETS.stop - 1} (dynamo writes invalid graphs below 18; "
                          "TensorRT 10 parses up to 20)")
    config = model.config
    module = StepModule(model, spec.name, DTYPES[precision]).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=config.segment_size)
    example_batch, example_seq = 2, config.segment_size
    generator = torch.Generator().manual_seed(0)
    low = 4 if config.kind == "encoder" else 0
    example = (
        torch.randint(low, config.vocab_size, (example_batch, example_seq), generator=generator),
        torch.ones(example_batch, example_seq, dtype=torch.int64),
        torch.zeros(example_batch, config.num_mem_tokens, config.hidden_size),
    )
    dynamic_shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq},
                      "memory": {0: batch}}
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_exporter_logs():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, example, dynamo=True, opset_version=opset, verbose=False,
                input_names=spec.input_names, output_names=spec.output_names,
                dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"tracing the {spec.name} graph of the {config.family} RMT failed: {first}") from exc
    program.model.metadata_props.update(metadata)
    program.model.metadata_props.update({"rmt.graph": spec.name, "rmt.spec_version": str(SPEC_VERSION)})
    program.model.producer_name = "rmt-edge"
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    path = Path(path)
    program.save(path, external_data=size * (0.5 if precision == "fp16" else 1) > EXTERNAL_DATA_BYTES)
    check_graph_against_spec(path, spec)
    return path


@contextlib.contextmanager
def _quiet_exporter_logs():
    """The exporter logs optional-package notes (torchvision...) at WARNING; keep the CLI clean."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_graph_against_spec(path: str | os.PathLike, spec: GraphSpec) -> None:
    """The saved graph must have exactly the spec's names, dtypes and dims, and pass onnx.checker."""
    import onnx

    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path), load_external_data=False).graph
    numpy_dtype = {onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT: "float32"}
    problems = []
    for expected, actual in ((spec.inputs, graph.input), (spec.outputs, graph.output)):
        if [t.name for t in expected] != [v.name for v in actual]:
            problems.append(f"names {[v.name for v in actual]} != spec {[t.name for t in expected]}")
            continue
        for tensor, value in zip(expected, actual):
            dtype = numpy_dtype.get(value.type.tensor_type.elem_type, str(value.type.tensor_type.elem_type))
            dims = tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)
            if dtype != tensor.dtype or dims != tuple(tensor.dims):
                problems.append(f"{tensor.name}: {dtype}{list(dims)} != spec {tensor.dtype}{list(tensor.dims)}")
    if problems:
        raise ExportError(f"{path}: the {spec.name} graph does not follow the step spec: " + "; ".join(problems))

