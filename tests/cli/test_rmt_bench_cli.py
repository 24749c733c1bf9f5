"""rmt-bench on tiny bundles: every variant measured, ratios to PyTorch peers, peers that cannot
run reported, bad input refused."""
import json
import re
import shutil
import sys

import onnxruntime
import pytest
from click.testing import CliRunner

from rmt_export.bench import main
from tests.cli.support import one_line_error

CPU_ONLY = "provider {0!r} ({1}) is not in this onnxruntime build (available: ['CPUExecutionProvider'])"
NO_TENSORRT = "the tensorrt module is not importable here"
NO_OPENVINO = "the openvino backend needs OpenVINO: pip install openvino"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def cpu_only(monkeypatch):
    """The same machine everywhere: ONNX Runtime lists only its CPU provider, and neither TensorRT
    nor OpenVINO imports (test_openvino_rows_* covers it), so which variants run and which are
    skipped (and why) is known exactly."""
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "openvino", None)


def test_bench_measures_every_precision_graph_and_batch_against_pytorch(bundle_factory, tiny_checkpoint, cpu_only):
    ckpt, _ = tiny_checkpoint
    fp32, int8 = bundle_factory("gpt2")[1].path, bundle_factory("gpt2", "int8")[1].path
    result = run("--bundle", fp32, "--bundle", int8, "--ckpt", ckpt, "--peers", "eager", "--batches", "1,2",
                 "--segments", 2, "--repeats", 1, "--threads", 1, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    measured = ("fp32 onnxruntime/cpu ingest", "fp32 onnxruntime/cpu step", "int8 onnxruntime/cpu ingest",
                "int8 onnxruntime/cpu step", "pytorch model(ids) loop (full logits)", "pytorch eager fp32")
    assert sorted((row["batch"], row["variant"]) for row in data["rows"]) == sorted(
        (batch, name) for batch in (1, 2) for name in measured)
    for row in data["rows"]:
        assert row["tokens_per_second"] > 0 and row["segment_ms_p90"] >= row["segment_ms_median"] > 0
        assert row["vs_pytorch"] > 0 and row["not_run"] is None and row["compile_seconds"] is None
        assert (row["gflops"] is None) == row["variant"].startswith("pytorch")
        # The headline ratio: ingest rows and the peers, over the eager peer (the only one here).
        assert (row["vs_best_pytorch"] is None) == (row["variant"].endswith(" step") or "full logits" in row["variant"])
    assert data["peers"] == ["eager"] and [b["batch"] for b in data["best_pytorch"]] == [1, 2]
    assert {b["variant"] for b in data["best_pytorch"]} == {"pytorch eager fp32"}
    assert all(abs(r["vs_best_pytorch"] - 1.0) < 1e-9 for r in data["rows"] if r["variant"] == "pytorch eager fp32")
    reference = [r for r in data["rows"] if r["variant"].startswith("pytorch model(ids)")]
    assert len(reference) == 2 and all(abs(r["vs_pytorch"] - 1.0) < 1e-9 for r in reference)
    assert data["ceiling"]["gflops"] > 0 and data["machine"]["usable_cores"] >= 1
    skipped = {s["variant"]: s["reason"] for s in data["skipped"]}
    assert sorted(skipped) == sorted(f"{p} {v}" for p in ("fp32", "int8") for v in (
        "onnxruntime/cuda", "onnxruntime/tensorrt", "tensorrt", "openvino/fp32", "openvino/bf16"))
    for precision in ("fp32", "int8"):
        assert skipped[f"{precision} onnxruntime/cuda"].startswith(CPU_ONLY.format("cuda", "CUDAExecutionProvider"))
        assert skipped[f"{precision} onnxruntime/tensorrt"].startswith(
            CPU_ONLY.format("tensorrt", "TensorrtExecutionProvider"))
        assert skipped[f"{precision} tensorrt"].startswith(NO_TENSORRT)
    assert skipped["fp32 openvino/bf16"].startswith(NO_OPENVINO)
    assert skipped["int8 openvino/bf16"].startswith("the openvino backend runs fp32 bundles")


def test_markdown_table_is_the_default_output(bundle_factory, cpu_only):
    result = run("--bundle", bundle_factory("gpt2")[1].path, "--batches", 1, "--segments", 1, "--repeats", 1,
                 "--graphs", "ingest", "--no-ceiling")  # the ceiling is measured in the test above
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert ("| batch | variant | tokens/s | segment ms (median) | p90 | vs best PyTorch | vs model(ids) | GFLOP/s "
            "| of ceiling |") in lines
    rows = [line for line in lines if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 1, result.stdout  # one variant runs here: fp32 on the CPU provider, ingest
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:2] == ["1", "fp32 onnxruntime/cpu ingest"] and float(cells[2].replace(",", "")) > 0
    assert cells[5] == cells[6] == "-"  # no --ckpt: no PyTorch ratios
    assert "- ceiling: 0.0 GFLOP/s (--no-ceiling)" in lines
    assert sum(line.startswith("- skipped fp32 ") for line in lines) == 5


def test_openvino_rows_for_fp32_bundles_and_the_reason_int8_has_none(bundle_factory, monkeypatch):
    """With OpenVINO installed: an fp32 bundle is measured computed in fp32 and, on a CPU with
    bf16 instructions, in bf16; an int8 bundle's OpenVINO rows are skipped with the reason."""
    openvino = pytest.importorskip("openvino")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    bf16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    result = run("--bundle", bundle_factory("gpt2")[1].path, "--bundle", bundle_factory("gpt2", "int8")[1].path,
                 "--batches", 1, "--segments", 1, "--repeats", 1, "--graphs", "ingest", "--no-ceiling", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    variants = {row["variant"] for row in data["rows"]}
    assert "fp32 openvino/fp32 ingest" in variants and ("fp32 openvino/bf16 ingest" in variants) == bf16
    assert not any(v.startswith("int8 openvino") for v in variants)
    skipped = {s["variant"]: s["reason"] for s in data["skipped"]}
    assert skipped["int8 openvino/fp32"].startswith("the openvino backend runs fp32 bundles")
    assert data["machine"]["openvino"] == openvino.__version__.split("-")[0]


def test_bundles_of_different_models_are_refused(bundle_factory):
    one_line_error(run("--bundle", bundle_factory("gpt2")[1].path, "--bundle", bundle_factory("bert")[1].path),
                   "has another geometry")
    assert run("--bundle", bundle_factory("gpt2")[1].path, "--batches", "0,x").exit_code == 2


def test_an_armt_bundle_is_measured_against_its_pytorch_model(armt_bundle_factory, armt_checkpoint, cpu_only):
    """An ARMT bundle (named state pairs, no memory tensor) and its checkpoint: the runtime's rows
    and the ARMT's own PyTorch segment loop over the same segments, as for an RMT."""
    _, bundle = armt_bundle_factory("fp32")
    result = run("--bundle", bundle, "--ckpt", armt_checkpoint, "--peers", "eager", "--batches", 1, "--segments", 2,
                 "--repeats", 1, "--threads", 1, "--no-ceiling", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert sorted(row["variant"] for row in data["rows"]) == sorted(
        ["fp32 onnxruntime/cpu ingest", "fp32 onnxruntime/cpu step", "pytorch model(ids) loop (full logits)",
         "pytorch eager fp32"])
    for row in data["rows"]:
        assert row["tokens_per_second"] > 0 and row["vs_pytorch"] > 0
        assert (row["gflops"] is None) == row["variant"].startswith("pytorch")
    table = run("--bundle", bundle, "--ckpt", armt_checkpoint, "--peers", "eager", "--batches", 1, "--segments", 1,
                "--repeats", 1, "--threads", 1, "--no-ceiling", "--graphs", "ingest")
    assert table.exit_code == 0, table.output
    rows = [line for line in table.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [line.split("|")[2].strip() for line in rows] == [
        "fp32 onnxruntime/cpu ingest", "pytorch model(ids) loop (full logits)", "pytorch eager fp32"]


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


# --- PyTorch peers: eager, torch.compile, bf16 autocast -----------------------------------------
PEER_ROWS = ("pytorch eager fp32", "pytorch compile fp32", "pytorch eager bf16", "pytorch compile bf16")
NO_BF16 = {"model": "AMD EPYC 7R13 Processor", "arch": "x86_64", "isa": ["avx2"], "cores": 1}


@pytest.mark.parametrize("fails", ["when wrapping", "in its first run"])
def test_a_peer_that_cannot_run_says_why_in_its_row_and_the_rest_still_run(bundle_factory, tiny_checkpoint, cpu_only,
                                                                          monkeypatch, fails):
    """torch.compile refusing (no compiler, an unsupported op: at torch.compile or at the first
    call, where inductor compiles) and a CPU without bf16: each such peer has a row per batch
    saying why, with no figures; the bench finishes and the headline ratio uses what ran."""
    import torch

    import rmt_export.bench as bench

    def broken_compile(fn, **options):
        if fails == "when wrapping":
            raise RuntimeError("no C compiler here")

        def compiled(*args, **kwargs):
            raise RuntimeError("inductor could not build\nsecond line")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(bench, "cpu_info", lambda: dict(NO_BF16))
    ckpt, _ = tiny_checkpoint
    result = run("--bundle", bundle_factory("gpt2")[1].path, "--ckpt", ckpt, "--peers", "eager,compile,bf16,compile-bf16",
                 "--batches", "1,2", "--segments", 1, "--repeats", 1, "--threads", 1, "--graphs", "ingest",
                 "--no-ceiling", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["cpu"] == NO_BF16 and data["peers"] == ["eager", "compile", "bf16", "compile-bf16"]
    rows = {(row["batch"], row["variant"]): row for row in data["rows"]}
    why = "torch.compile failed: RuntimeError: " + ("no C compiler here" if fails == "when wrapping"
                                                    else "inductor could not build")
    for batch in (1, 2):
        assert rows[(batch, "pytorch eager fp32")]["tokens_per_second"] > 0
        assert rows[(batch, "pytorch eager fp32")]["not_run"] is None
        assert rows[(batch, "pytorch compile fp32")]["not_run"] == why
        for name in ("pytorch eager bf16", "pytorch compile bf16"):
            assert rows[(batch, name)]["not_run"].startswith("no native bf16 on this CPU")
        for name in PEER_ROWS[1:]:
            assert rows[(batch, name)]["tokens_per_second"] is None and rows[(batch, name)]["vs_best_pytorch"] is None
        assert rows[(batch, "fp32 onnxruntime/cpu ingest")]["vs_best_pytorch"] > 0
    assert [(b["batch"], b["variant"]) for b in data["best_pytorch"]] == [(1, "pytorch eager fp32"),
                                                                          (2, "pytorch eager fp32")]
    table = bench.markdown(data).splitlines()
    assert "- CPU: AMD EPYC 7R13 Processor (x86_64; AVX2); 1 usable cores" in table[0]
    assert any(line.startswith(f"| 1 | pytorch compile fp32 (not run: {why}) | - |") for line in table), table


def test_peers_none_and_an_unknown_peer(bundle_factory, tiny_checkpoint, cpu_only):
    ckpt, _ = tiny_checkpoint
    bundle = bundle_factory("gpt2")[1].path
    result = run("--bundle", bundle, "--ckpt", ckpt, "--peers", "none", "--batches", 1, "--segments", 1, "--repeats", 1,
                 "--threads", 1, "--graphs", "ingest", "--no-ceiling", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [row["variant"] for row in data["rows"]] == ["fp32 onnxruntime/cpu ingest"]
    assert data["peers"] == [] and data["best_pytorch"] == [] and data["rows"][0]["vs_best_pytorch"] is None
    refused = run("--bundle", bundle, "--ckpt", ckpt, "--peers", "eager,jit")
    assert refused.exit_code == 2 and "unknown peer(s) ['jit']" in refused.output


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile (inductor) on a CPU needs a C++ compiler")
def test_compiled_and_bf16_peers_run_beside_the_bundles(bundle_factory, tiny_checkpoint, cpu_only):
    """The real thing: torch.compile (inductor, frozen weights) and, where the CPU has bf16
    instructions, autocast bf16, eager and compiled; each peer has figures (or, for bf16 on a CPU
    without it, says why), the compiled ones their compile seconds, and the header names the CPU.
    Compiling the tiny model takes 10-40 s on 2 cores."""
    from rmt_export.bench import markdown
    from rmt_runtime.cpuinfo import cpu_info, describe, native_bf16

    ckpt, _ = tiny_checkpoint
    result = run("--bundle", bundle_factory("gpt2")[1].path, "--ckpt", ckpt, "--peers", "all", "--batches", 1,
                 "--segments", 2, "--repeats", 1, "--threads", 1, "--graphs", "ingest", "--no-ceiling", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {row["variant"]: row for row in data["rows"]}
    bf16 = native_bf16(cpu_info())
    for name in PEER_ROWS:
        if "bf16" in name and not bf16:
            assert rows[name]["not_run"].startswith("no native bf16 on this CPU")
            continue
        assert rows[name]["not_run"] is None, rows[name]
        assert rows[name]["tokens_per_second"] > 0 and rows[name]["vs_best_pytorch"] > 0
        assert (rows[name]["compile_seconds"] is not None) == ("compile" in name)
    assert rows["pytorch compile fp32"]["compile_seconds"] > 0
    assert data["best_pytorch"][0]["variant"] in PEER_ROWS and data["pytorch"]["inductor_freezing"] is True
    assert rows["fp32 onnxruntime/cpu ingest"]["vs_best_pytorch"] > 0
    table = markdown(data)
    assert f"- CPU: {describe(cpu_info())}" in table
    assert "- pytorch compile fp32 at batch 1: compiled in its first run" in table
