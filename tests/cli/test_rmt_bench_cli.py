"""rmt-bench on tiny bundles: every variant measured, ratios to PyTorch, bad input refused."""
import json
import re
import sys

import onnxruntime
import pytest
from click.testing import CliRunner

from rmt_export.bench import main
from tests.cli.support import one_line_error

CPU_ONLY = "provider {0!r} ({1}) is not in this onnxruntime build (available: ['CPUExecutionProvider'])"
NO_TENSORRT = "the tensorrt module is not importable here"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def cpu_only(monkeypatch):
    """The same machine everywhere: ONNX Runtime lists only its CPU provider and TensorRT does not
    import, so which variants run and which are skipped (and why) is known exactly."""
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import now raises ImportError


def test_bench_measures_every_precision_graph_and_batch_against_pytorch(bundle_factory, tiny_checkpoint, cpu_only):
    ckpt, _ = tiny_checkpoint
    fp32, int8 = bundle_factory("gpt2")[1].path, bundle_factory("gpt2", "int8")[1].path
    result = run("--bundle", fp32, "--bundle", int8, "--ckpt", ckpt, "--batches", "1,2", "--segments", 2,
                 "--repeats", 1, "--threads", 1, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    measured = ("fp32 onnxruntime/cpu ingest", "fp32 onnxruntime/cpu step", "int8 onnxruntime/cpu ingest",
                "int8 onnxruntime/cpu step", "pytorch model(ids) loop (full logits)", "pytorch step(logits='last') loop")
    assert sorted((row["batch"], row["variant"]) for row in data["rows"]) == sorted(
        (batch, name) for batch in (1, 2) for name in measured)
    for row in data["rows"]:
        assert row["tokens_per_second"] > 0 and row["segment_ms_p90"] >= row["segment_ms_median"] > 0
        assert row["vs_pytorch"] > 0
        assert (row["gflops"] is None) == row["variant"].startswith("pytorch")
    reference = [r for r in data["rows"] if r["variant"].startswith("pytorch model(ids)")]
    assert len(reference) == 2 and all(abs(r["vs_pytorch"] - 1.0) < 1e-9 for r in reference)
    assert data["ceiling"]["gflops"] > 0 and data["machine"]["usable_cores"] >= 1
    skipped = {s["variant"]: s["reason"] for s in data["skipped"]}
    assert sorted(skipped) == sorted(f"{p} {v}" for p in ("fp32", "int8")
                                     for v in ("onnxruntime/cuda", "onnxruntime/tensorrt", "tensorrt"))
    for precision in ("fp32", "int8"):
        assert skipped[f"{precision} onnxruntime/cuda"].startswith(CPU_ONLY.format("cuda", "CUDAExecutionProvider"))
        assert skipped[f"{precision} onnxruntime/tensorrt"].startswith(
            CPU_ONLY.format("tensorrt", "TensorrtExecutionProvider"))
        assert skipped[f"{precision} tensorrt"].startswith(NO_TENSORRT)


def test_markdown_table_is_the_default_output(bundle_factory, cpu_only):
    result = run("--bundle", bundle_factory("gpt2")[1].path, "--batches", 1, "--segments", 1, "--repeats", 1,
                 "--graphs", "ingest", "--no-ceiling")  # the ceiling is measured in the test above
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "| batch | variant | tokens/s | segment ms (median) | p90 | vs PyTorch | GFLOP/s | of ceiling |" in lines
    rows = [line for line in lines if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 1, result.stdout  # one variant runs here: fp32 on the CPU provider, ingest
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:2] == ["1", "fp32 onnxruntime/cpu ingest"] and float(cells[2].replace(",", "")) > 0
    assert cells[5] == "-"  # no --ckpt: no PyTorch ratio
    assert "- ceiling: 0.0 GFLOP/s (--no-ceiling)" in lines
    assert sum(line.startswith("- skipped fp32 ") for line in lines) == 3


def test_bundles_of_different_models_are_refused(bundle_factory):
    one_line_error(run("--bundle", bundle_factory("gpt2")[1].path, "--bundle", bundle_factory("bert")[1].path),
                   "has another geometry")
    assert run("--bundle", bundle_factory("gpt2")[1].path, "--batches", "0,x").exit_code == 2


def test_an_armt_bundle_is_measured_against_its_pytorch_model(armt_bundle_factory, armt_checkpoint, cpu_only):
    """An ARMT bundle (named state pairs, no memory tensor) and its checkpoint: the runtime's rows
    and the ARMT's own PyTorch segment loop over the same segments, as for an RMT."""
    _, bundle = armt_bundle_factory("fp32")
    result = run("--bundle", bundle, "--ckpt", armt_checkpoint, "--batches", 1, "--segments", 2, "--repeats", 1,
                 "--threads", 1, "--no-ceiling", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert sorted(row["variant"] for row in data["rows"]) == sorted(
        ["fp32 onnxruntime/cpu ingest", "fp32 onnxruntime/cpu step", "pytorch model(ids) loop (full logits)",
         "pytorch step(logits='last') loop"])
    for row in data["rows"]:
        assert row["tokens_per_second"] > 0 and row["vs_pytorch"] > 0
        assert (row["gflops"] is None) == row["variant"].startswith("pytorch")
    table = run("--bundle", bundle, "--ckpt", armt_checkpoint, "--batches", 1, "--segments", 1, "--repeats", 1,
                "--threads", 1, "--no-ceiling", "--graphs", "ingest")
    assert table.exit_code == 0, table.output
    rows = [line for line in table.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [line.split("|")[2].strip() for line in rows] == [
        "fp32 onnxruntime/cpu ingest", "pytorch model(ids) loop (full logits)", "pytorch step(logits='last') loop"]


def test_segment_flops_of_an_armt_count_its_sink_and_write_tokens_but_not_its_memory(armt_bundle_factory):
    from rmt_export.bench import segment_gflop
    from rmt_runtime import Bundle

    bundle = Bundle.load(armt_bundle_factory("fp32")[1])
    positions = 16 + 4 + 1  # segment, M write tokens, sink
    assert bundle.extra_positions == positions - 16
    # The tiny GPT-2 backbone: 2 layers of D 32 (c_attn 32x96, c_proj 32x32, MLP 32x128 and 128x32),
    # the LM head (vocab 97) on one row, attention 4 x layers x positions^2 x D; no memory projection.
    weights = 2 * (32 * 96 + 32 * 32 + 2 * 32 * 128)
    expected = 2 * positions * weights + 2 * 97 * 32 + 4 * 2 * positions ** 2 * 32
    assert segment_gflop(bundle, "ingest", 1) == pytest.approx(expected / 1e9)
    assert segment_gflop(bundle, "ingest", 3) == pytest.approx(3 * expected / 1e9)
