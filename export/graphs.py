"""One segment of an RMT as an ONNX graph that follows the step spec.

The loop over segments stays in the runtime; only ``step`` is traced (icefall's streaming
export does the same with its step module).
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from transformers import DynamicCache

from rmt_model import RMTBase, RMTDecoder
from rmt_model.step import PRECISION_DTYPES, StepModule
from rmt_runtime.owned_files import create_temporary, remove_file
from rmt_runtime.spec import (DECODE, INGEST, PREFILL, SPEC_VERSION, CacheLayer, GraphSpec, cache_names,
                              generation_specs)

from .errors import ExportError

DTYPES = PRECISION_DTYPES
CACHE_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "float32"}
QUANTIZED_OPS = ("MatMul", "Gemm")
DEFAULT_OPSET = 18
# Dynamo at opset 17 writes opset-18 attributes (invalid); TensorRT 10.x parses up to 20.
SUPPORTED_OPSETS = range(18, 21)
# Beyond 2 GB a single protobuf cannot hold the weights.
EXTERNAL_DATA_BYTES = 1_800_000_000


def step_module(model: RMTBase, graph: str, precision: str) -> StepModule:
    """The module traced for a segment graph: step (all logits) or ingest (last / none)."""
    if graph == INGEST:
        logits = "none" if model.config.kind == "encoder" else "last"
    else:
        logits = "all"
    return StepModule(model, logits, DTYPES[precision])


def _check_opset(opset: int) -> None:
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} is not supported: use {SUPPORTED_OPSETS.start}.."
                          f"{SUPPORTED_OPSETS.stop - 1} (dynamo writes invalid graphs below 18; "
                          "TensorRT 10 parses up to 20)")


def _example_segment(config, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    low = 4 if config.kind == "encoder" else 0
    return (torch.randint(low, config.vocab_size, (batch, config.segment_size), generator=generator),
            torch.ones(batch, config.segment_size, dtype=torch.int64),
            torch.zeros(batch, config.num_mem_tokens, config.hidden_size))


def _trace_and_save(module: nn.Module, model: RMTBase, example: tuple, dynamic_shapes: dict, spec: GraphSpec,
                    precision: str, opset: int, path: str | os.PathLike, metadata: dict[str, str],
                    float_modules: tuple[str, ...] = ()) -> Path:
    """Dynamo-export ``module`` under the spec's names, stamp the metadata, save, check.
    int8: ``float_modules`` (module names such as "W_mq") keep their MatMuls in float32."""
    _check_opset(opset)
    config = model.config
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
    if precision == "int8":
        quantize_graph(path, float_modules)
    check_graph_against_spec(path, spec)
    return path


# The tracing step, public for the other graph modules (export/armt_graphs.py).
trace_and_save = _trace_and_save


def nodes_of_modules(path: Path, modules: tuple[str, ...]) -> list[str]:
    """The MatMul/Gemm nodes traced from modules named ``modules`` (the last part of the module
    path, e.g. "W_mq"), read from the name scopes the dynamo exporter records on each node."""
    import onnx

    if not modules:
        return []
    graph = onnx.load(str(path), load_external_data=False).graph
    found = []
    for node in graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        if node.op_type in QUANTIZED_OPS and any(f".{name}'" in scopes for name in modules):
            found.append(node.name)
    return found


def quantize_graph(path: Path, float_modules: tuple[str, ...] = ()) -> None:
    """Int8 weights for every MatMul/Gemm with a constant weight, in place (ONNX Runtime's
    dynamic quantization: activations are quantized per call, MatMulInteger on the CPU's
    VNNI). Embeddings, LayerNorm, softmax and the carried memory stay float32, and so do the
    MatMuls of ``float_modules`` (an ARMT's memory projections: its recurrence amplifies their
    rounding, docs/ARMT.md)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = nodes_of_modules(path, float_modules)
    if float_modules and not excluded:
        raise ExportError(f"int8: no MatMul of {list(float_modules)} found in {path.name} to keep in float32")
    descriptor, quantized = create_temporary(path)  # a fresh name: never a file that was there
    os.close(descriptor)
    try:
        with warnings.catch_warnings(), _quiet_exporter_logs("root", "onnxruntime"):
            warnings.simplefilter("ignore")
            quantize_dynamic(path, quantized, weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
                             nodes_to_exclude=excluded)
        model = onnx.load(str(quantized))
        if not any(node.op_type == "MatMulInteger" for node in model.graph.node):
            raise ExportError(f"int8 quantization of {path.name} quantized no MatMul (nothing to gain from int8)")
        model.metadata_props.add(key="rmt.quantization",
                                 value="dynamic int8 MatMul/Gemm weights (onnxruntime.quantization)")
        onnx.save(model, str(path))
    finally:
        remove_file(quantized)


def export_graph(model: RMTBase, spec: GraphSpec, precision: str, opset: int,
                 path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Trace ``spec.name`` (step or ingest) of ``model`` with the dynamo exporter and save it.

    Batch and segment length are dynamic (seq 1..segment_size). The geometry goes into
    the graph's metadata_props so that a bare .onnx still says what it is.
    """
    _check_opset(opset)
    config = model.config
    module = step_module(model, spec.name, precision).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=config.segment_size)
    dynamic_shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq},
                      "memory": {0: batch}}
    return _trace_and_save(module, model, _example_segment(config, 2), dynamic_shapes, spec, precision, opset,
                           path, metadata)


def _flat_cache(cache: DynamicCache) -> list[torch.Tensor]:
    """A cache as flat tensors in spec order: layer 0 key, layer 0 value, layer 1 key, ..."""
    return [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]


# Public for the other graph modules (export/armt_graphs.py).
flat_cache = _flat_cache


class PrefillModule(nn.Module):
    """(input_ids, attention_mask, memory) -> (last_logits, present.0.key, present.0.value, ...)."""

    def __init__(self, model: RMTDecoder, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor):
        logits, cache = self.model.prefill(input_ids, attention_mask, memory.to(self.dtype))
        return (logits.float(), *_flat_cache(cache))


class DecodeModule(nn.Module):
    """(input_ids, attention_mask, position_ids, (past.0.key, ...)) -> (logits, present.0.key, ...).

    transformers 5 takes no cache object as a graph input: the flat tensors are wrapped in
    a DynamicCache inside the traced function (FIELD_NOTES.md)."""

    def __init__(self, model: RMTDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: tuple[torch.Tensor, ...]):
        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.model.config)
        logits, cache = self.model.decode(input_ids, attention_mask, position_ids, cache)
        return (logits.float(), *_flat_cache(cache))


def cache_layout(model: RMTDecoder, precision: str) -> list[CacheLayer]:
    """Per-layer key/value geometry, read from one PyTorch prefill (families differ: GQA, head dims)."""
    ids, mask, memory = _example_segment(model.config, 1)
    with torch.no_grad():
        flat = PrefillModule(model, DTYPES[precision])(ids[:, :1], mask[:, :1], memory)[1:]
    return [CacheLayer(heads=int(flat[i].shape[1]), head_dim=int(flat[i].shape[3])) for i in range(0, len(flat), 2)]


def export_generation_graphs(model: RMTDecoder, precision: str, opset: int, directory: Path,
                             metadata: dict[str, str]) -> dict[str, tuple[Path, GraphSpec]]:
    """Trace the prefill and decode graphs into ``directory``; returns name -> (path, spec)."""
    config = model.config
    specs = generation_specs(config.num_mem_tokens, config.hidden_size, config.vocab_size,
                             cache_layout(model, precision), CACHE_DTYPES[precision])
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=config.segment_size)
    # Reference-mode generation may grow the cache up to the backbone's position limit.
    past = torch.export.Dim("past", min=1, max=max((config.max_positions or 8192) - 1, 2))
    ids, mask, memory = _example_segment(config, 2)
    prefill = PrefillModule(model, DTYPES[precision]).eval()
    out: dict[str, tuple[Path, GraphSpec]] = {}
    path = _trace_and_save(prefill, model, (ids, mask, memory),
                           {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq},
                            "memory": {0: batch}},
                           specs[PREFILL], precision, opset, directory / f"{PREFILL}.onnx", metadata)
    out[PREFILL] = (path, specs[PREFILL])
    with torch.no_grad():
        cache = prefill(ids, mask, memory)[1:]
    positions = cache[0].shape[2]
    token = ids[:, :1]
    decode_mask = torch.ones(ids.shape[0], positions + 1, dtype=torch.int64)
    position_ids = torch.full((ids.shape[0], 1), positions, dtype=torch.int64)
    past_names, _ = cache_names(len(cache) // 2)
    path = _trace_and_save(DecodeModule(model).eval(), model, (token, decode_mask, position_ids, tuple(cache)),
                           {"input_ids": {0: batch}, "attention_mask": {0: batch, 1: past + 1},
                            "position_ids": {0: batch}, "past": tuple({0: batch, 2: past} for _ in past_names)},
                           specs[DECODE], precision, opset, directory / f"{DECODE}.onnx", metadata)
    out[DECODE] = (path, specs[DECODE])
    return out


@contextlib.contextmanager
def _quiet_exporter_logs(*names: str):
    """The exporter logs optional-package notes (torchvision...) at WARNING, the quantizer
    advice on the root logger; keep the CLI clean."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", *names)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def check_graph_against_spec(path: str | os.PathLike, spec: GraphSpec) -> None:
    """The saved graph must have exactly the spec's names, dtypes and dims, and pass onnx.checker."""
    import onnx

    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path), load_external_data=False).graph
    numpy_dtype = {onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT: "float32",
                   onnx.TensorProto.FLOAT16: "float16"}
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

