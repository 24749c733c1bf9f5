"""The tiny ARMT on the GPU (2 x L named state pairs W_mem.{l}, z.{l}; no memory tensor), as the
RMT bundles are checked: ONNX Runtime's CUDA and TensorRT providers and the native TensorRT
backend against PyTorch's stored outputs over chained segments (128 with the default bundles),
every state pair kept on the device in ping-pong buffers, CUDA-graph replay equal to plain
execution. Runs the pre-exported bundles of scripts/make_gpu_bundles.py (tests/gpu/conftest.py):
no torch here."""
import shutil
from pathlib import Path

import numpy as np
import pytest

from rmt_runtime import BackendError, RMTRuntime
from rmt_runtime.engines import BuildOptions, build_bundle_engines
from tests.gpu.conftest import TOLERANCE, require_or_skip

ARMT = "armt"


def session_providers(runtime):
    """The provider each of the runner's ONNX Runtime sessions really runs on (not the name it was asked for)."""
    return {graph: session.get_providers()[0] for graph, session in runtime.runner._sessions.items()}


# ---- ONNX Runtime ------------------------------------------------------------------------------
@pytest.mark.usefixtures("needs_cuda_provider")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_armt_on_the_cuda_provider_matches_pytorch_over_chained_segments(reference_bundle, precision,
                                                                         record_property):
    reference = reference_bundle(precision, ARMT)
    cuda = RMTRuntime.load(reference.path, provider="cuda")
    assert session_providers(cuda) == {"step": "CUDAExecutionProvider", "ingest": "CUDAExecutionProvider"}
    output = cuda.run(reference.arrays["chained_ids"])
    assert output.memory is None and sorted(output.state) == sorted(reference.state_names)
    errors = reference.errors(output, "chained")
    record_property("segments", reference.index["segments"])
    for name, error in errors.items():
        record_property(f"armt_{precision}_{name}_max_abs", error)
    assert max(errors.values()) < TOLERANCE[precision], errors


@pytest.mark.usefixtures("needs_cuda_provider")
def test_armt_state_stays_on_the_device_between_segments(reference_bundle):
    reference = reference_bundle("fp32", ARMT)
    rt = RMTRuntime.load(reference.path, provider="cuda")
    state = rt.new_state()
    rt.feed(state, reference.arrays["short_ids"][0])
    assert sorted(state.handles) == sorted(reference.state_names)
    for name in reference.state_names:
        assert state.handles[name].device_name().lower() == "cuda", name
        assert state.scratch[name].device_name().lower() == "cuda", name
        assert state.handles[name].data_ptr() != state.scratch[name].data_ptr(), name  # ping-pong


@pytest.mark.usefixtures("needs_cuda_provider")
def test_armt_on_the_tensorrt_provider_matches_pytorch(reference_bundle, record_property):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        require_or_skip("onnxruntime has no TensorrtExecutionProvider")
    reference = reference_bundle("fp32", ARMT)
    try:
        rt = RMTRuntime.load(reference.path, provider="tensorrt")
    except BackendError as exc:  # listed, but its libraries are missing: the fallback must be refused, loudly
        assert "refusing to run on another provider" in str(exc), exc
        require_or_skip(f"the TensorRT execution provider is listed but cannot run here: {exc}")
    assert session_providers(rt) == {"step": "TensorrtExecutionProvider", "ingest": "TensorrtExecutionProvider"}
    errors = reference.errors(rt.run(reference.arrays["short_ids"]), "short")
    for name, error in errors.items():
        record_property(f"armt_tensorrt_ep_{name}_max_abs", error)
    assert max(errors.values()) < 1e-2, errors  # TensorRT's fp32 allows TF32 matmuls unless told otherwise


# ---- native TensorRT ---------------------------------------------------------------------------
_BUILT: dict[str, Path] = {}


@pytest.fixture
def built_armt(reference_bundle, tmp_path_factory):
    """built_armt(precision) -> (ReferenceBundle, a copy of the ARMT bundle with engines for this
    GPU), built once per session and precision on a copy (the bundle directory may be read-only)."""
    def get(precision: str):
        reference = reference_bundle(precision, ARMT)
        if precision not in _BUILT:
            copy = tmp_path_factory.mktemp(f"armt-engines-{precision}") / "bundle"
            shutil.copytree(reference.path, copy)
            engines = build_bundle_engines(copy, BuildOptions())
            assert sorted(engines) == ["ingest", "step"], engines
            _BUILT[precision] = copy
        return reference, _BUILT[precision]
    return get


@pytest.mark.usefixtures("needs_tensorrt")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_armt_on_tensorrt_matches_pytorch_over_chained_segments(built_armt, precision, record_property):
    reference, bundle = built_armt(precision)
    assert sorted(p.name.split("-")[0] for p in (bundle / "engines").glob("*.plan")) == ["ingest", "step"]
    trt_runtime = RMTRuntime.load(bundle, backend="tensorrt")
    errors = reference.errors(trt_runtime.run(reference.arrays["chained_ids"]), "chained")
    record_property("segments", reference.index["segments"])
    for name, error in errors.items():
        record_property(f"armt_{precision}_{name}_max_abs", error)
    assert max(errors.values()) < TOLERANCE[precision], errors
    state = trt_runtime.new_state()
    for name in reference.state_names:
        assert state.handles[name].ptr != state.scratch[name].ptr, name  # ping-pong buffers, every pair


@pytest.mark.usefixtures("needs_tensorrt")
def test_armt_cuda_graph_replay_equals_plain_execution(built_armt, record_property):
    """Captured graphs replay to the same state and logits as plain execution over every full
    segment, then a partial one (never captured); a graph whose capture fails runs plainly."""
    reference, bundle = built_armt("fp32")
    size = reference.index["segment_size"]
    chained = reference.arrays["chained_ids"]
    ids = chained[:, :chained.shape[1] - size + 5]
    plain = RMTRuntime.load(bundle, backend="tensorrt")
    graphed = RMTRuntime.load(bundle, backend="tensorrt", cuda_graphs=True)
    a, b = plain.run(ids), graphed.run(ids)
    for name in reference.state_names:
        np.testing.assert_array_equal(a.state[name], b.state[name], err_msg=name)
    np.testing.assert_array_equal(a.last_logits, b.last_logits)
    uncapturable = set(graphed.runner.uncapturable)
    record_property("armt_captured_graphs", graphed.runner.captured_graphs)
    record_property("armt_uncapturable", ",".join(sorted(uncapturable)) or "none")
    assert uncapturable <= {"ingest", "step"}, uncapturable
    if not uncapturable:
        assert graphed.runner.captured_graphs == 2  # one ingest graph per ping-pong arrangement of all the pairs
    assert plain.runner.captured_graphs == 0
