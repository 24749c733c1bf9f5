"""Destructive file operations touch only what rmt-edge wrote (issue 29, class 1;
docs/RELIABILITY.md "Inventory: destructive file operations"). Each member gets a hostile
layout (foreign files inside the target, links pointing out, names with glob metacharacters,
'.', '..', 'a/b', an injected failure) and the tree around it is compared, with hashes,
before and after: a typed error before any work, and nothing changed that the tool did not write."""
import fnmatch
import hashlib
import importlib.util
import json
import os
import shutil
import string
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rmt_export.cli import triton_main
from rmt_export.errors import ExportError
from rmt_export.exporter import ExportOptions, export_model
from rmt_export.triton import MODEL_MARKER, TritonOptions, not_our_model, write_triton_repository
from rmt_export.validate import ValidationPlan
from rmt_runtime import RMTRuntime, StateError
from rmt_runtime import owned_files
from rmt_runtime.atomic import write_atomically
from rmt_runtime.cli import main as run_main
from rmt_runtime.owned_files import NotOwnedError, check_name, temporary_name
from rmt_runtime.state import locked_state_file

ROOT = Path(__file__).resolve().parents[2]
QUICK = dict(plan=ValidationPlan(segments=2), generation=False, validate=False)
HOSTILE = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): a link's target, a file's sha256."""
    seen = {}
    for folder, folders, files in os.walk(root, followlinks=False):
        for name in folders + files:
            path = Path(folder, name)
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                seen[relative] = ("link", os.readlink(path))
            elif path.is_dir():
                seen[relative] = ("dir",)
            elif not path.is_file():  # a FIFO: opening it would block
                seen[relative] = ("other", path.lstat().st_mode)
            else:
                seen[relative] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return seen


def npz_bytes(**arrays) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.fixture
def bundle(bundle_factory):
    return bundle_factory("gpt2", "fp32")[1].path


@pytest.fixture
def model(bundle_factory):
    return bundle_factory("gpt2", "fp32")[0]


# ---- names: one safe path component, or a typed error before anything is written -------------------
UNSAFE = [".", "..", "a/b", "../x", "/abs", "", "-rf", ".hidden", "a\x00b", "a b", "*", "a[b", "n?", "x" * 129,
          "a\\b", "~"]


@pytest.mark.parametrize("name", UNSAFE)
def test_unsafe_model_names_are_refused_naming_the_argument(bundle, tmp_path, name):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(ExportError, match=r"model name \(--name\) .*(is not a safe name|must be a string).*letters, "
                                          r"digits"):
        write_triton_repository(bundle, repo, TritonOptions(name=name), force=True)
    assert snapshot(tmp_path) == before


@HOSTILE
@given(name=st.text(alphabet=string.ascii_letters[:6] + "0_.-/\\*?[]\x00 ~", max_size=12))
@example(name="..")
@example(name="a/..")
def test_a_name_is_either_one_plain_component_or_refused(name):
    try:
        check_name(name, "the name", ValueError)
    except ValueError as exc:
        assert "the name" in str(exc) and repr(name) in str(exc)
        return
    assert Path(name).name == name and len(Path(name).parts) == 1 and name not in (".", "..")
    assert not name.startswith((".", "-")) and "\x00" not in name and not set(name) & set("/\\*?[] ~")


def test_a_name_that_is_not_a_string_is_named():
    with pytest.raises(ExportError, match=r"model name \(--name\) must be a string, got 3"):
        TritonOptions(name=3).check()


# ---- the example: rmt-triton --force over a folder it did not write ------------------------
def test_rmt_triton_force_never_deletes_a_folder_it_did_not_write(bundle, tmp_path):
    photos = tmp_path / "repo" / "photos"
    photos.mkdir(parents=True)
    (photos / "cat.jpg").write_text("x\n")
    before = snapshot(tmp_path)
    result = CliRunner().invoke(triton_main, ["--bundle", str(bundle), "--repo", str(tmp_path / "repo"), "--kind",
                                              "python", "--name", "photos", "--force"])
    assert result.exit_code == 1
    assert f"is not a model folder rmt-triton wrote (no {MODEL_MARKER})" in result.output
    assert "nothing was deleted" in result.output
    assert snapshot(tmp_path) == before


def _hostile_model_folder(model_dir: Path, outside: Path, change: str) -> None:
    if change == "foreign file":
        (model_dir / "notes.txt").write_text("mine")
    elif change == "foreign file in a version":
        (model_dir / "1" / "extra.onnx").write_bytes(b"mine")
    elif change == "foreign folder":
        (model_dir / "2").mkdir()
    elif change == "edited config":
        with open(model_dir / "config.pbtxt", "a") as handle:
            handle.write("# tuned by hand\n")
    elif change == "no marker":
        (model_dir / MODEL_MARKER).unlink()
    elif change == "garbage marker":
        (model_dir / MODEL_MARKER).write_text("{not json")
    elif change == "marker of another format":
        (model_dir / MODEL_MARKER).write_text(json.dumps({"format": "other", "files": {}}))
    elif change == "link inside":
        (model_dir / "1" / "data").symlink_to(outside)
    elif change == "link in the bytecode folder":
        (model_dir / "1" / "__pycache__").mkdir()
        (model_dir / "1" / "__pycache__" / "model.cpython-311.pyc").symlink_to(outside / "secret.txt")
    elif change == "foreign file in the bytecode folder":
        (model_dir / "1" / "__pycache__").mkdir()
        (model_dir / "1" / "__pycache__" / "notes.pyc").write_text("mine")
    elif change == "folder is a link":
        shutil.rmtree(model_dir)
        model_dir.symlink_to(outside, target_is_directory=True)
    else:
        raise AssertionError(change)


@pytest.mark.parametrize("change", [
    "foreign file", "foreign file in a version", "foreign folder", "edited config", "no marker", "garbage marker",
    "marker of another format", "link inside", "link in the bytecode folder", "foreign file in the bytecode folder",
    "folder is a link"])
def test_force_refuses_a_model_folder_that_is_not_all_its_own(bundle, tmp_path, change):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("keep")
    repo = tmp_path / "repo"
    model_dir = write_triton_repository(bundle, repo, TritonOptions(name="rmt"))
    _hostile_model_folder(model_dir, outside, change)
    before = snapshot(tmp_path)
    with pytest.raises(ExportError, match=r"--force replaces only a model folder that rmt-triton wrote, so "
                                          r"nothing was deleted"):
        write_triton_repository(bundle, repo, TritonOptions(name="rmt", graph="step"), force=True)
    assert snapshot(tmp_path) == before


def test_force_replaces_a_model_folder_it_wrote_with_the_servers_bytecode(bundle, tmp_path):
    repo = tmp_path / "repo"
    model_dir = write_triton_repository(bundle, repo, TritonOptions(name="rmt", repository_kind="python"))
    assert not_our_model(model_dir) is None
    listed = json.loads((model_dir / MODEL_MARKER).read_text())["files"]
    assert "config.pbtxt" in listed and "1/model.py" in listed and "1/bundle/manifest.json" in listed
    (model_dir / "1" / "__pycache__").mkdir()  # what the Python backend's import of model.py leaves
    (model_dir / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"bytecode")
    replaced = write_triton_repository(bundle, repo, TritonOptions(name="rmt"), force=True)
    assert (replaced / "1" / "model.onnx").is_file() and not (replaced / "1" / "model.py").exists()
    assert sorted(p.name for p in repo.iterdir()) == ["rmt"]  # no staging or retired folder left


@HOSTILE
@given(extra=st.lists(st.sampled_from(["a", "1", "b.txt", "initial_state", ".x", "__pycache__", "model.onnx"]),
                      min_size=1, max_size=3))
def test_any_file_added_to_a_model_folder_keeps_force_from_replacing_it(bundle, tmp_path_factory, extra):
    repo = tmp_path_factory.mktemp("repo")
    model_dir = write_triton_repository(bundle, repo, TritonOptions(name="rmt"))
    added = model_dir
    for part in extra:  # down the folders; beside a file rmt-triton wrote
        if (added / part).is_file():
            break
        added = added / part
    if added.exists():  # a folder rmt-triton wrote: add a file inside it
        added = added / "added-by-hand"
    added.parent.mkdir(parents=True, exist_ok=True)
    added.write_text("mine")
    before = snapshot(repo)
    with pytest.raises(ExportError, match="rmt-triton did not write"):
        write_triton_repository(bundle, repo, TritonOptions(name="rmt"), force=True)
    assert snapshot(repo) == before


def _fail_moving(monkeypatch, marker: str):
    """os.replace fails when it would move a folder named with ``marker`` into place (the injected
    failure of the replacement's second step)."""
    real = os.replace

    def replace(source, destination, *args, **kwargs):
        if marker in Path(source).name:
            raise OSError(28, "No space left on device (injected)")
        return real(source, destination, *args, **kwargs)
    monkeypatch.setattr(owned_files.os, "replace", replace)


def test_a_failed_model_folder_replacement_restores_the_old_one_and_leaves_nothing(bundle, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    write_triton_repository(bundle, repo, TritonOptions(name="rmt"))
    before = snapshot(tmp_path)
    _fail_moving(monkeypatch, ".partial-")
    with pytest.raises(OSError, match="injected"):
        write_triton_repository(bundle, repo, TritonOptions(name="rmt", graph="step"), force=True)
    assert snapshot(tmp_path) == before


# ---- rmt-export --force: links inside, an injected failure -------------------------------------------
def test_force_refuses_a_bundle_holding_a_link_out(model, bundle, tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "data.bin").write_text("keep")
    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    (copy / "engines").mkdir()
    (copy / "engines" / "cache").symlink_to(tmp_path / "outside", target_is_directory=True)
    before = snapshot(tmp_path)
    with pytest.raises(ExportError, match=r"holds symbolic links \(engines/cache\).*nothing was deleted"):
        export_model(model, copy, ExportOptions(force=True, **QUICK))
    assert snapshot(tmp_path) == before


def test_a_failed_bundle_replacement_restores_the_old_one_and_leaves_nothing(model, bundle, tmp_path, monkeypatch):
    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    before = snapshot(tmp_path)
    _fail_moving(monkeypatch, ".partial-")
    with pytest.raises(OSError, match="injected"):
        export_model(model, copy, ExportOptions(force=True, **QUICK))
    assert snapshot(tmp_path) == before


def test_a_bundle_that_changed_while_exporting_is_not_replaced(model, bundle, tmp_path, monkeypatch):
    """check_destination runs before the export; the folder is checked again at the move."""
    from rmt_export import exporter

    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    real = exporter.write_manifest

    def write_then_meddle(directory, manifest):
        (copy / "notes.txt").write_text("written meanwhile")
        return real(directory, manifest)
    monkeypatch.setattr(exporter, "write_manifest", write_then_meddle)
    with pytest.raises(ExportError, match="holds files the manifest does not list: notes.txt"):
        export_model(model, copy, ExportOptions(force=True, **QUICK))
    assert (copy / "notes.txt").read_text() == "written meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# ---- stale temporaries of a state file: the exact escaped name, regular files only -------------------
SIBLINGS = ["abc", "a", "x", "ab", "state", "b.npz", "s1"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(alphabet="ab*?[]!.-_s1", min_size=1, max_size=6).filter(lambda n: n not in (".", "..")))
@example(name="a*")
@example(name="[ab]")
@example(name="?")
@example(name="*")
def test_only_the_state_files_own_stale_temporaries_are_removed(tmp_path_factory, name):
    folder = tmp_path_factory.mktemp("states")
    (folder / "outside.txt").write_text("keep")
    path = folder / name
    stale = folder / temporary_name(name)  # what a killed save of this file left
    stale.write_bytes(b"partial")
    foreign = [f".{other}.0123abcd.tmp" for other in SIBLINGS if other != name]  # other files' temporaries
    foreign += [f".{name}.notes.tmp", f".{name}.0123abcd.tmp.keep", f"{name}.0123abcd.tmp"]
    for entry in foreign:
        (folder / entry).write_text("mine")
    (folder / f".{name}.deadbeef.tmp").mkdir()  # a folder and a link with a temporary's name: not files
    (folder / f".{name}.feedface.tmp").symlink_to(folder / "outside.txt")
    glob_would_take = [e for e in foreign if fnmatch.fnmatchcase(e, f".{name}.*.tmp")]
    before = snapshot(folder)
    with locked_state_file(path):
        pass
    after = snapshot(folder)
    assert not stale.exists()
    del before[stale.name]
    after.pop(f".{name}.lock", None)  # the lock file is the tool's own
    assert after == before, glob_would_take


# ---- files replaced by atomic writes: a regular file of the kind written, never a link ---------------
@pytest.mark.parametrize("existing, allowed", [
    ("missing", True), ("empty", True), ("npz", True), ("text", False), ("zip of something else", False),
    ("torch checkpoint", False), ("link to an npz", False), ("dangling link", False), ("folder", False),
    ("fifo", False)])
def test_write_atomically_replaces_only_a_regular_file_of_its_kind(tmp_path, existing, allowed):
    import zipfile

    target = tmp_path / "out.npz"
    (tmp_path / "elsewhere.npz").write_bytes(npz_bytes(kept=np.ones(2)))
    if existing == "empty":
        target.write_bytes(b"")
    elif existing == "npz":
        target.write_bytes(npz_bytes(old=np.zeros(3)))
    elif existing == "text":
        target.write_text("my notes\n")
    elif existing == "zip of something else":
        with zipfile.ZipFile(target, "w") as archive:
            archive.writestr("photo.jpg", b"jpeg")
    elif existing == "torch checkpoint":
        with zipfile.ZipFile(target, "w") as archive:
            archive.writestr("model/data.pkl", b"pickle")
    elif existing == "link to an npz":
        target.symlink_to(tmp_path / "elsewhere.npz")
    elif existing == "dangling link":
        target.symlink_to(tmp_path / "nowhere.npz")
    elif existing == "folder":
        target.mkdir()
        (target / "inside.txt").write_text("mine")
    elif existing == "fifo":
        os.mkfifo(target)
    before = snapshot(tmp_path)
    if allowed:
        write_atomically(target, lambda handle: np.savez(handle, new=np.arange(4)))
        assert list(np.load(target)) == ["new"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.npz", "out.npz"]
    else:
        with pytest.raises(NotOwnedError, match=r"out.npz (is|exists)"):
            write_atomically(target, lambda handle: np.savez(handle, new=np.arange(4)))
        assert snapshot(tmp_path) == before


@HOSTILE
@given(content=st.binary(max_size=64) | st.sampled_from([npz_bytes(a=np.zeros(1)), b"PK\x03\x04garbage", b"{}"]))
def test_an_existing_file_survives_unless_it_is_empty_or_of_the_kind_written(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("out")
    target = folder / "out.npz"
    target.write_bytes(content)
    held = owned_files.file_format(target)
    try:
        write_atomically(target, lambda handle: np.savez(handle, new=np.arange(4)))
    except NotOwnedError:
        assert held not in ("empty", "npz") and target.read_bytes() == content
    else:
        assert held in ("empty", "npz")  # only an empty file or an npz was replaced
        assert list(np.load(target)) == ["new"]
    assert sorted(p.name for p in folder.iterdir()) == ["out.npz"]  # no temporary left either way


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.npz"
    target.write_bytes(npz_bytes(old=np.zeros(3)))
    before = snapshot(tmp_path)

    def fail(handle):
        handle.write(b"half")
        raise OSError(28, "No space left on device (injected)")
    with pytest.raises(OSError, match="injected"):
        write_atomically(target, fail)
    assert snapshot(tmp_path) == before


def test_rmt_run_save_outputs_never_replaces_a_file_of_another_kind_or_a_link(bundle, tmp_path):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.arange(20, dtype=np.int64))
    (tmp_path / "existing.txt").write_text("my notes\n")
    (tmp_path / "elsewhere.npz").write_bytes(npz_bytes(kept=np.ones(2)))
    (tmp_path / "link.npz").symlink_to(tmp_path / "elsewhere.npz")
    before = snapshot(tmp_path)
    for target, reason in (("existing.txt", "exists and holds data"), ("link.npz", "is a symbolic link")):
        result = CliRunner().invoke(run_main, ["--bundle", str(bundle), "--ids", str(ids), "--save-outputs",
                                               str(tmp_path / target)])
        assert result.exit_code == 1 and f"--save-outputs {tmp_path / target}: {reason}" in result.output
    assert snapshot(tmp_path) == before


def test_a_state_file_that_is_a_link_is_refused_and_its_target_kept(bundle, tmp_path):
    rt = RMTRuntime.load(bundle, backend="onnxruntime")
    real = Path(rt.save_state(rt.new_state(), tmp_path / "real.rmtstate"))
    (tmp_path / "link.rmtstate").symlink_to(real)
    (tmp_path / "notes.rmtstate").write_text("not a state")
    before = snapshot(tmp_path)
    for name, reason in (("link.rmtstate", "is a symbolic link"), ("notes.rmtstate", "exists and holds data")):
        with pytest.raises(StateError, match=reason):
            rt.save_state(rt.new_state(), tmp_path / name)
    assert snapshot(tmp_path) == before


# ---- checkpoints ------------------------------------------------------------------------------------
@pytest.mark.parametrize("existing", ["text", "link to a checkpoint", "folder", "npz"])
def test_save_checkpoint_never_replaces_a_link_or_another_kind_of_file(model, tmp_path, existing):
    from rmt_model import CheckpointError, save_checkpoint

    real = save_checkpoint(model, tmp_path / "real.pt")
    target = tmp_path / "model.pt"
    if existing == "text":
        target.write_text("my notes\n")
    elif existing == "link to a checkpoint":
        target.symlink_to(real)
    elif existing == "folder":
        target.mkdir()
        (target / "inside.txt").write_text("mine")
    elif existing == "npz":
        target.write_bytes(npz_bytes(a=np.zeros(1)))
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"model.pt (is a symbolic link|is a directory|exists and is not a "
                                              r"torch checkpoint)"):
        save_checkpoint(model, target)
    assert snapshot(tmp_path) == before
    save_checkpoint(model, real)  # a checkpoint over a checkpoint: replaced, no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "real.pt"]


# ---- int8 quantization's temporary -------------------------------------------------------------------
def test_int8_quantization_never_touches_a_file_beside_the_graph(bundle, tmp_path):
    from rmt_export.graphs import quantize_graph

    graph = Path(shutil.copy(bundle / "step.onnx", tmp_path / "step.onnx"))
    for name in (".step.onnx.int8", ".step.onnx.0123abcd.tmp"):
        (tmp_path / name).write_text("mine")
    before = {k: v for k, v in snapshot(tmp_path).items() if k != "step.onnx"}
    quantize_graph(graph)
    assert {k: v for k, v in snapshot(tmp_path).items() if k != "step.onnx"} == before


# ---- folders the tools make for themselves -----------------------------------------------------------
def test_remove_tree_never_follows_a_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    work = tmp_path / "work"
    (work / "backends" / "python").mkdir(parents=True)
    (work / "backends" / "python" / "libtriton_python.so").symlink_to(outside / "keep.txt")
    (work / "backends" / "all").symlink_to(outside, target_is_directory=True)
    (tmp_path / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(NotOwnedError, match="is a symbolic link; not removed"):
        owned_files.remove_tree(tmp_path / "link")
    owned_files.remove_tree(work)
    assert not work.exists() and (outside / "keep.txt").read_text() == "keep" and (tmp_path / "link").is_symlink()


def _script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


@pytest.mark.parametrize("entry", [
    {"bundle": "../outside", "reference": "../outside.npz"},
    {"bundle": "tiny-fp16", "reference": "../outside/keep.npz"},
    {"bundle": "foreign", "reference": "foreign.npz"},
    {"bundle": "tiny-fp16", "reference": "tiny-fp16.npz"},
    {"bundle": ".", "reference": "..npz"},
    ["not", "an", "entry"],
])
def test_make_gpu_bundles_removes_only_an_earlier_entry_of_its_own(tmp_path, entry, capsys):
    make_gpu_bundles = _script("make_gpu_bundles", ROOT / "scripts" / "make_gpu_bundles.py")
    out = tmp_path / "out"
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.npz").write_bytes(npz_bytes(a=np.zeros(1)))
    (tmp_path / "outside.npz").write_bytes(npz_bytes(a=np.zeros(1)))
    (out / "foreign").mkdir(parents=True)
    (out / "foreign" / "notes.txt").write_text("mine")
    (out / "foreign.npz").write_text("not an npz")
    (out / "tiny-fp16").mkdir()  # an earlier bundle someone added a file to
    (out / "tiny-fp16" / "manifest.json").write_text("{}")
    (out / "tiny-fp16.npz").write_bytes(npz_bytes(a=np.zeros(1)))
    before = snapshot(tmp_path)
    make_gpu_bundles.remove_earlier(out, entry)
    assert snapshot(tmp_path) == before
    assert "left an earlier entry in place" in capsys.readouterr().err


def test_make_gpu_bundles_removes_an_earlier_bundle_it_wrote(bundle, tmp_path):
    make_gpu_bundles = _script("make_gpu_bundles", ROOT / "scripts" / "make_gpu_bundles.py")
    shutil.copytree(bundle, tmp_path / "tiny-fp16")
    (tmp_path / "tiny-fp16.npz").write_bytes(npz_bytes(a=np.zeros(1)))
    (tmp_path / "keep.txt").write_text("mine")
    make_gpu_bundles.remove_earlier(tmp_path, {"bundle": "tiny-fp16", "reference": "tiny-fp16.npz"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_a_benchmark_reexport_never_deletes_a_folder_that_is_not_a_bundle(model, tmp_path):
    runtime_bench = _script("runtime_bench", ROOT / "benchmarks" / "runtime_bench.py")
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(ExportError, match="is not an rmt-edge bundle"):
        runtime_bench.bundle_for(model, out, reexport=True)
    assert snapshot(tmp_path) == before
