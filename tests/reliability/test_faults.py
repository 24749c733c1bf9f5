"""Faults: bad files, a full disk, signals mid-export and mid-run; nothing is lost or left half-written."""
import json
import resource
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from rmt_model import CheckpointError, load_checkpoint
from rmt_runtime import BackendError, Bundle, BundleError, RMTRuntime

BIN = Path(sys.executable).parent


def _copy(bundle_path, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundle_path, target)
    return target


def _edit_manifest(bundle_dir, change):
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("segment_size"), "no 'segment_size' field"),
    (lambda m: m.update(colour="red"), r"unknown field\(s\) \['colour'\]"),
    (lambda m: m.update(schema_version=2), "schema_version 2 is newer than this rmt-edge reads"),
    (lambda m: m.update(precision="int4"), "unknown precision 'int4'"),
    (lambda m: m.update(num_mem_tokens="4"), "'num_mem_tokens' has the wrong type \\(str"),
])
def test_bad_manifests_are_named(bundle_factory, tmp_path, change, message):
    bundle_dir = _copy(bundle_factory("gpt2", "fp32")[1].path, tmp_path)
    _edit_manifest(bundle_dir, change)
    with pytest.raises(BundleError, match=message):
        Bundle.load(bundle_dir)


def test_truncated_onnx_is_caught_by_hash_and_by_onnxruntime(bundle_factory, tmp_path):
    bundle_dir = _copy(bundle_factory("gpt2", "fp32")[1].path, tmp_path)
    graph = bundle_dir / "ingest.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(BundleError, match="ingest.onnx differs from the manifest's sha256"):
        RMTRuntime.load(bundle_dir)
    with pytest.raises(BackendError, match="onnxruntime cannot load the ingest graph"):
        RMTRuntime.load(Bundle.load(bundle_dir, verify_hashes=False))


def test_decompression_bomb_is_refused_unread(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * (64 << 20))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match="decompression bomb"):
        load_checkpoint(path)


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_during_export_leaves_nothing(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "bundle"
    result = subprocess.run([str(BIN / "rmt-export"), "--ckpt", str(ckpt), "--out", str(out), "--segments", "2"],
                            capture_output=True, text=True, preexec_fn=_limit_file_size(200_000))
    assert result.returncode == 1, result.stderr
    assert "Error:" in result.stderr and "Traceback" not in result.stderr
    assert "too large" in result.stderr.lower()
    assert list(tmp_path.iterdir()) == []  # no bundle, no partial directory


def _wait_for(process, text):
    for line in process.stderr:
        if text in line:
            return line
    raise AssertionError(f"process ended without printing {text!r}")


def test_one_handler_takes_sigint_and_sigterm_alike():
    """rmt-export (terminate_as_interrupt) and rmt-run (stop_requests) each install one handler
    for both signals: the subprocess tests below send SIGTERM only (the signal Python would not
    turn into KeyboardInterrupt by itself), and this is what makes SIGINT the same case."""
    from rmt_runtime.cli_support import stop_requests, terminate_as_interrupt

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        terminate_as_interrupt()
        assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is not before[signal.SIGINT]
        with stop_requests():
            assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_sigterm_during_export_cleans_up(tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "bundle"
    process = subprocess.Popen([str(BIN / "rmt-export"), "--ckpt", str(ckpt), "--out", str(out)],
                               stderr=subprocess.PIPE, text=True)
    _wait_for(process, "[load]")  # tracing starts now and takes seconds
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    assert process.returncode == 130
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_a_long_run_saves_the_state_and_resumes_exactly(bundle_factory, tmp_path):
    """Stopped part-way, then continued as the message says (--state and the rest of the input):
    the result equals one uninterrupted run of the whole input, bit for bit."""
    model, exported = bundle_factory("gpt2", "fp32")
    rng = np.random.default_rng(0)
    ids, rest = rng.integers(0, model.config.vocab_size, 300_000), rng.integers(0, model.config.vocab_size, 37)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "rest.npy", rest)
    state = tmp_path / "state.npz"
    command = [str(BIN / "rmt-run"), "--bundle", str(exported.path), "--state", str(state), "--no-progress"]
    process = subprocess.Popen([*command, "--ids", str(tmp_path / "ids.npy")], stderr=subprocess.PIPE, text=True)
    _wait_for(process, "backend:")  # the handler is in place; 18,750 segments to go
    process.send_signal(signal.SIGTERM)
    message = process.stderr.read()
    process.wait(timeout=120)
    assert process.returncode == 130, message
    assert "interrupted after segment" in message and "run again with --state" in message
    runtime = RMTRuntime.load(exported.path)
    stopped = runtime.restore_state(state)
    assert int(stopped.tokens_seen[0]) == len(ids)
    assert int(stopped.segments_done[0]) < len(ids) // 16  # it really stopped part-way: tokens left pending
    resumed = subprocess.run([*command, "--ids", str(tmp_path / "rest.npy"), "--save-outputs",
                              str(tmp_path / "out.npz")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    whole = np.concatenate([ids, rest])
    expected = runtime.run(whole)
    with np.load(tmp_path / "out.npz") as outputs:
        np.testing.assert_array_equal(outputs["memory"], expected.memory)
        np.testing.assert_array_equal(outputs["last_logits"], expected.last_logits)
    final = runtime.restore_state(state)
    assert int(final.tokens_seen[0]) == len(whole) and int(final.segments_done[0]) == len(whole) // 16


def test_sigterm_after_the_whole_input_was_read_then_finish_gives_the_uninterrupted_result(bundle_factory, tmp_path):
    """An interrupted run has read all its input (the tokens not yet run wait in the state), so
    there is no "rest of the input" to give: --finish runs what is pending and prints what the
    uninterrupted run prints. With --json, the interrupt is a document too."""
    model, exported = bundle_factory("gpt2", "fp32")
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 300_000 + 5)  # ends inside a segment
    np.save(tmp_path / "ids.npy", ids)
    state = tmp_path / "state.npz"
    command = [str(BIN / "rmt-run"), "--bundle", str(exported.path), "--state", str(state), "--json"]
    process = subprocess.Popen([*command, "--ids", str(tmp_path / "ids.npy")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _wait_for(process, "backend:")  # the handler is in place; 18,750 segments to go
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    stopped = json.loads(out)
    assert stopped["ok"] is False and stopped["interrupted"] is True and stopped["state"] == str(state)
    assert f"--state {state} --finish" in stopped["error"] and stopped["error"] in err
    assert stopped["pending"] > 16  # it really stopped part-way: full segments left to run
    finished = subprocess.run([*command, "--finish", "--save-outputs", str(tmp_path / "out.npz")],
                              capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    result = json.loads(finished.stdout)
    assert result["finish"] is True and result["tokens"] == stopped["pending"]
    assert result["tokens_seen"] == len(ids) and result["pending"] == 5  # the partial segment waits, as in any run
    runtime = RMTRuntime.load(exported.path)
    expected = runtime.run(ids)
    with np.load(tmp_path / "out.npz") as outputs:
        np.testing.assert_array_equal(outputs["memory"], expected.memory)
        np.testing.assert_array_equal(outputs["last_logits"], expected.last_logits)
    assert [e["id"] for e in result["top_k"]] == np.argsort(-expected.last_logits[0], kind="stable")[:5].tolist()
    final = runtime.restore_state(state)
    assert int(final.segments_done[0]) == len(ids) // 16 and [len(p) for p in final.pending] == [5]


def test_sigterm_during_generation_saves_the_conversation_and_it_continues(bundle_factory, tmp_path):
    """rmt-generate --state stops after the current token and saves: the state equals that of an
    uninterrupted generation of as many tokens, and the conversation continues from it."""
    model, exported = bundle_factory("gpt2", "fp32", initializer_range=0.2)
    rng = np.random.default_rng(2)
    np.save(tmp_path / "prompt.npy", rng.integers(0, model.config.vocab_size, 40))
    np.save(tmp_path / "next.npy", rng.integers(0, model.config.vocab_size, 7))
    generate = [str(BIN / "rmt-generate"), "--bundle", str(exported.path), "--no-stop", "--json"]
    chat, whole = tmp_path / "chat.npz", tmp_path / "whole.npz"
    process = subprocess.Popen([*generate, "--state", str(chat), "--prompt-ids", str(tmp_path / "prompt.npy"),
                                "--max-new-tokens", "1000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    _wait_for(process, "backend:")  # the handler is in place
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    stopped = json.loads(out)
    assert stopped["interrupted"] is True and stopped["state"] == str(chat)
    new = stopped["new_tokens"]
    assert 1 <= new < 1_000_000 and len(stopped["tokens"]) == new and f"interrupted after {new} tokens" in err
    uninterrupted = subprocess.run([*generate, "--state", str(whole), "--prompt-ids", str(tmp_path / "prompt.npy"),
                                    "--max-new-tokens", str(new)], capture_output=True, text=True)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert json.loads(uninterrupted.stdout)["tokens"] == stopped["tokens"]
    runtime = RMTRuntime.load(exported.path)
    saved, expected = runtime.restore_state(chat), runtime.restore_state(whole)
    np.testing.assert_array_equal(runtime.memory(saved), runtime.memory(expected))
    assert [p.tolist() for p in saved.pending] == [p.tolist() for p in expected.pending]
    assert saved.tokens_seen.tolist() == expected.tokens_seen.tolist() == [40 + new]
    assert saved.segments_done.tolist() == expected.segments_done.tolist()
    continued = [subprocess.run([*generate, "--state", str(path), "--prompt-ids", str(tmp_path / "next.npy"),
                                 "--max-new-tokens", "20"], capture_output=True, text=True) for path in (chat, whole)]
    assert [c.returncode for c in continued] == [0, 0], [c.stderr for c in continued]
    first, second = (json.loads(c.stdout) for c in continued)
    assert first["resumed"] is True and first["tokens"] == second["tokens"] and len(first["tokens"]) == 20
