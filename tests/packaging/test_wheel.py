"""The package as users install it: the built wheel and sdist, installed into a fresh venv
as the README's deploy line does (the wheel with its text extra, and onnxruntime; no torch,
no editable install), run from outside the source tree, under this Python and under 3.10
(JetPack 6's Python).

The wheel is built with ``python -m build``; ``check-wheel-contents`` checks it (W009,
"several top-level packages", is the design: rmt_model, rmt_export and rmt_runtime ship in
one distribution). tests/installed/check_installed.py then runs inside the fresh venv.
"""
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from rmt_export.exporter import ExportOptions, export_bundle
from rmt_export.validate import ValidationPlan
from rmt_runtime import RMTRuntime

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"rmt_model": "rmt_model", "rmt_export": "export", "rmt_runtime": "runtime"}
CHECK = ROOT / "tests" / "installed" / "check_installed.py"
# What a deploying machine installs (README: pip install "rmt-edge[text]" onnxruntime): the wheel
# with its text extra (tokenizers), onnxruntime, plus pytest to run the checks.
TEXT_EXTRA = "[text]"
DEPLOY = ["onnxruntime", "pytest"]
SAMPLE = ROOT / "samples" / "keyrecall" / "model.pt"


def _python310() -> str | None:
    for candidate in (shutil.which("python3.10"), str(Path.home() / ".pyenv/versions/3.10.13/bin/python3.10")):
        if candidate and Path(candidate).exists():
            probe = subprocess.run([candidate, "-c", "import sys, venv; print(sys.version_info[:2])"],
                                   capture_output=True, text=True)
            if probe.returncode == 0 and probe.stdout.strip() == "(3, 10)":
                return candidate
    return None


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="session")
def dist(tmp_path_factory, shared_once):
    """(wheel, sdist) built from a copy of the source (the build writes build/ and egg-info)."""
    def build(out):
        source = tmp_path_factory.mktemp("source")
        ignore = shutil.ignore_patterns(".venv*", ".git", "__pycache__", "*.egg-info", "build", ".pytest_cache", "out")
        shutil.copytree(ROOT, source, dirs_exist_ok=True, ignore=ignore)
        _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, source)
    out = shared_once("dist", build)
    (wheel,), (sdist,) = out.glob("*.whl"), out.glob("*.tar.gz")
    return wheel, sdist


def _package_dirs() -> set[str]:
    """Every package of the source tree under its import name (rmt_runtime.backends, ...)."""
    found = set()
    for package, folder in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                found.add(".".join([package, *init.parent.relative_to(ROOT / folder).parts]))
    return found


def test_the_wheel_holds_every_package_and_nothing_else(dist):
    wheel, _ = dist
    _run(Path(sys.executable).with_name("check-wheel-contents"), "--ignore", "W009", wheel)
    names = zipfile.ZipFile(wheel).namelist()
    packages = {str(Path(n).parent).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert packages == _package_dirs()
    assert "rmt_runtime.backends" in packages
    top = {n.split("/")[0] for n in names}
    assert top == set(FOLDERS) | {wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for command in ("rmt-run", "rmt-generate", "rmt-build", "rmt-export", "rmt-bench", "rmt-check-trt"):
        assert f"{command} = " in entry_points


def test_the_sdist_holds_every_module_of_the_source(dist):
    _, sdist = dist
    with tarfile.open(sdist) as archive:
        members = {"/".join(Path(m).parts[1:]) for m in archive.getnames()}
    for folder in FOLDERS.values():
        for module in (ROOT / folder).rglob("*.py"):
            assert str(module.relative_to(ROOT)) in members


@pytest.fixture(scope="session")
def exported(shared_once):
    """The shipped sample exported (2 validation segments) and the reference the checks compare with."""
    from tests.installed.check_installed import make_reference

    def export(work):
        work.mkdir()
        bundle = export_bundle(SAMPLE, work / "bundle", ExportOptions(plan=ValidationPlan(segments=2))).path
        rng = np.random.default_rng(0)
        rt = RMTRuntime.load(bundle)
        reference = make_reference(rt, rng.integers(0, rt.bundle.vocab_size, 150), rng.integers(0, 256, 20), 12)
        np.savez(work / "reference.npz", **reference)
    work = shared_once("installed-check", export)
    return work / "bundle", work / "reference.npz"


@pytest.mark.slow
@pytest.mark.parametrize("python", ["current", "3.10"])
def test_the_installed_wheel_runs_the_runtime_without_torch(dist, exported, python, tmp_path):
    interpreter = sys.executable if python == "current" else _python310()
    if interpreter is None:
        pytest.skip("no Python 3.10 interpreter here (pyenv's 3.10.13 is on the project's machines)")
    wheel, _ = dist
    venv = tmp_path / "venv"
    _run(interpreter, "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run(*pip, f"{wheel}{TEXT_EXTRA}", *DEPLOY)
    listed = _run(venv / "bin" / "python", "-m", "pip", "list", "--format=freeze").stdout.lower()
    assert "torch" not in listed and "transformers" not in listed and "rmt-edge==0.1.0" in listed
    assert "tokenizers==" in listed  # the text extra
    outside = tmp_path / "outside"  # no source tree, no conftest, nothing of the repository
    outside.mkdir()
    shutil.copy(CHECK, outside / "test_installed.py")
    bundle, reference = exported
    result = subprocess.run([venv / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "test_installed.py"], cwd=outside, capture_output=True, text=True, timeout=900,
                            env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path),
                                 "RMT_CHECK_BUNDLE": str(bundle), "RMT_CHECK_REFERENCE": str(reference)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "10 passed" in result.stdout
