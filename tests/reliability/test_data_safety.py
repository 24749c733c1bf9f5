"""No data loss and nothing read from outside: what an adversarial or careless user can do
with --force, manifests, state files and concurrent invocations (docs/RELIABILITY.md)."""
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from rmt_export.errors import ExportError
from rmt_export.exporter import ExportOptions, export_model
from rmt_export.validate import ValidationPlan
from rmt_runtime import BackendError, Bundle, BundleError, RMTRuntime, StateError

BIN = Path(sys.executable).parent
QUICK = dict(plan=ValidationPlan(segments=2), generation=False, validate=False)


@pytest.fixture
def model(tiny_checkpoint):
    return tiny_checkpoint[1]


def _export(model, out, **options):
    return export_model(model, out, ExportOptions(**{**QUICK, **options}))


@pytest.fixture
def a_bundle(bundle_factory, tmp_path):
    """A private copy of a real exported bundle (what --force may replace)."""
    return Path(shutil.copytree(bundle_factory("gpt2", "fp32")[1].path, tmp_path / "b"))


# ---- --force replaces only what rmt-export wrote --------------------------------------------------
def test_force_refuses_a_directory_with_a_lookalike_manifest(model, tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "manifest.json").write_text(json.dumps({"name": "x"}))
    (app / "notes.txt").write_text("keep")
    with pytest.raises(ExportError, match=r"is not an rmt-edge bundle \(its manifest.json is not an rmt-edge "
                                          r"manifest .*nothing was deleted"):
        _export(model, app, force=True)
    assert (app / "notes.txt").read_text() == "keep" and sorted(p.name for p in app.iterdir()) == [
        "manifest.json", "notes.txt"]


def test_force_refuses_a_bundle_holding_files_it_does_not_list(model, a_bundle):
    bundle = a_bundle
    (bundle / "notes.txt").write_text("mine")
    (bundle / "runs").mkdir()
    (bundle / "runs" / "log.txt").write_text("mine too")
    with pytest.raises(ExportError, match=r"holds files the manifest does not list: notes.txt, runs/, runs/log.txt"):
        _export(model, bundle, force=True)
    assert (bundle / "notes.txt").read_text() == "mine" and (bundle / "runs" / "log.txt").exists()


def test_force_never_deletes_the_checkpoint_it_exports(tiny_checkpoint, a_bundle):
    from rmt_export.exporter import export_bundle

    checkpoint, _ = tiny_checkpoint
    bundle = a_bundle
    inside = shutil.copy(checkpoint, bundle / "model.pt")
    with pytest.raises(ExportError, match=r"holds .*model.pt, an input of this export; refusing to replace it"):
        export_bundle(inside, bundle, ExportOptions(force=True, **QUICK))
    assert Path(inside).read_bytes() == Path(checkpoint).read_bytes()


def test_force_replaces_a_real_bundle_and_its_engines(model, a_bundle, tmp_path):
    bundle = a_bundle
    (bundle / "engines").mkdir()
    (bundle / "engines" / "step-0123.plan").write_bytes(b"engine")
    assert "prefill" in Bundle.load(bundle).manifest["graphs"]
    replaced = _export(model, bundle, force=True).path  # the new export has no generation graphs
    assert replaced == bundle and "prefill" not in Bundle.load(replaced).manifest["graphs"]
    assert not (replaced / "engines").exists()  # a new bundle: the old engines do not fit it
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging or .old-* left


def test_force_replaces_a_bundle_holding_the_onnxruntime_tensorrt_caches(model, a_bundle):
    """The ONNX Runtime TensorRT provider's engine folders under engines/onnxruntime-trt are
    the bundle's own, like rmt-build's engines: --force replaces them with the bundle."""
    bundle = a_bundle
    folder = bundle / "engines" / "onnxruntime-trt" / "step-0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / "TensorrtExecutionProvider_TRTKernel_graph_main_graph_1_0_0_sm87.engine").write_bytes(b"engine")
    (folder.parent / "TensorrtExecutionProvider_cache_sm87.timing").write_bytes(b"timing")
    replaced = _export(model, bundle, force=True).path
    assert replaced == bundle and not (replaced / "engines").exists()


def test_force_on_the_current_directory_leaves_nothing_behind(model, a_bundle, tmp_path):
    bundle = a_bundle
    cwd = os.getcwd()
    os.chdir(bundle)
    try:
        _export(model, ".", force=True)
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    Bundle.load(bundle)


def test_out_under_a_regular_file_or_a_symlink_is_refused(model, a_bundle, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match=r"file is a file, not a directory"):
        _export(model, tmp_path / "file" / "bundle")
    (tmp_path / "link").symlink_to(a_bundle)
    with pytest.raises(ExportError, match="is a symbolic link"):
        _export(model, tmp_path / "link", force=True)


# ---- nothing is read from outside a bundle ----------------------------------------------------------
@pytest.fixture
def bundle_copy(bundle_factory, tmp_path):
    _, exported = bundle_factory("gpt2", "fp32")
    copy = tmp_path / "bundle"
    shutil.copytree(exported.path, copy)
    return copy


def _edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, name", [
    (lambda m: m["files"].update({"../../../../etc/passwd": "0" * 64}), "../../../../etc/passwd"),
    (lambda m: m.update(memory_init="/etc/passwd"), "/etc/passwd"),
    (lambda m: m["graphs"]["step"].update(file="../step.onnx"), "../step.onnx"),
    (lambda m: m.update(tokenizer=["~/tokenizer.json"]), "~/tokenizer.json"),
])
def test_manifest_paths_that_leave_the_bundle_are_refused(bundle_copy, change, name):
    _edit_manifest(bundle_copy, change)
    with pytest.raises(BundleError, match=f"manifest path '{name}' leaves the bundle directory") as error:
        Bundle.load(bundle_copy)
    assert "sha256" not in str(error.value)


def test_a_symlink_out_of_the_bundle_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "elsewhere.npy"
    shutil.move(bundle_copy / "memory_init.npy", outside)
    (bundle_copy / "memory_init.npy").symlink_to(outside)
    with pytest.raises(BundleError, match=r"memory_init.npy resolves to .*elsewhere.npy, outside the bundle"):
        Bundle.load(bundle_copy)


def test_an_initial_state_whose_header_lies_is_refused_before_it_is_read(bundle_copy):
    with open(bundle_copy / "memory_init.npy", "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False,
                                                     "shape": (10 ** 12,)})
        handle.write(b"\0" * 64)
    _edit_manifest(bundle_copy, lambda m: None)
    bundle = Bundle.load(bundle_copy, verify_hashes=False)
    with pytest.raises(BundleError, match=r"memory_init.npy: initial 'memory' is float32\[1000000000000\], the "
                                          r"spec needs float32\[4, 32\]"):
        bundle.initial_state()


# ---- state files: checked before anything they claim is allocated ------------------------------------
@pytest.fixture
def saved(bundle_factory, tmp_path):
    _, exported = bundle_factory("gpt2", "fp32")
    rt = RMTRuntime.load(exported.path)
    state = rt.new_state()
    rt.feed(state, np.arange(40) % 97)
    rt.save_state(state, tmp_path / "s.npz")
    return rt, tmp_path / "s.npz"


def _npy(array: np.ndarray, shape=None) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": array.dtype.str, "fortran_order": False,
                                                  "shape": shape if shape is not None else array.shape})
    buffer.write(array.tobytes())
    return buffer.getvalue()


def _rewrite(path: Path, out: Path, members: dict[str, tuple[bytes, int]]) -> Path:
    """Copy the archive at ``path`` to ``out`` with ``members`` (name -> (bytes, zip compression)) added or replaced."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            if info.filename not in members:
                target.writestr(info, source.read(info.filename))
        for name, (data, compression) in members.items():
            target.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return out


@pytest.mark.parametrize("member, message", [
    ("extra.npy", r"unexpected members \['extra'\]"),
    ("state.memory.npy", "member state.memory.npy is compressed; rmt-edge writes state files uncompressed"),
])
def test_a_decompression_bomb_member_is_refused_unread(saved, tmp_path, member, message):
    rt, path = saved
    # 1.5 GB claimed, a few MB of zeros deflated to a few kB: refused on its name or its
    # compression, before anything is inflated or allocated.
    bomb = _npy(np.zeros(0, np.float32), shape=(375_000_000,)) + b"\0" * (4 << 20)
    crafted = _rewrite(path, tmp_path / "bomb.npz", {member: (bomb, zipfile.ZIP_DEFLATED)})
    assert crafted.stat().st_size < 1 << 20
    with pytest.raises(StateError, match=message):
        rt.restore_state(crafted)


@pytest.mark.parametrize("member, array, shape, message", [
    ("state.memory.npy", np.zeros(8, np.float32), (10 ** 12,), r"declares shape \[1000000000000\]"),
    ("tokens_seen.npy", np.zeros(2, np.int64), None, r"tokens_seen is int64\[2\], expected int64\[1\]"),
    ("pending_tokens.npy", np.array([-5], np.int64), None, "pending tokens do not add up|pending token id -5"),
    ("has_logits.npy", np.zeros(1, np.int8), None, r"has_logits is int8\[1\], expected bool\[1\]"),
    ("unknown.npy", np.zeros(1, np.int64), None, r"unexpected members \['unknown'\]"),
])
def test_state_members_are_checked_on_their_headers(saved, tmp_path, member, array, shape, message):
    rt, path = saved
    crafted = _rewrite(path, tmp_path / "crafted.npz", {member: (_npy(array, shape), zipfile.ZIP_STORED)})
    with pytest.raises(StateError, match=message):
        rt.restore_state(crafted)


@pytest.mark.parametrize("tokens, lengths, seen, message", [
    ([-5, 3], [2], [34], "pending token id -5 is outside the vocabulary 0..96"),
    ([99999, 3], [2], [34], "pending token id 99999 is outside the vocabulary 0..96"),
    ([1, 3], [2], [1], "counters do not add up"),
])
def test_out_of_range_pending_ids_and_counters_are_refused(saved, tmp_path, tokens, lengths, seen, message):
    rt, path = saved
    crafted = _rewrite(path, tmp_path / "crafted.npz", {
        "pending_tokens.npy": (_npy(np.array(tokens, np.int64)), zipfile.ZIP_STORED),
        "pending_lengths.npy": (_npy(np.array(lengths, np.int64)), zipfile.ZIP_STORED),
        "tokens_seen.npy": (_npy(np.array(seen, np.int64)), zipfile.ZIP_STORED)})
    with pytest.raises(StateError, match=message):
        rt.restore_state(crafted)


def test_non_finite_saved_logits_and_odd_files_are_refused(saved, tmp_path):
    rt, path = saved
    logits = np.full((1, 97), np.nan, np.float32)
    crafted = _rewrite(path, tmp_path / "nan.npz", {"last_logits.npy": (_npy(logits), zipfile.ZIP_STORED),
                                                    "has_logits.npy": (_npy(np.ones(1, bool)), zipfile.ZIP_STORED)})
    with pytest.raises(StateError, match="last_logits are missing or hold NaN"):
        rt.restore_state(crafted)
    with pytest.raises(StateError, match="/dev/null: not a regular file"):
        rt.restore_state("/dev/null")


# ---- one state file, two invocations -------------------------------------------------------------------
def test_two_rmt_runs_on_one_state_file_lose_no_input(bundle_factory, tmp_path):
    _, exported = bundle_factory("gpt2", "fp32")
    rng = np.random.default_rng(3)
    parts = [rng.integers(0, 97, 4000) for _ in range(2)]
    for i, part in enumerate(parts):
        np.save(tmp_path / f"part{i}.npy", part)
    state = tmp_path / "seq.npz"
    command = [str(BIN / "rmt-run"), "--bundle", str(exported.path), "--state", str(state), "--no-progress"]
    processes = [subprocess.Popen([*command, "--ids", str(tmp_path / f"part{i}.npy")], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], results
    rt = RMTRuntime.load(exported.path)
    restored = rt.restore_state(state)
    assert int(restored.tokens_seen[0]) == 8000  # both inputs are in the state, one after the other
    orders = []
    for first, second in ((0, 1), (1, 0)):
        whole = rt.new_state()
        rt.feed(whole, np.concatenate([parts[first], parts[second]]))
        orders.append(rt.memory(whole))
    assert any(np.array_equal(rt.memory(restored), memory) for memory in orders)


# ---- a manifest that disagrees with its graphs ------------------------------------------------------
def test_a_manifest_vocabulary_other_than_the_graphs_is_refused(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: m.update(vocab_size=200))
    with pytest.raises(BundleError, match=r"graph 'step' is not what a rmt decoder of vocab_size=200, M=4, D=32 has: "
                                          r"logits is float32\['batch', 'seq', 97\], expected "
                                          r"float32\['batch', 'seq', 200\]"):
        Bundle.load(bundle_copy)

    def consistently(m):  # the specs edited too: the graph file itself still says 97
        for graph in m["graphs"].values():
            for tensor in graph["spec"]["outputs"]:
                if tensor["name"] in ("logits", "last_logits"):
                    tensor["dims"][-1] = 200
    _edit_manifest(bundle_copy, consistently)
    with pytest.raises(BackendError, match=r"the graph does not match its manifest spec: last_logits: graph "
                                           r"\['batch', 97\], manifest \['batch', 200\]"):
        RMTRuntime.load(bundle_copy, backend="onnxruntime")


def test_a_segment_size_beyond_the_graphs_positions_is_one_clear_error(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: m.update(segment_size=4096))
    with pytest.raises(BundleError, match="segment_size 4096 with M=4 needs 4104 positions, the backbone has 64"):
        RMTRuntime.load(bundle_copy)
    # without max_positions to check against, the graph's own failure is one BackendError
    _edit_manifest(bundle_copy, lambda m: m.pop("max_positions"))
    rt = RMTRuntime.load(bundle_copy)
    with pytest.raises(BackendError, match="onnxruntime could not run the ingest graph"):
        rt.run(np.zeros(3000, np.int64))


def test_an_onnxruntime_failure_is_one_error_line_from_the_cli(bundle_copy, tmp_path):
    _edit_manifest(bundle_copy, lambda m: (m.update(segment_size=4096), m.pop("max_positions")))
    np.save(tmp_path / "long.npy", np.zeros(3000, np.int64))
    result = subprocess.run([str(BIN / "rmt-run"), "--bundle", str(bundle_copy), "--ids", str(tmp_path / "long.npy"),
                             "--no-progress"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if not line.startswith("backend:")]
    assert len(lines) == 1 and lines[0].startswith("Error: onnxruntime could not run the ingest graph"), result.stderr
    assert "[E:onnxruntime" not in result.stderr  # ONNX Runtime's own log line is not printed as well


def test_an_encoder_bundle_without_num_labels_restores_its_own_state(bundle_factory, tmp_path):
    """num_labels is optional in a manifest: the saved class logits' width comes from the graph."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_factory("bert", "fp32")[1].path, copy)
    _edit_manifest(copy, lambda m: m.pop("num_labels", None))
    rt = RMTRuntime.load(copy)
    state = rt.new_state()
    rt.feed(state, np.arange(4, 40))
    rt.save_state(state, tmp_path / "s.npz")
    restored = rt.restore_state(tmp_path / "s.npz")
    np.testing.assert_array_equal(restored.last_logits, state.last_logits)
    assert restored.last_logits.shape == (1, 3)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoints_and_state_files_get_the_mode_open_would_give_and_keep_a_replaced_files(model, a_bundle, tmp_path,
                                                                                            umask):
    """Written through a 0600 temporary file, they used to stay 0600 whatever the umask: a
    checkpoint trained by one user could not be read by the service account next to it."""
    from rmt_model import save_checkpoint

    rt = RMTRuntime.load(a_bundle, backend="onnxruntime")
    previous = os.umask(umask)
    try:
        checkpoint = save_checkpoint(model, tmp_path / f"model-{umask:o}.pt")
        state_file = rt.save_state(rt.new_state(), tmp_path / f"state-{umask:o}.rmtstate")
    finally:
        os.umask(previous)
    for path in (checkpoint, Path(state_file)):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
        path.chmod(0o640)  # a mode the user chose survives the next write
    save_checkpoint(model, checkpoint)
    rt.save_state(rt.new_state(), state_file)
    assert checkpoint.stat().st_mode & 0o777 == 0o640 and Path(state_file).stat().st_mode & 0o777 == 0o640
