"""The package contracts of docs/ARCHITECTURE.md, checked on the real source with import-linter.

- rmt_runtime and rmt_model import nothing of each other; only rmt_export sees both;
- rmt_runtime never imports torch, onnx, onnxscript or transformers (not even lazily);
- no import cycles between the modules of a package;
- no module imports a private (``_name``) of another module.
A deliberately broken copy of the source must fail the same check, so the check is live.
"""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"rmt_model": "rmt_model", "rmt_export": "export", "rmt_runtime": "runtime"}
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(pythonpath) if pythonpath else ""}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / ".importlinter"), "--no-cache"],
                          cwd=pythonpath or ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    result = _lint()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.fixture
def source_copy(tmp_path):
    """The three packages under their import names, importable from ``tmp_path`` before the install."""
    for package, folder in PACKAGES.items():
        shutil.copytree(ROOT / folder, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@pytest.mark.parametrize("module, line, contract", [
    ("rmt_runtime/bad.py", "from rmt_model import load_checkpoint\n", "rmt_export sees both"),
    ("rmt_model/bad.py", "import rmt_runtime.bundle\n", "rmt_export sees both"),
    ("rmt_runtime/backends/bad.py", "def lazy():\n    import torch\n", "rmt_runtime never imports"),
    ("rmt_runtime/segments.py", "from .runtime import RMTRuntime\n", "no import cycles"),
])
def test_a_deliberate_violation_breaks_its_contract(source_copy, module, line, contract):
    path = source_copy / module
    path.write_text((path.read_text() if path.exists() else "") + line)
    result = _lint(source_copy)
    assert result.returncode == 1, result.stdout
    broken = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert any(row.startswith(contract) for row in broken), result.stdout


def _private_imports(folder: Path, package: str, root: Path = ROOT) -> list[str]:
    """``from <a module of ours> import _name`` anywhere in the package's source."""
    found = []
    for file in sorted(folder.rglob("*.py")):
        module_parts = [package, *file.relative_to(folder).with_suffix("").parts]
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:  # relative: from the module's package upwards (__init__ counts as a module)
                base = ".".join(module_parts[:len(module_parts) - node.level] + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            found += [f"{file.relative_to(root)}:{node.lineno} imports {alias.name} from {base}"
                      for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_module_imports_a_private_name_of_another():
    found = [hit for package, folder in PACKAGES.items() for hit in _private_imports(ROOT / folder, package)]
    assert found == []


def test_the_private_name_check_sees_one(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("from .b import _helper, public\n")
    (tmp_path / "sub" / "c.py").write_text("from ..b import __version__\nfrom rmt_model.x import _y\n")
    assert _private_imports(tmp_path, "rmt_runtime", tmp_path) == [
        "a.py:1 imports _helper from rmt_runtime.b", "sub/c.py:2 imports _y from rmt_model.x"]
