"""Native TensorRT backend on a GPU: engines built with rmt-build's library call, parity with
PyTorch over chained segments (128 with the tiny bundles), ping-pong buffers, CUDA-graph replay,
TF32 off in fp32 engines; for the RMT (memory) and the ARMT (2 x L named state pairs). Runs the
pre-exported bundles and PyTorch's stored outputs (tests/gpu/conftest.py): no torch here."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rmt_runtime import EngineError, RMTRuntime
from rmt_runtime.engines import BuildOptions, build_bundle_engines
from tests.gpu.conftest import TOLERANCE

pytestmark = pytest.mark.usefixtures("needs_tensorrt")
ARCHITECTURES = ["rmt", "armt"]

_BUILT: dict[tuple[str, str], Path] = {}


def prefix(architecture: str) -> str:
    """Property names: the RMT's as they always were, the ARMT's prefixed."""
    return "" if architecture == "rmt" else f"{architecture}_"


@pytest.fixture
def built_bundle(reference_bundle, tmp_path_factory):
    """built_bundle(precision, architecture="rmt") -> (ReferenceBundle, a copy of its bundle with
    engines for this GPU). Built once per session, architecture and precision (as `rmt-build
    --bundle COPY` would), on a copy: the bundle directory may be shared or read-only."""
    def get(precision: str, architecture: str = "rmt"):
        reference = reference_bundle(precision, architecture)
        key = (architecture, precision)
        if key not in _BUILT:
            copy = tmp_path_factory.mktemp(f"engines-{architecture}-{precision}") / "bundle"
            shutil.copytree(reference.path, copy)
            engines = build_bundle_engines(copy, BuildOptions())
            assert sorted(engines) == ["ingest", "step"], engines
            _BUILT[key] = copy
        return reference, _BUILT[key]
    return get


def test_loading_without_engines_is_an_error_that_names_rmt_build(reference_bundle, tmp_path):
    """Loading never builds (minutes on a Jetson): a bundle with no engine for this GPU is refused."""
    bundle = tmp_path / "bundle"
    shutil.copytree(reference_bundle("fp32").path, bundle)
    with pytest.raises(EngineError, match="rmt-build"):
        RMTRuntime.load(bundle, backend="tensorrt")
    assert not list(bundle.glob("engines/*.plan"))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_matches_pytorch_over_chained_segments(built_bundle, precision, architecture, record_property):
    reference, bundle = built_bundle(precision, architecture)
    assert sorted(p.name.split("-")[0] for p in (bundle / "engines").glob("*.plan")) == ["ingest", "step"]
    trt_runtime = RMTRuntime.load(bundle, backend="tensorrt")
    errors = reference.errors(trt_runtime.run(reference.arrays["chained_ids"]), "chained")
    record_property("segments", reference.index["segments"])
    for name, error in errors.items():
        record_property(f"{prefix(architecture)}{precision}_{name}_max_abs", error)
    assert max(errors.values()) < TOLERANCE[precision], errors
    state = trt_runtime.new_state()
    for name in reference.state_names:
        assert state.handles[name].ptr != state.scratch[name].ptr, name  # ping-pong buffers, every pair


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_cuda_graph_replay_equals_plain_execution(built_bundle, architecture, record_property):
    """Captured graphs (two per state: the ping-pong arrangements) replay to the same memory and
    logits as plain execution, over enough segments that both replay many times, then a partial
    segment (never captured). A graph whose capture fails on this TensorRT (before 10.8 CumSum
    imports as a loop) runs plainly: recorded, and its results must still be equal."""
    import tensorrt

    reference, bundle = built_bundle("fp32", architecture)
    size = reference.index["segment_size"]
    chained = reference.arrays["chained_ids"]
    ids = chained[:, :chained.shape[1] - size + 5]  # every full segment but the last, then 5 tokens
    plain = RMTRuntime.load(bundle, backend="tensorrt")
    graphed = RMTRuntime.load(bundle, backend="tensorrt", cuda_graphs=True)
    a, b = plain.run(ids), graphed.run(ids)
    for name in reference.state_names:
        np.testing.assert_array_equal(a.state[name], b.state[name], err_msg=name)
    np.testing.assert_array_equal(a.last_logits, b.last_logits)
    uncapturable = set(graphed.runner.uncapturable)
    record_property("tensorrt_version", tensorrt.__version__)
    record_property(f"{prefix(architecture)}captured_graphs", graphed.runner.captured_graphs)
    record_property(f"{prefix(architecture)}uncapturable", ",".join(sorted(uncapturable)) or "none")
    assert uncapturable <= {"ingest", "step"}, uncapturable
    if not uncapturable:
        assert graphed.runner.captured_graphs == 2  # one ingest graph per ping-pong arrangement: graphs really replayed
    assert plain.runner.captured_graphs == 0


def test_fp32_engines_are_built_without_tf32(built_bundle):
    """TensorRT turns TF32 on by default: an "fp32" engine on Ampere/Hopper/Orin would be TF32
    unless the builder clears it, and the engine's metadata says it did."""
    _, bundle = built_bundle("fp32")
    metadata = sorted((bundle / "engines").glob("*.json"))
    assert sorted(m.name.split("-")[0] for m in metadata) == ["ingest", "step"]
    for meta in metadata:
        fields = json.loads(meta.read_text())
        assert fields.get("tf32") is False, f"{meta.name}: tf32={fields.get('tf32', '(absent)')!r}"
