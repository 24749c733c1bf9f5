"""The int8 ARMT export, node by node: which MatMuls are quantized and which stay float32.

The rule (export/graphs.py ``quantize_graph``, docs/ARMT.md): ONNX Runtime's dynamic int8 for
every MatMul/Gemm with a constant weight of the backbone (attention and MLP projections, the LM
head), and float32 for the associative memory: its projections ``W_mq``, ``W_mk``, ``W_mv``,
``W_mb`` (the Linear modules of rmt_model.armt.AssociativeLayer, read from the model here, not
from the export's own list) and its state math (the einsums reading
and writing ``W_mem.{l}``/``z.{l}``, the DPFP features), whose recurrence amplifies rounding.
The audit's bug this class comes from: an int8 ARMT export that quantized the memory
projections passed the suite, because no test exported an int8 ARMT.

Nodes are mapped to their source modules by the name scopes the dynamo exporter records on
each node (a float node keeps them; the quantizer's nodes have none, so a quantized memory
projection shows as a missing float one) and by the weight initializer a MatMulInteger reads.
"""
import json
import re

import onnx
import pytest

import torch.nn as nn

from rmt_model.armt import AssociativeLayer

QUANTIZED = {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
             "QLinearMatMul", "ConvInteger", "QuantizeLinear", "DequantizeLinear"}
GRAPHS = ("step", "ingest", "prefill", "decode")
BACKBONE_WEIGHTS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@pytest.fixture(scope="module")
def bundle(shared_once):
    """The tiny ARMT of armt_bundle_factory exported in int8 without validation: what is checked
    here is the graph's structure, the same on every CPU; whether int8's answers hold on the CPU
    at hand (AVX2 without VNNI saturates) is the validator's business, not this test's."""
    from rmt_export.exporter import ExportOptions, export_model
    from tests.rmt_model.test_armt import NEWER, make_armt

    model = make_armt("gpt2", w_mv_std=0.05, **NEWER)
    options = ExportOptions(precision="int8", validate=False, generation=True)
    return model, shared_once("bundles/armt-gpt2-int8-structure", lambda path: export_model(model, path, options))


def scopes(node) -> str:
    return next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")


def memory_projection(node) -> tuple[int, str] | None:
    """(layer, projection) of a node traced from ``transformer.h.{layer}.W_m*``; None otherwise."""
    found = re.search(r"\.h\.(\d+)\.(W_m[qkvb])'", scopes(node))
    return (int(found.group(1)), found.group(2)) if found else None


def load(path, graph):
    return onnx.load(str(path / f"{graph}.onnx"), load_external_data=False).graph


def memory_projections(model) -> tuple[str, ...]:
    """The associative memory's projections: every Linear an AssociativeLayer holds itself."""
    layer = next(m for m in model.modules() if isinstance(m, AssociativeLayer))
    names = tuple(name for name, child in layer.named_children() if isinstance(child, nn.Linear))
    assert set(names) == {"W_mq", "W_mk", "W_mv", "W_mb"}
    return names


@pytest.mark.parametrize("graph", GRAPHS)
def test_the_int8_armt_quantizes_the_backbone_and_keeps_the_associative_memory_float(bundle, graph):
    model, path = bundle
    layers = model.num_layers
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["validation"] is None  # structure only (fixture)
    g = load(path, graph)
    constants = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}

    # 1. Every memory projection of every layer is a float MatMul/Gemm reading its float weight.
    projections = {}
    for node in g.node:
        where = memory_projection(node)
        if where is not None and node.op_type in ("MatMul", "Gemm"):
            assert node.input[1] in constants, f"{node.name} ({where}) reads no constant weight"
            projections.setdefault(where, []).append(node.name)
    # The graphs that write the memory use every projection; prefill and decode only read it (W_mq).
    used = memory_projections(model) if graph in ("step", "ingest") else ("W_mq",)
    expected = {(layer, name) for layer in range(layers) for name in used}
    assert set(projections) == expected, (
        f"{graph}: float memory projections {sorted(projections)}, expected {sorted(expected)}: a missing one "
        "was quantized (the quantizer's nodes carry no name scope)")

    # 2. Every other MatMul/Gemm with a constant weight is quantized: the float ones left are the
    #    memory projections and attention's activation x activation products.
    for node in g.node:
        if node.op_type in ("MatMul", "Gemm") and memory_projection(node) is None:
            assert not any(x in constants for x in node.input), f"{graph}: {node.name} of {scopes(node)} stays float"

    # 3. The quantized MatMuls are the backbone's: per layer its four projections, and the LM head.
    integer = [n for n in g.node if n.op_type == "MatMulInteger"]
    assert len(integer) == len(BACKBONE_WEIGHTS) * layers + 1
    named = [n.input[1] for n in integer if n.input[1].startswith("model.")]
    for layer in range(layers):
        for weight in BACKBONE_WEIGHTS:
            assert f"model.model.transformer.h.{layer}.layer.{weight}.weight_quantized" in named, (graph, weight)
    assert not [w for w in named if re.search(r"\.W_m[qkvb]\.", w)]

    # 4. The state math stays float: nothing quantized reads a state tensor or an einsum's result,
    #    and every state tensor is read by float ops only.
    state = {i.name for i in g.input if re.fullmatch(r"(W_mem|z)\.\d+", i.name)}
    assert len(state) == 2 * layers
    einsums = [n for n in g.node if n.op_type == "Einsum"]
    assert einsums and all(re.search(r"\.h\.\d+'", scopes(n)) for n in einsums)
    float_results = state | {o for n in einsums for o in n.output}
    for node in g.node:
        if node.op_type in QUANTIZED:
            assert not float_results & set(node.input), f"{graph}: {node.op_type} {node.name} reads the memory's state"
