"""GPU tests: marked ``gpu``. Where what a test needs is missing it skips with the reason, and
with RMT_REQUIRE_GPU=1 (scripts/gpu_checks.sh sets it) every such skip is a failure instead: a
GPU run that tested nothing cannot pass.

No torch (a Jetson has none): the tests run pre-exported bundles and compare with PyTorch's
outputs stored beside them, both made by scripts/make_gpu_bundles.py into the directory that
RMT_GPU_BUNDLES names (scripts/gpu_checks.sh --bundles DIR sets it). Without the variable, where
torch is importable, that script makes them once per session into a temporary directory.
This conftest imports neither torch nor the suite's tests/conftest.py fixtures, so that
``pytest tests/gpu --confcutdir=tests/gpu`` runs where torch is not installed.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REQUIRE = "RMT_REQUIRE_GPU"
BUNDLES = "RMT_GPU_BUNDLES"
ROOT = Path(__file__).resolve().parents[2]
MAKE_BUNDLES = ROOT / "scripts" / "make_gpu_bundles.py"

# Largest |difference| from PyTorch's fp32 model allowed in memory and last-token logits. On
# ONNX Runtime's CPU provider the tiny bundles' 128 chained segments differ by 1.2e-6 (fp32)
# and 1.1e-2 (fp16) in memory, 7e-8 and 2.2e-4 in the last logits
# (tests/scripts/test_gpu_checks.py pins that); the GPU bounds leave room for other kernels
# (TF32 matmuls where ONNX Runtime enables them). Each GPU run records its figures in the JUnit
# XML (scripts/gpu_checks.sh: gpu-report/gpu-junit.xml), from which they can be tightened.
# The tiny ARMT's 128 chained segments on the CPU provider differ by 4.2e-7 (fp32) and 1.4e-3
# (fp16) in its state (z, whose entries stay below 1.7; W_mem's below 0.05), 1.3e-7 and 1.6e-4
# in the last logits: the same bounds hold for it, with the same room.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}
ARCHITECTURES = ("rmt", "armt")


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
        importlib.import_module("tensorrt")
    except ImportError as exc:
        return f"TensorRT is not installed (JetPack, or NVIDIA's pip index): {exc}"
    cudart = cudart_module()
    if cudart is None:
        return "cuda-python is not installed (neither cuda.bindings.runtime nor cuda.cudart imports)"
    error, count = cudart.cudaGetDeviceCount()
    if int(error) != 0 or count < 1:
        name = getattr(error, "name", error)
        return (f"cuda-python sees no CUDA GPU (cudaGetDeviceCount: {name}, {count} devices; "
                "scripts/gpu_preflight.py says why)")
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


@dataclass(frozen=True)
class ReferenceBundle:
    """One bundle of a make_gpu_bundles.py directory and PyTorch's outputs on its seeded ids."""

    path: Path
    precision: str
    arrays: dict[str, np.ndarray]   # chained_ids, chained_memory (ARMT: chained_state.<name>), chained_last_logits, short_*
    index: dict                     # the directory's index (ARMT: its "armt" part: segments, segment_size, state, ...)
    architecture: str = "rmt"

    @property
    def state_names(self) -> list[str]:
        """The runtime's state tensors: ["memory"] for an RMT, W_mem.0, z.0, ... for an ARMT."""
        return list(self.index["state"]) if self.architecture == "armt" else ["memory"]

    def errors(self, output, name: str) -> dict[str, float]:
        """Max |difference| of a runtime Output from the reference ``name`` (chained or short): the
        RMT's "memory", the ARMT's "state" (the largest over its named tensors), "last_logits"."""
        logits = float(np.abs(output.last_logits - self.arrays[f"{name}_last_logits"]).max())
        if self.architecture == "rmt":
            return {"memory": float(np.abs(output.memory - self.arrays[f"{name}_memory"]).max()), "last_logits": logits}
        state = max(float(np.abs(output.state[key] - self.arrays[f"{name}_state.{key}"]).max())
                    for key in self.state_names)
        return {"state": state, "last_logits": logits}


def load_reference_bundle(directory: Path, precision: str, architecture: str = "rmt") -> ReferenceBundle:
    """The ``precision`` bundle (the ARMT's with architecture="armt") of a make_gpu_bundles.py
    directory; LookupError says what is wrong."""
    index_file = Path(directory) / "index.json"
    if not index_file.is_file():
        raise LookupError(f"{directory} has no index.json: make it with scripts/make_gpu_bundles.py --out DIR")
    index = json.loads(index_file.read_text())
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    if architecture == "armt":
        if not isinstance(index.get("armt"), dict):
            raise LookupError(f"{directory} has no ARMT bundles (made by an older scripts/make_gpu_bundles.py: "
                              "remake it)")
        index = index["armt"]
    entry = index.get("bundles", {}).get(precision)
    what = "ARMT " if architecture == "armt" else ""
    if entry is None:
        raise LookupError(f"{directory} has no {what}{precision} bundle (it has {sorted(index.get('bundles', {}))})")
    with np.load(Path(directory) / entry["reference"]) as stored:
        arrays = {name: stored[name] for name in stored.files}
    return ReferenceBundle(Path(directory) / entry["bundle"], precision, arrays, index, architecture)


_MADE: dict[str, object] = {}   # "dir": the bundles made this session, or "failed": why making them failed


def bundle_directory(make_into: Path | None = None) -> tuple[Path | None, str | None]:
    """(directory, None) with the test bundles, or (None, why not). RMT_GPU_BUNDLES when set;
    else, where torch is importable, scripts/make_gpu_bundles.py makes them into ``make_into``
    (once per session, in its own process: torch never loads into the test process); a make
    that fails raises RuntimeError, then and for every later test (never a skip: a bug)."""
    given = os.environ.get(BUNDLES)
    if given:
        return Path(given), None
    if "failed" in _MADE:
        raise RuntimeError(_MADE["failed"])
    if "dir" in _MADE:
        return _MADE["dir"], None
    if importlib.util.find_spec("torch") is None:
        return None, (f"{BUNDLES} is not set and torch is not installed to make the bundles: make them where torch "
                      f"is (python scripts/make_gpu_bundles.py --out DIR), copy DIR here and set {BUNDLES}=DIR "
                      "(scripts/gpu_checks.sh --bundles DIR)")
    if make_into is None:
        return None, f"{BUNDLES} is not set and no directory was given to make the bundles in"
    shutil.rmtree(make_into, ignore_errors=True)
    done = subprocess.run([sys.executable, str(MAKE_BUNDLES), "--out", str(make_into)], capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        _MADE["failed"] = f"scripts/make_gpu_bundles.py failed (exit {done.returncode}): {done.stderr[-2000:]}"
        raise RuntimeError(_MADE["failed"])
    _MADE["dir"] = make_into
    return make_into, None


@pytest.fixture
def reference_bundle(tmp_path_factory):
    """reference_bundle(precision, architecture="rmt") -> ReferenceBundle. Call it in the test body,
    after the needs_* fixtures: a machine without a GPU skips before any bundle is made."""
    def get(precision: str, architecture: str = "rmt") -> ReferenceBundle:
        try:
            directory, reason = bundle_directory(tmp_path_factory.getbasetemp() / "gpu-bundles")
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
        if directory is None:
            require_or_skip(reason)
        try:
            return load_reference_bundle(directory, precision, architecture)
        except (LookupError, OSError, KeyError, ValueError) as exc:
            pytest.fail(f"{BUNDLES}={directory}: {exc}", pytrace=False)  # a broken directory is never a skip
    return get


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
