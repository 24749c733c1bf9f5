"""int8 bundles: ONNX Runtime dynamic quantization of MatMul weights, validated like the others."""
import onnx
import pytest
from click.testing import CliRunner

from rmt_export.cli import main as export_main
from rmt_runtime.engines import BuildOptions, EngineError, build_engine
from rmt_export.validate import TOLERANCES
from rmt_runtime import BackendError, RMTRuntime
from rmt_runtime.bundle import Bundle
from tests.cli.support import one_line_error


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_int8_bundle_quantizes_matmuls_and_passes_validation(bundle_factory, family):
    _, result = bundle_factory(family, "int8")
    report = result.manifest["validation"]
    assert report["passed"] and report["precision"] == "int8" and report["tolerance"] == \
        {**TOLERANCES["int8"].__dict__}
    for name in ("step", "ingest"):
        graph = onnx.load(str(result.path / f"{name}.onnx"))
        ops = [node.op_type for node in graph.graph.node]
        assert ops.count("MatMulInteger") >= 8  # 2 layers: qkv, out, 2 MLP matmuls each
        metadata = {p.key: p.value for p in graph.metadata_props}
        assert metadata["rmt.precision"] == "int8" and "dynamic int8" in metadata["rmt.quantization"]
        assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask", "memory"]
    for graph in report["graphs"].values():
        if "argmax_agreement" in graph:
            assert graph["argmax_agreement"]["teacher_forced_decisive"] == 1.0


def test_int8_bundle_runs_on_onnxruntime_and_is_refused_where_it_cannot_run(bundle_factory, tmp_path):
    model, result = bundle_factory("gpt2", "int8")
    int8 = RMTRuntime.load(result.path, backend="onnxruntime")
    fp32 = RMTRuntime.load(bundle_factory("gpt2", "fp32")[1].path, backend="onnxruntime")
    ids = list(range(40))
    assert abs(int8.run(ids).memory - fp32.run(ids).memory).max() < 0.1
    assert int8.generate(ids[:5]).tokens[0]  # the generation graphs are quantized too
    with pytest.raises(EngineError, match="TensorRT does not take"):
        build_engine(Bundle.load(result.path), "step", BuildOptions(builder="tensorrt_rtx"))
    from rmt_export.reference_backend import reference_runtime
    from rmt_model import save_checkpoint

    checkpoint = save_checkpoint(model, tmp_path / "model.pt")
    with pytest.raises(BackendError, match="int8 .* torch reference backend cannot run"):
        reference_runtime(result.path, checkpoint)


def test_cli_int8_excludes_fp16_and_engine(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    for extra, fragment in ((["--fp16"], "give --fp16 or --int8, not both"),
                            (["--engine"], "int8 (ONNX Runtime quantized) bundles cannot have")):
        result = CliRunner().invoke(export_main, ["--ckpt", str(ckpt), "--out", str(tmp_path / "b"), "--int8", *extra])
        one_line_error(result, fragment)
    assert not (tmp_path / "b").exists()
