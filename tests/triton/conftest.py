"""Triton fixtures: the sample model (samples/keyrecall) exported once per run, a python-kind
repository of it, and one live tritonserver per test session (per xdist worker) on
127.0.0.1 with free ports, stopped at the end.

The server is the one the nvidia-pytriton wheel ships, run from its own environment
(.venv-triton from requirements-triton.txt, numpy<2; ``make test`` creates it and names it in
RMT_TRITON_VENV) while the tests and the clients run here, on numpy 2. A test is skipped only
where that wheel cannot be installed (not Linux x86_64/aarch64 with glibc >= 2.35, or a
Python without a stub in the wheel); anywhere else a missing server environment is a failure.
"""
from __future__ import annotations

import importlib.metadata
import platform
import re
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from rmt_export.exporter import ExportOptions, export_bundle
from rmt_export.triton import TritonOptions, write_triton_repository
from rmt_export.triton_server import LocalTritonServer, TritonInstall, TritonUnavailable
from rmt_export.validate import ValidationPlan
from rmt_runtime import RMTRuntime
from rmt_runtime.triton_model import LIVE_METRIC

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "samples" / "keyrecall" / "model.pt"
STUB_PYTHONS = ((3, 8), (3, 13))  # the wheel's python_backend_stubs


def not_installable() -> str | None:
    """Why nvidia-pytriton cannot be installed here, or None where it can."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        return f"nvidia-pytriton has wheels for Linux x86_64 and aarch64 only, not {sys.platform} {platform.machine()}"
    if not STUB_PYTHONS[0] <= sys.version_info[:2] <= STUB_PYTHONS[1]:
        return f"nvidia-pytriton 0.7.0 ships Python-backend stubs for Python 3.8-3.13, not {platform.python_version()}"
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
        return f"nvidia-pytriton's wheels need glibc >= 2.35, this is {libc} {version}"
    return None


@pytest.fixture(scope="session")
def triton_install() -> TritonInstall:
    """The server environment (RMT_TRITON_VENV, else the repository's .venv-triton), checked to
    run this checkout's rmt_runtime with this environment's onnxruntime."""
    reason = not_installable()
    if reason:
        pytest.skip(f"no live Triton tests: {reason}")
    try:
        install = TritonInstall.find()
    except TritonUnavailable as exc:
        pytest.fail(f"{exc}. nvidia-pytriton installs on this machine, so the live tests must run: `make test` "
                    f"creates the server environment (RMT_TRITON_VENV names one other than {ROOT / '.venv-triton'})",
                    pytrace=False)
    where = install.venv or sys.prefix
    if install.runtime_source is None or install.runtime_source.resolve() != (ROOT / "runtime").resolve():
        pytest.fail(f"the server environment {where} imports rmt_runtime from {install.runtime_source}, not from this "
                    f"checkout ({ROOT / 'runtime'}): install it there editable ({install.python} -m pip install "
                    f"--no-deps -e {ROOT})", pytrace=False)
    here = importlib.metadata.version("onnxruntime")
    if install.versions["onnxruntime"] != here:
        pytest.fail(f"the server environment {where} has onnxruntime {install.versions['onnxruntime']}, this one "
                    f"{here}: the tests compare the two bit for bit (requirements-dev.txt and "
                    f"requirements-triton.txt pin the same version)", pytrace=False)
    return install


@pytest.fixture(scope="session")
def sample_bundle(shared_once) -> Path:
    """samples/keyrecall's checkpoint as an fp32 bundle (segment 32, M=4, D=64, bytes as tokens),
    without the generation graphs (not served), validated over 8 segments."""
    options = ExportOptions(precision="fp32", generation=False, plan=ValidationPlan(segments=8),
                            tokenizer_dir=CHECKPOINT.parent)
    return shared_once("triton/keyrecall-fp32", lambda path: export_bundle(CHECKPOINT, path, options))


@pytest.fixture(scope="session")
def runtime(sample_bundle) -> RMTRuntime:
    """The in-process runtime the served model must equal (ONNX Runtime CPU, as in the server)."""
    return RMTRuntime.load(sample_bundle, backend="onnxruntime", provider="cpu", threads=1)


# The models of the session's repository.
MAIN = "rmt"              # max batch 8, 32 live sequences, idle 60 s
IDLE = "rmt_idle"         # sequences idle for 0.5 s are dropped
BATCH = "rmt_batch"       # waits up to 20 s for 4 requests: a batch of 4 forms when 4 are queued
IDLE_SECONDS = 0.5


@pytest.fixture(scope="session")
def repository(sample_bundle, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("triton-repo")
    for options in (TritonOptions(name=MAIN, repository_kind="python", max_batch_size=8, max_sequences=32),
                    TritonOptions(name=IDLE, repository_kind="python", max_batch_size=2,
                                  max_sequence_idle_us=int(IDLE_SECONDS * 1e6)),
                    TritonOptions(name=BATCH, repository_kind="python", max_batch_size=4,
                                  max_queue_delay_us=20_000_000)):
        write_triton_repository(sample_bundle, repo, options)
    return repo


@pytest.fixture(scope="session")
def server(triton_install, repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    with LocalTritonServer(repository, log_path=log, venv=triton_install.venv) as running:
        yield running
        assert running.running, f"the server died during the tests:\n{running.log_tail()}"


def wait_for(condition, what: str, deadline_s: float = 60.0):
    """Poll ``condition`` until it returns a truthy value; fail after ``deadline_s`` (a deadline
    for a state change the server makes on its own, such as dropping an idle sequence)."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {deadline_s:g} s")
        time.sleep(0.05)  # the pause between polls


def live_sequences(server, model: str) -> int:
    """The model's own gauge of the sequences whose memory it holds (all instances)."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    values = [float(v) for v in re.findall(rf'^{LIVE_METRIC}{{[^}}]*model="{re.escape(model)}"[^}}]*}} (\S+)$',
                                           text, flags=re.M)]
    assert values, f"no {LIVE_METRIC} gauge for model {model!r} in the server's metrics"
    return int(sum(values))


def keyrecall_example(seed: int, segments: int = 4):
    """A sample-task input (token ids) and its answer."""
    from samples.task import make_example

    text, answer = make_example(np.random.default_rng(seed), segments=segments, segment_size=32)
    return np.frombuffer(text, np.uint8).astype(np.int64), answer
