"""The CPU-side TensorRT gate: real tiny RMT step graphs parse and build with TensorRT-RTX
(no GPU needed), broken graphs are reported node by node instead of raising."""
import json
import subprocess
import sys

import pytest

from click.testing import CliRunner

from rmt_export import trt_gate
from rmt_export.cli import check_trt_main
from rmt_runtime.bundle import Bundle
from rmt_runtime.spec import GraphSpec, TensorSpec, step_specs

NUM_MEM, SEGMENT = 4, 16
MISSING = "tensorrt_rtx is not installed (pip install tensorrt-rtx-cu12): no CPU TensorRT gate"


@pytest.fixture(scope="module")
def trt():
    return pytest.importorskip("tensorrt_rtx", reason=MISSING)


@pytest.fixture(scope="module")
def step_graphs(trt, bundle_factory):
    """The step graphs of real exported tiny GPT-2 bundles, fp32 and fp16."""
    paths = {p: bundle_factory("gpt2", p)[1].path / "step.onnx" for p in ("fp32", "fp16")}
    spec = Bundle.load(paths["fp32"].parent).graph_spec("step")
    return spec, paths


def _unsupported_graph(path):
    """x -> Relu -> com.example::FancyOp -> Unique -> Relu -> y: two nodes TensorRT lacks."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["a"], name="head_relu"),
             helper.make_node("FancyOp", ["a"], ["b"], name="mystery_node", domain="com.example"),
             helper.make_node("Unique", ["b"], ["c"], name="unique_node", sorted=1),
             helper.make_node("Relu", ["c"], ["y"], name="tail_relu")]
    graph = helper.make_graph(
        nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(path))
    return GraphSpec("bad", (TensorSpec("x", "float32", ("batch", 4)),),
                     (TensorSpec("y", "float32", ("batch",)),))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_step_graph_builds(trt, step_graphs, precision, capfd):
    spec, paths = step_graphs
    capfd.readouterr()
    result = trt_gate.check_graph(paths[precision], spec, SEGMENT, max_batch=4)
    printed = capfd.readouterr()
    assert result.ok, result.summary()
    assert result.built and result.engine_bytes > 0 and result.build_seconds > 0
    assert result.unsupported_nodes == [] and result.errors == []
    assert result.precision == precision  # read from the graph, not assumed
    assert result.trt_version == trt.__version__ == trt_gate.trt_available()
    assert result.profile["input_ids"] == ((1, 1), (1, SEGMENT), (4, SEGMENT))
    assert result.profile["memory"][2] == (4, NUM_MEM, spec.input("memory").dims[2])
    # The parser's benign notes land in warnings, not on stdout or in errors.
    assert all(isinstance(w, str) for w in result.warnings)
    assert printed.out == "", printed.out


def test_spec_mismatch_is_an_error_not_a_build(trt, step_graphs):
    spec, paths = step_graphs
    hidden, vocab = spec.input("memory").dims[2], spec.output("logits").dims[2]
    wrong = step_specs("decoder", NUM_MEM + 1, hidden, vocab)["step"]
    result = trt_gate.check_graph(paths["fp32"], wrong, SEGMENT)
    assert not result.built and result.engine_bytes == 0
    assert any("'memory'" in e and "axis 1 is 4" in e for e in result.errors), result.errors


def test_unsupported_nodes_are_all_reported_by_name(trt, tmp_path):
    spec = _unsupported_graph(tmp_path / "bad.onnx")
    result = trt_gate.check_graph(tmp_path / "bad.onnx", spec, SEGMENT)
    assert not result.built and result.engine_bytes == 0 and not result.ok
    by_name = {n["node"]: n for n in result.unsupported_nodes}
    assert set(by_name) == {"mystery_node", "unique_node"}, result.unsupported_nodes
    assert by_name["mystery_node"]["op_type"] == "FancyOp"
    assert "Plugin not found" in by_name["mystery_node"]["reason"]
    assert by_name["unique_node"]["op_type"] == "Unique"
    assert result.errors  # a failed gate always says so in errors too


def test_truncated_file_is_a_parse_error_not_an_exception(trt, step_graphs, tmp_path):
    spec, paths = step_graphs
    data = paths["fp32"].read_bytes()
    broken = tmp_path / "truncated.onnx"
    broken.write_bytes(data[: len(data) // 2])
    result = trt_gate.check_graph(broken, spec, SEGMENT)
    assert not result.built and result.engine_bytes == 0
    assert result.unsupported_nodes == []
    assert any("parse" in e.lower() for e in result.errors), result.errors
    missing = trt_gate.check_graph(tmp_path / "nowhere.onnx", spec, SEGMENT)
    assert not missing.built and "not found" in missing.errors[0]


def test_without_tensorrt_rtx_check_graph_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)  # import now raises ImportError
    assert trt_gate.trt_available() is None
    spec = step_specs("decoder", NUM_MEM, 32, 97)["step"]
    with pytest.raises(RuntimeError, match="pip install tensorrt-rtx-cu12"):
        trt_gate.check_graph(tmp_path / "any.onnx", spec, SEGMENT)


def test_module_imports_neither_torch_nor_tensorrt():
    code = ("import sys, rmt_export.trt_gate; "
            "print(sorted(m for m in ('torch', 'tensorrt_rtx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "qwen2", "bert", "roberta"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_graph_of_every_bundle_builds(trt, bundle_factory, family, precision):
    """The CI gate: each exported graph, each family, each precision parses and builds."""
    _, exported = bundle_factory(family, precision)
    results = trt_gate.check_bundle(exported.path, max_batch=4)
    expected = ["ingest", "step"] if family in ("bert", "roberta") else ["decode", "ingest", "prefill", "step"]
    assert [r.graph for r in results] == expected
    for result in results:
        assert result.ok, result.summary()
        assert result.precision == precision and result.engine_bytes > 0



# What TensorRT makes of ONNX CumSum (a cumulative layer; a loop before TensorRT 10.8) and of
# ONNX Loop/Scan: none may come from an exported graph (no CUDA-graph capture of loops).
_LOOPING_LAYERS = {"CUMULATIVE", "TRIP_LIMIT", "RECURRENCE", "ITERATOR", "LOOP_OUTPUT"}


@pytest.mark.parametrize("family, precision", [("gpt2", "fp32"), ("gpt2", "fp16"), ("gpt_neox", "fp32"),
                                               ("llama", "fp32"), ("qwen2", "fp32")])
def test_decoder_graphs_parse_without_cumulative_or_loop_layers(trt, bundle_factory, family, precision):
    """The parsed networks of every decoder graph hold no cumulative and no loop layer (the
    positions used to be a CumSum, which TensorRT 10.3 on JetPack 6 imports as a loop)."""
    _, exported = bundle_factory(family, precision)
    logger = trt.Logger(trt.Logger.ERROR)
    for name in ("step", "ingest", "prefill", "decode"):
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        assert parser.parse_from_file(str(exported.path / f"{name}.onnx")), name
        layers = {network.get_layer(i).type.name for i in range(network.num_layers)}
        assert "MATRIX_MULTIPLY" in layers, (name, sorted(layers))
        assert not layers & _LOOPING_LAYERS, (family, precision, name, sorted(layers & _LOOPING_LAYERS))

def test_cli_reports_every_graph_and_exits_zero(trt, bundle_factory):
    _, exported = bundle_factory("gpt2", "fp16")
    result = CliRunner().invoke(check_trt_main, ["--bundle", str(exported.path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True and [g["graph"] for g in data["graphs"]] == ["decode", "ingest", "prefill", "step"]
    assert all(g["built"] and g["precision"] == "fp16" for g in data["graphs"])


def test_cli_fails_on_a_bundle_whose_graph_was_altered(trt, bundle_factory, tmp_path):
    import shutil

    _, exported = bundle_factory("gpt2", "fp32")
    copy_dir = tmp_path / "bundle"
    shutil.copytree(exported.path, copy_dir)
    (copy_dir / "step.onnx").write_bytes(b"garbage")
    result = CliRunner().invoke(check_trt_main, ["--bundle", str(copy_dir)])
    assert result.exit_code == 1
    assert "step.onnx differs from the manifest's sha256" in result.output and "Traceback" not in result.output


# ---- ARMT bundles: 2 x L named state pairs, DPFP features, L2 norms, the read's division ----
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_graph_of_an_armt_bundle_builds(trt, armt_bundle_factory, precision, record_property):
    """The gate on the tiny ARMT (2 layers, M 4, a sink, segment 16): step, ingest, prefill and
    decode parse and build, in fp32 and fp16 (measured: 1485/1479/889/832 layers in fp32, a few
    more casts in fp16; the DPFP roll/concat, the ReduceL2, the division and the einsums all
    import as plain layers, no loop)."""
    _, path = armt_bundle_factory(precision)
    bundle = Bundle.load(path)
    results = trt_gate.check_bundle(path, max_batch=4)
    assert [r.graph for r in results] == ["decode", "ingest", "prefill", "step"]
    for result in results:
        assert result.ok, result.summary()
        assert result.precision == precision and result.engine_bytes > 0
        record_property(f"{result.graph}_engine_bytes", result.engine_bytes)
    profiles = {r.graph: r.profile for r in results}
    for graph in ("step", "ingest", "prefill"):
        assert profiles[graph]["input_ids"] == ((1, 1), (1, SEGMENT), (4, SEGMENT))
        assert profiles[graph]["W_mem.1"] == tuple((b, *bundle.state_shapes()["W_mem.1"]) for b in (1, 1, 4))
    # prefill writes "seq + 1" cache positions (the sink), decode reads "past" and writes
    # "past + 1"; with rollover (generation's default) decode's cache never holds more than
    # sink + segment - 1 positions, which the profile (sized for M + segment - 1) covers.
    assert bundle.sink == 1
    assert bundle.graph_spec("prefill").output("present.0.key").dims[2] == "seq + 1"
    decode = bundle.graph_spec("decode")
    assert decode.input("past.0.key").dims[2] == "past" and decode.output("present.0.key").dims[2] == "past + 1"
    assert decode.input("attention_mask").dims[1] == "past + 1"
    past_min, _, past_max = (shape[2] for shape in profiles["decode"]["past.0.key"])
    assert past_min == 1 and past_max >= bundle.sink + SEGMENT - 1
    assert profiles["decode"]["attention_mask"][2][1] == past_max + 1


def test_armt_graphs_parse_without_cumulative_or_loop_layers(trt, armt_bundle_factory, record_property):
    """What TensorRT makes of the ARMT's graphs, layer by layer: every op parses (the memory's
    einsums as EINSUM layers, its L2 norms as REDUCE, the DPFP roll as SLICE + CONCATENATION)
    and nothing is a loop."""
    _, path = armt_bundle_factory("fp32")
    logger = trt.Logger(trt.Logger.ERROR)
    for name in ("step", "ingest", "prefill", "decode"):
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        assert parser.parse_from_file(str(path / f"{name}.onnx")), name
        layers = [network.get_layer(i).type.name for i in range(network.num_layers)]
        record_property(f"{name}_layers", len(layers))
        assert {"MATRIX_MULTIPLY", "EINSUM", "REDUCE"} <= set(layers), (name, sorted(set(layers)))
        assert not set(layers) & _LOOPING_LAYERS, (name, sorted(set(layers) & _LOOPING_LAYERS))
