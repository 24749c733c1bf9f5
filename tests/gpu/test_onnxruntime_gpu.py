"""ONNX Runtime on the GPU: CUDA provider parity with PyTorch, the state kept on the device, no
silent fallback; for the RMT (memory) and the ARMT (2 x L named state pairs W_mem.{l}, z.{l}).
Runs the pre-exported bundles and PyTorch's stored outputs (tests/gpu/conftest.py): no torch here."""
import pytest

from rmt_runtime import BackendError, RMTRuntime
from tests.gpu.conftest import TOLERANCE, require_or_skip

pytestmark = pytest.mark.usefixtures("needs_cuda_provider")
ARCHITECTURES = ["rmt", "armt"]


def prefix(architecture: str) -> str:
    """Property names: the RMT's as they always were, the ARMT's prefixed."""
    return "" if architecture == "rmt" else f"{architecture}_"


def session_providers(runtime):
    """The provider each of the runner's ONNX Runtime sessions really runs on (not the name it was asked for)."""
    return {graph: session.get_providers()[0] for graph, session in runtime.runner._sessions.items()}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_provider_matches_pytorch_over_chained_segments(reference_bundle, precision, architecture,
                                                             record_property):
    reference = reference_bundle(precision, architecture)
    cuda = RMTRuntime.load(reference.path, provider="cuda")
    assert session_providers(cuda) == {"step": "CUDAExecutionProvider", "ingest": "CUDAExecutionProvider"}
    output = cuda.run(reference.arrays["chained_ids"])
    assert sorted(output.state) == sorted(reference.state_names)
    errors = reference.errors(output, "chained")
    record_property("segments", reference.index["segments"])
    for name, error in errors.items():
        record_property(f"{prefix(architecture)}{precision}_{name}_max_abs", error)
    assert max(errors.values()) < TOLERANCE[precision], errors


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_state_stays_on_the_device_between_segments(reference_bundle, architecture):
    reference = reference_bundle("fp32", architecture)
    rt = RMTRuntime.load(reference.path, provider="cuda")
    state = rt.new_state()
    rt.feed(state, reference.arrays["short_ids"][0])
    assert sorted(state.handles) == sorted(reference.state_names)
    for name in reference.state_names:
        assert state.handles[name].device_name().lower() == "cuda", name
        assert state.scratch[name].device_name().lower() == "cuda", name
        assert state.handles[name].data_ptr() != state.scratch[name].data_ptr(), name  # ping-pong, never one address


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_tensorrt_provider_matches_pytorch(reference_bundle, architecture, record_property):
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        require_or_skip("onnxruntime has no TensorrtExecutionProvider")
    reference = reference_bundle("fp32", architecture)
    try:
        rt = RMTRuntime.load(reference.path, provider="tensorrt")
    except BackendError as exc:  # listed, but its libraries are missing: the fallback must be refused, loudly
        assert "refusing to run on another provider" in str(exc), exc
        require_or_skip(f"the TensorRT execution provider is listed but cannot run here: {exc}")
    assert session_providers(rt) == {"step": "TensorrtExecutionProvider", "ingest": "TensorrtExecutionProvider"}
    errors = reference.errors(rt.run(reference.arrays["short_ids"]), "short")
    for name, error in errors.items():
        record_property(f"{prefix(architecture)}tensorrt_ep_{name}_max_abs", error)
    assert max(errors.values()) < 1e-2, errors  # TensorRT's fp32 allows TF32 matmuls unless told otherwise
