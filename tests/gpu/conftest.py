"""GPU tests: marked ``gpu`` and skipped, with the reason, where no NVIDIA GPU is usable."""
import pytest


def cuda_provider_reason() -> str | None:
    """None when onnxruntime has a CUDA provider that really runs; else why not."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu on a GPU machine)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = cuda_provider_reason()
    for item in items:
        path = str(item.fspath).replace("\\", "/")
        if "tests/gpu" in path:
            item.add_marker(pytest.mark.gpu)
            if reason and path.endswith("test_onnxruntime_gpu.py"):
                item.add_marker(pytest.mark.skip(reason=reason))
