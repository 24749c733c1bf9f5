"""ONNX Runtime on the GPU: CUDA provider parity, memory kept on the device, no silent fallback."""
import numpy as np
import pytest

from rmt_runtime import BackendError, RMTRuntime
from tests.gpu.conftest import require_or_skip

pytestmark = pytest.mark.usefixtures("needs_cuda_provider")


def ids_for(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape, dtype=np.int64)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_provider_matches_cpu_over_chained_segments(bundle_factory, precision):
    model, exported = bundle_factory("gpt2", precision)
    cpu = RMTRuntime.load(exported.path, provider="cpu")
    cuda = RMTRuntime.load(exported.path, provider="cuda")
    assert cuda.runner.name == "onnxruntime/CUDAExecutionProvider"
    ids = ids_for(model.config.vocab_size, (2, 16 * 128))
    a, b = cpu.run(ids), cuda.run(ids)
    tolerance = 1e-3 if precision == "fp32" else 5e-2
    assert np.abs(a.memory - b.memory).max() < tolerance
    assert np.abs(a.last_logits - b.last_logits).max() < tolerance


def test_memory_stays_on_the_device_between_segments(bundle_factory):
    model, exported = bundle_factory("gpt2", "fp32")
    rt = RMTRuntime.load(exported.path, provider="cuda")
    state = rt.new_state()
    rt.feed(state, ids_for(model.config.vocab_size, 64))
    assert state.handles["memory"].device_name().lower() == "cuda"
    assert state.scratch["memory"].device_name().lower() == "cuda"
    assert state.handles["memory"].data_ptr() != state.scratch["memory"].data_ptr()  # ping-pong, never the same address


def test_tensorrt_provider_runs_or_says_why(bundle_factory):
    import onnxruntime as ort

    model, exported = bundle_factory("gpt2", "fp32")
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        require_or_skip("onnxruntime has no TensorrtExecutionProvider")
    try:
        rt = RMTRuntime.load(exported.path, provider="tensorrt")
    except BackendError as exc:  # listed, but its libraries are missing: the fallback must be refused, loudly
        assert "refusing to run on another provider" in str(exc), exc
        require_or_skip(f"the TensorRT execution provider is listed but cannot run here: {exc}")
    ids = ids_for(model.config.vocab_size, (1, 64))
    assert np.abs(rt.run(ids).memory - RMTRuntime.load(exported.path, provider="cpu").run(ids).memory).max() < 1e-2
