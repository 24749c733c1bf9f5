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
    (lambda m: m.update(num_mem_tokens="4"), "'num_mem_tokens' has the wrong type"),
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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_export_cleans_up(tiny_checkpoint, tmp_path, sig):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "bundle"
    process = subprocess.Popen([str(BIN / "rmt-export"), "--ckpt", str(ckpt), "--out", str(out)],
                               stderr=subprocess.PIPE, text=True)
    _wait_for(process, "[load]")  # tracing starts now and takes seconds
    process.send_signal(sig)
    process.wait(timeout=120)
    assert process.returncode == 130
    assert list(tmp_path.iterdir()) == []


# SIGTERM only: rmt-run's one handler (cli_support.stop_requests) takes SIGINT and SIGTERM alike;
# the export's SIGINT path, which differs, keeps both signals above.
@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_signal_during_a_long_run_saves_the_state_and_resumes_exactly(bundle_factory, tmp_path, sig):
    model, exported = bundle_factory("gpt2", "fp32")
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 300_000)
    np.save(tmp_path / "ids.npy", ids)
    state = tmp_path / "state.npz"
    command = [str(BIN / "rmt-run"), "--bundle", str(exported.path), "--state", str(state), "--no-progress"]
    process = subprocess.Popen([*command, "--ids", str(tmp_path / "ids.npy")], stderr=subprocess.PIPE, text=True)
    _wait_for(process, "backend:")  # the handler is in place; 18,750 segments to go
    process.send_signal(sig)
    rest = process.stderr.read()
    process.wait(timeout=120)
    assert process.returncode == 130, rest
    assert "interrupted after segment" in rest and "state saved" in rest
    np.save(tmp_path / "none.npy", np.zeros(0, np.int64))
    resumed = subprocess.run([*command, "--ids", str(tmp_path / "none.npy"), "--save-outputs",
                              str(tmp_path / "out.npz")], capture_output=True, text=True)
    # An empty input is refused, so resume by feeding nothing through the library instead.
    runtime = RMTRuntime.load(exported.path)
    restored = runtime.restore_state(state)
    assert int(restored.tokens_seen[0]) == len(ids)
    assert int(restored.segments_done[0]) < len(ids) // 16  # it really stopped part-way
    runtime.feed(restored, [])
    np.testing.assert_array_equal(runtime.peek(restored).memory, runtime.run(ids).memory)
    assert resumed.returncode == 1 and "no tokens to run" in resumed.stderr
