"""ONNX Runtime on the GPU: CUDA provider parity with PyTorch, memory kept on the device, no silent
fallback. Runs the pre-exported bundles and PyTorch's stored outputs (tests/gpu/conftest.py):
no torch here."""
import pytest

from rmt_runtime import BackendError, RMTRuntime
from tests.gpu.conftest import TOLERANCE, require_or_skip

pytestmark = pytest.mark.usefixtures("needs_cuda_provider")


def session_providers(runtime):
    """The provider each of the runner's ONNX Runtime sessions really runs on (not the name it was asked for)."""
    return {graph: session.get_providers()[0] for graph, session in runtime.runner._sessions.items()}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_provider_matches_pytorch_over_chained_segments(reference_bundle, precision, record_property):
    reference = reference_bundle(precision)
    cuda = RMTRuntime.load(reference.path, provider="cuda")
    assert session_providers(cuda) == {"step": "CUDAExecutionProvider", "ingest": "CUDAExecutionProvider"}
    errors = reference.errors(cuda.run(reference.arrays["chained_ids"]), "chained")
    record_property("segments", reference.index["segments"])
    for name, error in errors.items():
        record_property(f"{precision}_{name}_max_abs", error)
    assert max(errors.values()) < TOLERANCE[precision], errors


def test_memory_stays_on_the_device_between_segments(reference_bundle):
    reference = reference_bundle("fp32")
    rt = RMTRuntime.load(reference.path, provider="cuda")
    state = rt.new_state()
    rt.feed(state, reference.arrays["short_ids"][0])
    assert state.handles["memory"].device_name().lower() == "cuda"
    assert state.scratch["memory"].device_name().lower() == "cuda"
    assert state.handles["memory"].data_ptr() != state.scratch["memory"].data_ptr()  # ping-pong, never the same address


def test_tensorrt_provider_matches_pytorch(reference_bundle, record_property):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        require_or_skip("onnxruntime has no TensorrtExecutionProvider")
    reference = reference_bundle("fp32")
    try:
        rt = RMTRuntime.load(reference.path, provider="tensorrt")
    except BackendError as exc:  # listed, but its libraries are missing: the fallback must be refused, loudly
        assert "refusing to run on another provider" in str(exc), exc
        require_or_skip(f"the TensorRT execution provider is listed but cannot run here: {exc}")
    assert session_providers(rt) == {"step": "TensorrtExecutionProvider", "ingest": "TensorrtExecutionProvider"}
    errors = reference.errors(rt.run(reference.arrays["short_ids"]), "short")
    for name, error in errors.items():
        record_property(f"tensorrt_ep_{name}_max_abs", error)
    assert max(errors.values()) < 1e-2, errors  # TensorRT's fp32 allows TF32 matmuls unless told otherwise
