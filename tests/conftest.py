"""Shared fixtures: tiny random-initialised models and their exported bundles, seeded.

Exporting (tracing with dynamo) is what the suite spends its time on, so each bundle is
exported once per test run: under pytest-xdist the workers share one on-disk cache, and a
file lock makes the first worker that needs a bundle export it while the others wait.

Across runs (local reruns only; CI starts clean): with RMT_TEST_CACHE=DIR the tiny models'
checkpoints and bundles (``ckpt/`` and ``bundles/``) are kept in DIR/<key>, where the key is
the sha256 of the code that makes them (rmt_model/, export/, runtime/, the fixtures) and of the
versions of the libraries that trace and run them; code that changes makes a new key, and the
folders of other keys are removed.

torch and the export stack are imported by the fixtures that use them, not here: the GPU
tests (tests/gpu) run on a Jetson without torch from pre-exported bundles, and pytest loads
this file for them too.
"""
import hashlib
import importlib.metadata
import os
import re
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

from rmt_runtime import Bundle


def pytest_configure(config):
    """Under pytest-xdist every core already runs a worker: one torch thread per worker, so
    workers do not oversubscribe the cores (tiny models gain nothing from a second thread)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        try:
            import torch
        except ImportError:  # the GPU tests on a Jetson: nothing to limit
            return
        torch.set_num_threads(1)


@pytest.fixture
def make_model():
    """Build a tiny seeded RMT of a family: make_model('llama', num_mem_tokens=2, ...)."""
    def make(family: str = "gpt2", seed: int = 0, **overrides):
        import torch

        from rmt_model import build_model
        from rmt_model.tiny import tiny_config

        torch.manual_seed(seed)
        return build_model(tiny_config(family, **overrides))
    return make


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, worker_id):
    """A directory every xdist worker of this run sees (the session's own one without xdist)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if worker_id != "master" else base) / "shared"
    root.mkdir(exist_ok=True)
    return root


ROOT = Path(__file__).resolve().parents[1]
# What the cached checkpoints and bundles are made by: a change to any of these makes a new key.
CACHE_SOURCES = ("rmt_model", "export", "runtime", "tests/conftest.py", "tests/rmt_model/test_armt.py",
                 "tests/export/test_validator.py")
CACHE_LIBRARIES = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "numpy", "safetensors")
CACHED_PREFIXES = ("bundles/", "ckpt/")


def bundle_code_key() -> str:
    """The sha256 (16 hex digits) of the code and library versions the cached entries are made by."""
    digest = hashlib.sha256()
    for source in CACHE_SOURCES:
        path = ROOT / source
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(ROOT).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    for library in CACHE_LIBRARIES:
        try:
            version = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{library}=={version}\0".encode())
    return digest.hexdigest()[:16]


def persistent_cache() -> Path | None:
    """DIR/<key> when RMT_TEST_CACHE=DIR is set (made, and other keys' folders removed), else None."""
    setting = os.environ.get("RMT_TEST_CACHE")
    if not setting:
        return None
    base = Path(setting).resolve()
    key = bundle_code_key()
    base.mkdir(parents=True, exist_ok=True)
    for old in base.iterdir():  # only folders named as this function names them
        if old.name != key and re.fullmatch(r"[0-9a-f]{16}", old.name) and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
    (base / key).mkdir(exist_ok=True)
    return base / key


@pytest.fixture(scope="session")
def shared_once(shared_dir):
    """shared_once(name, make) -> path: ``make(path)`` creates ``path`` (a file or a directory
    that does not exist yet) once per test run, whichever worker asks first; the others wait
    for it and reuse it. A make that fails leaves nothing behind, so the next one retries.
    Checkpoints and bundles (``ckpt/``, ``bundles/``) go to the persistent cache when one is set."""
    cache = persistent_cache()

    def once(name: str, make):
        path = (cache if cache is not None and name.startswith(CACHED_PREFIXES) else shared_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                staging = path.with_name(f".{path.name}.partial")
                if staging.is_dir():
                    shutil.rmtree(staging)
                staging.unlink(missing_ok=True)
                make(staging)
                staging.rename(path)
        return path
    return once


@pytest.fixture(scope="session")
def tiny_checkpoint(shared_once):
    """A saved tiny GPT-2 RMT checkpoint and the model it holds."""
    import torch

    from rmt_model import build_model, save_checkpoint
    from rmt_model.tiny import tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config("gpt2", num_mem_tokens=4, segment_size=16))
    return shared_once("ckpt/model.pt", lambda path: save_checkpoint(model, path)), model


@pytest.fixture(scope="session")
def bundle_factory(shared_once):
    """bundle_factory(family, precision, **config_overrides) -> (model, ExportResult), exported once
    per run (32 validation segments: validating costs under a second, tracing ~7-15 s).
    Overrides go to tiny_config (e.g. initializer_range=0.2)."""
    import torch

    from rmt_export.exporter import ExportOptions, ExportResult, export_model
    from rmt_export.validate import ValidationPlan
    from rmt_model import build_model
    from rmt_model.tiny import tiny_config

    cache = {}

    def make(family: str, precision: str = "fp32", **overrides):
        key = (family, precision, tuple(sorted(overrides.items())))
        if key not in cache:
            torch.manual_seed(0)
            model = build_model(tiny_config(family, **{"num_mem_tokens": 4, "segment_size": 16, **overrides}))
            suffix = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
            options = ExportOptions(precision=precision, plan=ValidationPlan(segments=32))
            out = shared_once(f"bundles/{family}-{precision}{suffix}", lambda path: export_model(model, path, options))
            bundle = Bundle.load(out)
            cache[key] = (model, ExportResult(path=out, manifest=bundle.manifest, seconds={}))
        return cache[key]
    return make


@pytest.fixture(scope="session")
def armt_bundle_factory(shared_once):
    """armt_bundle_factory(precision="fp32", generation=True) -> (model, bundle path): the tiny
    GPT-2 ARMT of the newer reference (2 heads, sink; tests/rmt_model/test_armt.py) with
    W_mv ~ N(0, 0.05^2), exported and validated once per run (32 segments)."""
    from rmt_export.exporter import ExportOptions, export_model
    from rmt_export.validate import ValidationPlan
    from tests.rmt_model.test_armt import NEWER, make_armt

    cache = {}

    def make(precision: str = "fp32", generation: bool = True):
        key = (precision, generation)
        if key not in cache:
            model = make_armt("gpt2", w_mv_std=0.05, **NEWER)
            options = ExportOptions(precision=precision, plan=ValidationPlan(segments=32), generation=generation)
            name = f"bundles/armt-gpt2-{precision}" + ("" if generation else "-nogen")
            cache[key] = (model, shared_once(name, lambda path: export_model(model, path, options)))
        return cache[key]
    return make


@pytest.fixture(scope="session")
def armt_checkpoint(shared_once, armt_bundle_factory):
    """The checkpoint of armt_bundle_factory's model (rmt_model.save_checkpoint), saved once per run."""
    from rmt_model import save_checkpoint

    model = armt_bundle_factory("fp32")[0]
    return shared_once("ckpt/armt.pt", lambda path: save_checkpoint(model, path))


# The documented code blocks' count (tests/docs): here, not in tests/docs/conftest.py, because
# under pytest-xdist only the conftests of the command line's paths load in the controller,
# which is where the terminal summary is written.
def pytest_terminal_summary(terminalreporter):
    run, skipped, timed = 0, [], []
    for report in [r for key in ("passed", "failed") for r in terminalreporter.stats.get(key, [])]:
        if report.when != "call":
            continue
        for name, outcomes in report.user_properties:
            if name != "doc_blocks":
                continue
            document = report.nodeid.rsplit("[", 1)[-1].rstrip("]")
            for line, status, reason, seconds in outcomes:
                if status == "run":
                    run += 1
                    timed.append((seconds, f"{document}:{line}"))
                else:
                    skipped.append(f"{document}:{line}: {reason}")
    if run or skipped:
        terminalreporter.section("documented code blocks")
        terminalreporter.write_line(f"{run} run, {len(skipped)} skipped")
        slowest = ", ".join(f"{where} {seconds:.0f}s" for seconds, where in sorted(timed, reverse=True)[:3])
        terminalreporter.write_line(f"  slowest run: {slowest}")
        for line in skipped:
            terminalreporter.write_line(f"  skipped {line}")
