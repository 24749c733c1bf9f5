"""GPU tests: marked ``gpu``. Where what a test needs is missing it skips with the reason, and
with RMT_REQUIRE_GPU=1 (scripts/gpu_checks.sh sets it) every such skip is a failure instead: a
GPU run that tested nothing cannot pass."""
import os

import pytest

REQUIRE = "RMT_REQUIRE_GPU"


def require_or_skip(reason: str):
    """Skip with ``reason``; under RMT_REQUIRE_GPU=1, fail with it. Never returns."""
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{REQUIRE}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def cudart_module():
    """cuda-python's runtime API in either layout the TensorRT backend supports, or None."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            return None
    return cudart


def cuda_provider_reason() -> str | None:
    """None when onnxruntime lists a CUDA provider (the tests then check that it really runs); else why not."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu on a GPU machine)"
    return None


def tensorrt_reason() -> str | None:
    """None when TensorRT, cuda-python (either layout) and a CUDA GPU are all here; else why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (JetPack, or NVIDIA's pip index)"
    cudart = cudart_module()
    if cudart is None:
        return "cuda-python is not installed (neither cuda.bindings.runtime nor cuda.cudart imports)"
    error, count = cudart.cudaGetDeviceCount()
    if int(error) != 0 or count < 1:
        return f"cuda-python sees no CUDA GPU (cudaGetDeviceCount: {error}, {count} devices)"
    return None


@pytest.fixture
def needs_cuda_provider():
    reason = cuda_provider_reason()
    if reason:
        require_or_skip(reason)


@pytest.fixture
def needs_tensorrt():
    reason = tensorrt_reason()
    if reason:
        require_or_skip(reason)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
