"""int8 bundles: ONNX Runtime dynamic quantization of MatMul weights, validated like the others."""
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from rmt_export.cli import main as export_main
from rmt_runtime.engines import BuildOptions, EngineError, build_engine
from rmt_export.validate import TOLERANCES
from rmt_model.generation import generate_reference
from rmt_runtime import BackendError, GenerationConfig, RMTRuntime
from rmt_runtime.bundle import Bundle
from tests.cli.support import one_line_error
from tests.export.test_export import _within


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
    for name, graph in report["graphs"].items():  # the report's figures are the measured ones (PARITY)
        for mode in ("teacher_forced", "chained"):
            for output, errors in graph[mode].items():
                worst = max(errors["max_abs"]), max(errors["max_rel"])
                assert _within("int8", output, mode, *worst), (name, mode, output, worst)
        if "argmax_agreement" in graph:  # bert's class logits (< 0.02) leave no decisive position at int8
            agreement = graph["argmax_agreement"]
            assert agreement["teacher_forced_decisive"] == (1.0 if agreement["decisive_positions"] else None)
            assert agreement["decisive_positions"] > 0 or family == "bert"
    # test_export.py::test_graphs_match_the_pytorch_model_on_inputs_of_their_own[*-int8] runs these
    # graphs against the PyTorch model itself.


def test_int8_bundle_runs_on_onnxruntime_and_is_refused_where_it_cannot_run(bundle_factory, tmp_path):
    model, result = bundle_factory("gpt2", "int8")
    int8 = RMTRuntime.load(result.path, backend="onnxruntime")
    ids = list(range(40))
    with torch.no_grad():
        reference = model(torch.tensor([ids]))
    got = int8.run(ids)
    # Measured against PyTorch: memory 1.9e-2, last logits 3.8e-3 (of max |logits| 0.56).
    assert np.abs(got.memory - reference.memory.numpy()).max() < 6e-2
    assert np.abs(got.last_logits - reference.logits[:, -1].numpy()).max() < 2e-2
    # The quantized prefill/decode graphs generate PyTorch's greedy tokens. This prompt's smallest
    # top-2 logit margin along the way is 0.085, 14x the int8 logit error (6.1e-3), so equality
    # is the right check; 40 tokens cross two segment rollovers. (This random tiny model repeats one
    # token: the check is that each of the 40 picks is PyTorch's, not that the text is varied.)
    prompt = np.random.default_rng(21).integers(0, model.config.vocab_size, 21).tolist()
    tokens = int8.generate(prompt, GenerationConfig(max_new_tokens=40)).tokens[0]
    assert tokens == generate_reference(model, prompt, 40)
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
