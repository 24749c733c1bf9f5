"""rmt-bench on tiny bundles: every variant measured, ratios to PyTorch, bad input refused."""
import json

from click.testing import CliRunner

from rmt_export.bench import main
from tests.cli.support import one_line_error


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_bench_measures_every_precision_graph_and_batch_against_pytorch(bundle_factory, tiny_checkpoint):
    ckpt, _ = tiny_checkpoint
    fp32, int8 = bundle_factory("gpt2")[1].path, bundle_factory("gpt2", "int8")[1].path
    result = run("--bundle", fp32, "--bundle", int8, "--ckpt", ckpt, "--batches", "1,2", "--segments", 2,
                 "--repeats", 1, "--threads", 1, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    variants = {(row["batch"], row["variant"]) for row in data["rows"]}
    for batch in (1, 2):
        for name in ("fp32 onnxruntime/cpu ingest", "fp32 onnxruntime/cpu step", "int8 onnxruntime/cpu ingest",
                     "int8 onnxruntime/cpu step", "pytorch model(ids) loop (full logits)",
                     "pytorch step(logits='last') loop"):
            assert (batch, name) in variants
    for row in data["rows"]:
        assert row["tokens_per_second"] > 0 and row["segment_ms_p90"] >= row["segment_ms_median"] > 0
        assert row["vs_pytorch"] > 0
        assert (row["gflops"] is None) == row["variant"].startswith("pytorch")
    reference = [r for r in data["rows"] if r["variant"].startswith("pytorch model(ids)")]
    assert all(abs(r["vs_pytorch"] - 1.0) < 1e-9 for r in reference)
    assert data["ceiling"]["gflops"] > 0 and data["machine"]["usable_cores"] >= 1
    skipped = {s["variant"] for s in data["skipped"]}
    assert "fp32 tensorrt" in skipped or any(r["variant"].startswith("fp32 tensorrt") for r in data["rows"])


def test_markdown_table_is_the_default_output(bundle_factory):
    result = run("--bundle", bundle_factory("gpt2")[1].path, "--batches", 1, "--segments", 1, "--repeats", 1,
                 "--graphs", "ingest", "--no-ceiling")  # the ceiling is measured in the test above
    assert result.exit_code == 0, result.output
    assert "| batch | variant | tokens/s |" in result.stdout and "fp32 onnxruntime/cpu ingest" in result.stdout
    assert "- ceiling: 0.0 GFLOP/s (--no-ceiling)" in result.stdout


def test_bundles_of_different_models_are_refused(bundle_factory):
    one_line_error(run("--bundle", bundle_factory("gpt2")[1].path, "--bundle", bundle_factory("bert")[1].path),
                   "has another geometry")
    assert run("--bundle", bundle_factory("gpt2")[1].path, "--batches", "0,x").exit_code == 2
