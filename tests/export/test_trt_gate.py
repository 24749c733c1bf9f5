"""The CPU-side TensorRT gate: real tiny RMT step graphs parse and build with TensorRT-RTX
(no GPU needed), broken graphs are reported node by node instead of raising."""
import copy
import subprocess
import sys
import warnings

import pytest

from rmt_export import trt_gate
from rmt_runtime.spec import GraphSpec, TensorSpec, step_specs

NUM_MEM, SEGMENT = 4, 16
MISSING = "tensorrt_rtx is not installed (pip install tensorrt-rtx-cu12): no CPU TensorRT gate"


@pytest.fixture(scope="module")
def trt():
    return pytest.importorskip("tensorrt_rtx", reason=MISSING)


@pytest.fixture(scope="module")
def step_graphs(trt, tmp_path_factory):
    """A tiny GPT-2 RMT step exported with dynamo at opset 18, fp32 and fp16 (model.half()
    inside; memory and outputs float32 as the spec says), dynamic batch and seq."""
    torch = pytest.importorskip("torch")
    import onnx
    from rmt_model import build_model
    from rmt_model.tiny import tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config("gpt2", num_mem_tokens=NUM_MEM, segment_size=SEGMENT))
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    spec = step_specs("decoder", NUM_MEM, hidden, vocab)["step"]

    class Step(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, memory):
            return self.m.step(input_ids, attention_mask, memory)

    class HalfStep(Step):
        def forward(self, input_ids, attention_mask, memory):
            logits, new_memory = self.m.step(input_ids, attention_mask, memory.half())
            return logits.float(), new_memory.float()

    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("seq", min=1, max=SEGMENT)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq},
               "memory": {0: batch}}
    args = (torch.randint(0, vocab, (2, SEGMENT)), torch.ones(2, SEGMENT, dtype=torch.int64),
            torch.zeros(2, NUM_MEM, hidden))
    out = tmp_path_factory.mktemp("trt_gate")
    paths = {}
    for precision, wrapper in (("fp32", Step(model)), ("fp16", HalfStep(copy.deepcopy(model).half()))):
        path = out / f"step_{precision}.onnx"
        with warnings.catch_warnings():  # the exporter's own notes about torch internals
            warnings.filterwarnings("ignore", message=".*(LeafSpec|axis name).*")
            torch.onnx.export(wrapper.eval(), args, str(path), dynamo=True, opset_version=18,
                              input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_shapes=dynamic, external_data=False)
        onnx.checker.check_model(str(path))
        paths[precision] = path
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
def test_step_graph_builds(trt, step_graphs, precision):
    spec, paths = step_graphs
    result = trt_gate.check_graph(paths[precision], spec, SEGMENT, max_batch=4)
    assert result.ok, result.summary()
    assert result.built and result.engine_bytes > 0 and result.build_seconds > 0
    assert result.unsupported_nodes == [] and result.errors == []
    assert result.precision == precision  # read from the graph, not assumed
    assert result.trt_version == trt.__version__ == trt_gate.trt_available()
    assert result.profile["input_ids"] == ((1, 1), (1, SEGMENT), (4, SEGMENT))
    assert result.profile["memory"][2] == (4, NUM_MEM, spec.input("memory").dims[2])
    # The parser's benign notes land in warnings, not on stdout or in errors.
    assert all(isinstance(w, str) for w in result.warnings)


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
