"""The --json contract of every command: stdout holds exactly one JSON document, in every path
(a result, an error, a usage error), and logs go to stderr.

The commands run as real processes, so that what native code writes to file descriptor 1
(TensorRT's own logger did, into the document) is seen as well as Python's output. The
interrupt path (exit 130) is tested with real signals in tests/reliability/test_faults.py.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent
SEGMENT, VOCAB = 16, 97
IDS = np.random.default_rng(11).integers(0, VOCAB, 3 * SEGMENT + 5)
NO_RTX = "tensorrt_rtx is not importable here (pip install tensorrt-rtx-cu12): no TensorRT-RTX build to check"
COMMANDS = {"rmt-run": "--bundle", "rmt-generate": "--bundle", "rmt-build": "--bundle", "rmt-bench": "--bundle",
            "rmt-check-trt": "--bundle", "rmt-export": "--ckpt"}  # each command's required option


def command(name, *args, status=0):
    """Run ``name`` and return (the one JSON document on its stdout, its stderr)."""
    result = subprocess.run([str(BIN / name), *map(str, args)], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=600)
    assert result.returncode == status, result.stderr
    try:
        document = json.loads(result.stdout)  # "Extra data" if anything follows the document
    except json.JSONDecodeError as exc:
        raise AssertionError(f"{name}: stdout is not exactly one JSON document ({exc}):\n{result.stdout}") from None
    assert isinstance(document, dict) and document["ok"] is (status == 0), document
    return document, result.stderr


def error_document(name, *args, status=1):
    """A failing command: its document names the error, and stderr holds it as the one 'Error:' line."""
    document, stderr = command(name, *args, status=status)
    assert set(document) == {"ok", "error"} and document["error"], document
    assert [line for line in stderr.splitlines() if line.startswith("Error:")] == [f"Error: {document['error']}"], \
        stderr
    return document["error"]


@pytest.fixture(scope="module")
def gpt2(bundle_factory):
    return bundle_factory("gpt2", "fp32")[1].path


@pytest.fixture
def ids_npy(tmp_path):
    np.save(tmp_path / "ids.npy", IDS)
    return tmp_path / "ids.npy"


@pytest.fixture(scope="module")
def rtx():
    return pytest.importorskip("tensorrt_rtx", reason=NO_RTX)


# ---- results ------------------------------------------------------------------------------
def test_rmt_run(gpt2, ids_npy, tmp_path):
    document, stderr = command("rmt-run", "--bundle", gpt2, "--ids", ids_npy, "--json")
    assert document["tokens"] == len(IDS) and document["segments"] == 4 and len(document["top_k"]) == 5
    assert "backend: onnxruntime" in stderr  # the log line goes to stderr, not into the document
    state = tmp_path / "state.npz"
    document, _ = command("rmt-run", "--bundle", gpt2, "--ids", ids_npy, "--state", state, "--json")
    finished, _ = command("rmt-run", "--bundle", gpt2, "--state", state, "--finish", "--json")
    assert finished["finish"] is True and finished["tokens"] == document["pending"] == 5
    assert [e["id"] for e in finished["top_k"]] == [e["id"] for e in document["top_k"]]


def test_rmt_generate(gpt2, ids_npy):
    document, stderr = command("rmt-generate", "--bundle", gpt2, "--prompt-ids", ids_npy, "--max-new-tokens", 5,
                               "--no-stop", "--json")
    assert document["new_tokens"] == 5 and len(document["tokens"]) == 5 and document["prompt_tokens"] == len(IDS)
    assert "backend: onnxruntime" in stderr


def test_rmt_bench(gpt2):
    document, _ = command("rmt-bench", "--bundle", gpt2, "--batches", 1, "--segments", 1, "--repeats", 1,
                          "--graphs", "ingest", "--no-ceiling", "--threads", 1, "--json")
    assert any(row["variant"] == "fp32 onnxruntime/cpu ingest" for row in document["rows"]), document["rows"]


def test_rmt_export(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    document, stderr = command("rmt-export", "--ckpt", ckpt, "--out", tmp_path / "bundle", "--segments", 2,
                               "--no-generation", "--json")
    assert document["bundle"] == str(tmp_path / "bundle") and document["validated"] is True
    assert document["engines"] is None and "[save]" in stderr


def test_rmt_check_trt(rtx, gpt2):
    document, _ = command("rmt-check-trt", "--bundle", gpt2, "--max-batch", 2, "--json")
    assert {g["graph"] for g in document["graphs"]} >= {"step", "ingest"}
    assert all(g["built"] and g["engine_bytes"] > 0 for g in document["graphs"]), document


def test_rmt_build_with_tensorrt_rtx(rtx, gpt2, tmp_path):
    """TensorRT's warnings (the parser's int64 notes) go to stderr through our logger ("[TRT] [W]",
    no timestamp): TensorRT's own logger printed them on stdout, before the document."""
    bundle = shutil.copytree(gpt2, tmp_path / "bundle")  # the engines go into the bundle
    document, stderr = command("rmt-build", "--bundle", bundle, "--builder", "tensorrt_rtx", "--max-batch", 2,
                               "--json")
    assert sorted(document["engines"]) == ["ingest", "step"]
    assert all(Path(path).stat().st_size > 0 for path in document["engines"].values())
    assert any(line.startswith("[TRT] [W] ") for line in stderr.splitlines()), stderr


def test_rmt_export_with_tensorrt_rtx_engines(rtx, tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    document, stderr = command("rmt-export", "--ckpt", ckpt, "--out", tmp_path / "bundle", "--segments", 2,
                               "--no-generation", "--engine", "--engine-builder", "tensorrt_rtx", "--max-batch", 2,
                               "--json")
    assert sorted(document["engines"]) == ["ingest", "step"]
    assert all(Path(path).is_file() for path in document["engines"].values())
    assert any(line.startswith("[TRT] [W] ") for line in stderr.splitlines()), stderr


def test_tensorrt_logs_through_our_logger_reach_stderr_only(rtx, tmp_path, capfd):
    """The logger itself, on a graph whose parse always warns (an int64 output)."""
    import onnx
    from onnx import TensorProto, helper

    from rmt_runtime.engines import stderr_logger

    nodes = [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.INT64), helper.make_node("Add", ["c", "k"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 4])],
                              initializer=[helper.make_tensor("k", TensorProto.INT64, [1, 4], [1, 2, 3, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "g.onnx"))
    logger = stderr_logger(rtx)
    assert stderr_logger(rtx) is logger  # one per module: TensorRT keeps the first logger it was given
    capfd.readouterr()
    network = rtx.Builder(logger).create_network(0)
    assert rtx.OnnxParser(network, logger).parse_from_file(str(tmp_path / "g.onnx"))
    printed = capfd.readouterr()
    assert printed.out == ""
    assert "[TRT] [W] " in printed.err and "Int64" in printed.err, printed.err


def test_while_the_work_runs_stdout_writes_go_to_stderr(capfd):
    """What a library prints meanwhile, from Python or from native code on file descriptor 1."""
    from rmt_runtime.cli_support import stdout_to_stderr

    capfd.readouterr()
    with stdout_to_stderr(True):
        print("from python")
        os.write(1, b"from native code\n")
    print("the document")
    printed = capfd.readouterr()
    assert printed.out == "the document\n"
    assert "from python" in printed.err and "from native code" in printed.err


# ---- errors: exit 1, the error as the document and as one stderr line -----------------------
def test_rmt_run_error(gpt2):
    assert "give --state FILE" in error_document("rmt-run", "--bundle", gpt2, "--finish", "--json")


def test_rmt_generate_error(gpt2, tmp_path):
    (tmp_path / "prompt.txt").write_text("1 2 x")
    assert "token 2 ('x') is not an integer id" in error_document(
        "rmt-generate", "--bundle", gpt2, "--prompt-ids", tmp_path / "prompt.txt", "--json")


@pytest.mark.parametrize("name", ["rmt-build", "rmt-bench", "rmt-check-trt"])
def test_bundle_commands_error(name, tmp_path):
    """A directory that is not a bundle: refused before any builder or backend is touched."""
    assert "manifest.json" in error_document(name, "--bundle", tmp_path, "--json")


def test_rmt_export_error(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    assert "model.pt" in error_document("rmt-export", "--ckpt", tmp_path / "model.pt", "--out", tmp_path / "out",
                                        "--json")
    assert not (tmp_path / "out").exists()


# ---- usage errors: exit 2 (click), a document too ------------------------------------------
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_usage_errors(name):
    assert f"Missing option '{COMMANDS[name]}'" in error_document(name, "--json", status=2)


def test_usage_error_found_in_the_command_body(gpt2):
    """rmt-bench checks --batches after click has parsed it: still a document."""
    assert "--batches" in error_document("rmt-bench", "--bundle", gpt2, "--batches", "0,x", "--json", status=2)
