"""Engine building and caching, with TensorRT-RTX's real builder (no GPU needed)."""
import importlib
import json
import shutil

import pytest
from click.testing import CliRunner

from rmt_runtime.build_cli import main as build_main
from rmt_runtime.engines import BuildOptions, EngineError, build_engine, find_engines, import_builder
from rmt_runtime import Bundle

pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed (pip install tensorrt-rtx-cu12)")
RTX = BuildOptions(builder="tensorrt_rtx", max_batch=4)


@pytest.fixture
def bundle(bundle_factory, tmp_path):
    """A private copy of an exported bundle (engines are written into it)."""
    target = tmp_path / "bundle"
    shutil.copytree(bundle_factory("gpt2", "fp32")[1].path, target)
    return Bundle.load(target)


def test_engines_are_built_once_and_reused(bundle):
    messages = []
    path = build_engine(bundle, "step", RTX, messages.append)
    assert path.is_file() and path.stat().st_size > 0
    assert "this can take minutes" in messages[0] and messages[-1].startswith("built ")
    fields = json.loads(path.with_suffix(".json").read_text())
    assert fields["graph_sha256"] == bundle.manifest["files"]["step.onnx"]
    assert fields["profile"]["input_ids"] == [[1, 1], [1, 16], [4, 16]]
    assert not (bundle.path / "engines" / "timing.cache").exists()  # RTX: timing caches are no-ops
    mtime = path.stat().st_mtime_ns
    again = []
    assert build_engine(bundle, "step", RTX, again.append) == path and again == []  # reused, not rebuilt
    assert path.stat().st_mtime_ns == mtime
    build_engine(bundle, "ingest", RTX)
    assert find_engines(bundle, "tensorrt_rtx").paths["step"] == path


def test_a_stale_engine_is_refused_naming_what_differs(bundle):
    build_engine(bundle, "step", RTX)
    with pytest.raises(EngineError, match=r"was built for max_batch=4, not 8.*build them first with rmt-build"):
        find_engines(bundle, "tensorrt_rtx", BuildOptions(builder="tensorrt_rtx", max_batch=8))
    with pytest.raises(EngineError, match="no TensorRT engines for this machine"):  # ingest's is missing
        find_engines(bundle, "tensorrt_rtx", RTX)


def test_a_changed_graph_makes_its_engine_stale(bundle):
    build_engine(bundle, "step", RTX)
    build_engine(bundle, "ingest", RTX)
    manifest = dict(bundle.manifest, files=dict(bundle.manifest["files"], **{"step.onnx": "0" * 64}))
    changed = Bundle(path=bundle.path, manifest=manifest)
    with pytest.raises(EngineError, match="graph_sha256"):
        find_engines(changed, "tensorrt_rtx", RTX)


def test_precision_flags_follow_the_tensorrt_version(bundle):
    with pytest.raises(EngineError, match="no FP16 builder flag.*export the bundle with --fp16"):
        build_engine(bundle, "step", BuildOptions(builder="tensorrt_rtx", fp16_flag=True))


def test_a_missing_builder_says_where_to_get_it():
    try:
        importlib.import_module("tensorrt")
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    with pytest.raises(EngineError, match="tensorrt module is not importable here: TensorRT comes with JetPack"):
        import_builder("tensorrt")


def test_cli_builds_every_graph(bundle):
    result = CliRunner().invoke(build_main, ["--bundle", str(bundle.path), "--builder", "tensorrt_rtx",
                                             "--max-batch", "2", "--json"])
    assert result.exit_code == 0, result.output
    engines = json.loads(result.stdout)["engines"]
    assert set(engines) == {"step", "ingest"}
    assert all(path.endswith(".plan") for path in engines.values())
    without_tensorrt = CliRunner().invoke(build_main, ["--bundle", str(bundle.path), "--builder", "tensorrt"])
    assert without_tensorrt.exit_code == 1 and "Error:" in without_tensorrt.stderr
