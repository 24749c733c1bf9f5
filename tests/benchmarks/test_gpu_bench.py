"""benchmarks/gpu_bench.py: a variant that cannot run is reported in one line, whatever its exception."""
import importlib.util
from pathlib import Path

import pytest

from rmt_runtime import BackendError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_exception_without_a_message_is_reported_by_its_type(gpu_bench):
    assert gpu_bench.skip_reason(RuntimeError()) == "RuntimeError"
    assert gpu_bench.skip_reason(RuntimeError("  \n ")) == "RuntimeError"
    assert gpu_bench.skip_reason(KeyError()) == "KeyError"


def test_a_message_is_reported_by_its_first_line_after_the_type(gpu_bench):
    error = BackendError("provider 'tensorrt' is not in this onnxruntime build\nsecond line")
    assert gpu_bench.skip_reason(error) == "BackendError: provider 'tensorrt' is not in this onnxruntime build"
