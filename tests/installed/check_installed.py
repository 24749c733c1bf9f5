"""Checks run INSIDE a clean environment holding only the built wheel with its text extra
(numpy, click, pydantic, tokenizers), onnxruntime and pytest: what a deploying machine (a Jetson, an
application server) has after ``pip install "rmt-edge[text]" onnxruntime``.

Not collected by the main suite (the name does not start with ``test_``):
tests/packaging/test_wheel.py copies this file out of the source tree and runs it with the
clean environment's pytest, and scripts/check_aarch64.sh runs it on arm64 under qemu.
Everything it needs comes from two environment variables:

    RMT_CHECK_BUNDLE     a bundle of the byte-level keyrecall sample, exported by the development
                         environment (which ships the sample's tokenizer.json)
    RMT_CHECK_REFERENCE  an .npz of what that environment computed (make_reference below)

Deliberately torch-free and outside the source tree: a module missing from the wheel, or
an import of torch, fails here and nowhere else.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BUNDLE = Path(os.environ.get("RMT_CHECK_BUNDLE", "missing"))
REFERENCE = Path(os.environ.get("RMT_CHECK_REFERENCE", "missing"))
# Across ONNX Runtime builds and CPUs (x86 vs aarch64 kernels) fp32 results differ by rounding only.
ACROSS_BUILDS = 1e-5
HEAVY = ("torch", "onnx", "transformers", "onnxscript")


def make_reference(runtime, ids: np.ndarray, generate_ids: np.ndarray, new_tokens: int) -> dict[str, np.ndarray]:
    """What the checks compare with, computed by ``runtime`` (an RMTRuntime) where it was exported."""
    from rmt_runtime import GenerationConfig

    out = runtime.run(ids[None])
    generated = runtime.generate(generate_ids, GenerationConfig(max_new_tokens=new_tokens)).tokens[0]
    return {"ids": ids, "memory": out.memory, "last_logits": out.last_logits, "generate_ids": generate_ids,
            "generated": np.asarray(generated, np.int64)}


@pytest.fixture(scope="module")
def reference():
    if not BUNDLE.is_dir() or not REFERENCE.is_file():
        pytest.fail(f"set RMT_CHECK_BUNDLE and RMT_CHECK_REFERENCE (got {BUNDLE}, {REFERENCE})")
    with np.load(REFERENCE) as data:
        return {name: data[name] for name in data.files}


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=600, **kwargs)


def test_the_installed_package_is_not_the_source_tree():
    import rmt_runtime

    location = Path(rmt_runtime.__file__).resolve()
    assert "site-packages" in location.parts, location
    assert not (location.parent.parent / "setup.py").exists()


def test_every_runtime_module_imports_without_torch():
    import rmt_runtime

    names = [m.name for m in pkgutil.walk_packages(rmt_runtime.__path__, "rmt_runtime.")]
    assert "rmt_runtime.backends.onnxruntime" in names and "rmt_runtime.segments" in names
    for name in names:
        importlib.import_module(name)
    assert [m for m in HEAVY if m in sys.modules] == []


@pytest.mark.parametrize("command", ["rmt-run", "rmt-generate", "rmt-build"])
def test_each_runtime_command_starts_without_torch(command):
    script = _bin(command)
    code = (f"import runpy, sys\nsys.argv = [{script!r}, '--help']\n"
            f"try:\n    runpy.run_path({script!r}, run_name='__main__')\nexcept SystemExit as stop:\n    status = stop.code\n"
            f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])\nsys.exit(status)\n")
    result = _run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout and "HEAVY []" in result.stdout


def test_rmt_run_gives_the_exporting_machines_numbers(reference, tmp_path):
    np.save(tmp_path / "ids.npy", reference["ids"])
    result = _run(_bin("rmt-run"), "--bundle", str(BUNDLE), "--ids", str(tmp_path / "ids.npy"), "--json",
                  "--save-outputs", str(tmp_path / "out.npz"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["backend"].startswith("onnxruntime/CPUExecutionProvider")
    assert report["tokens"] == len(reference["ids"])
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["memory"], reference["memory"], rtol=0, atol=ACROSS_BUILDS)
        np.testing.assert_allclose(out["last_logits"], reference["last_logits"], rtol=0, atol=ACROSS_BUILDS)


def test_state_resumed_across_invocations_equals_one_run(reference, tmp_path):
    ids = reference["ids"]
    state = tmp_path / "seq.npz"
    for part, chunk in enumerate(np.array_split(ids, 3)):
        np.save(tmp_path / f"part{part}.npy", chunk)
        result = _run(_bin("rmt-run"), "--bundle", str(BUNDLE), "--ids", str(tmp_path / f"part{part}.npy"),
                      "--state", str(state), "--json", "--save-outputs", str(tmp_path / "out.npz"))
        assert result.returncode == 0, result.stderr
    from rmt_runtime import RMTRuntime

    rt = RMTRuntime.load(BUNDLE)
    whole = rt.new_state()
    rt.feed(whole, ids)
    expected = rt.peek(whole)
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_array_equal(out["memory"], expected.memory)
        np.testing.assert_array_equal(out["last_logits"], expected.last_logits)


def test_rmt_generate_gives_the_exporting_machines_tokens(reference, tmp_path):
    np.save(tmp_path / "prompt.npy", reference["generate_ids"])
    result = _run(_bin("rmt-generate"), "--bundle", str(BUNDLE), "--prompt-ids", str(tmp_path / "prompt.npy"),
                  "--max-new-tokens", str(len(reference["generated"])), "--no-stop", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tokens"] == reference["generated"].tolist()


def test_text_reads_through_the_shipped_tokenizer_as_its_ids_do(tmp_path):
    """The text extra at work: the byte-level tokenizer.json the bundle ships, read by the
    installed tokenizers library, gives what the same bytes as ids give."""
    assert "tokenizer.json" in json.loads((BUNDLE / "manifest.json").read_text())["tokenizer"]
    text = "key=C;" + "the memory carries it " * 4 + "?key="
    (tmp_path / "doc.txt").write_text(text)
    np.save(tmp_path / "ids.npy", np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64))
    runs = {}
    for name, given in (("text", ["--text-file", str(tmp_path / "doc.txt")]),
                        ("ids", ["--ids", str(tmp_path / "ids.npy")])):
        result = _run(_bin("rmt-run"), "--bundle", str(BUNDLE), *given, "--json")
        assert result.returncode == 0, result.stderr
        runs[name] = json.loads(result.stdout)
    assert runs["text"]["tokens"] == len(text) and runs["text"]["top_k"] == runs["ids"]["top_k"]
    assert all(isinstance(entry["text"], str) for entry in runs["text"]["top_k"])  # decoded by the tokenizer
    generated = _run(_bin("rmt-generate"), "--bundle", str(BUNDLE), "--prompt", text, "--max-new-tokens", "3",
                     "--no-stop", "--json")
    assert generated.returncode == 0, generated.stderr
    reply = json.loads(generated.stdout)
    assert reply["prompt_tokens"] == len(text) and len(reply["tokens"]) == 3 and isinstance(reply["text"], str)


def test_rmt_build_without_tensorrt_is_one_clear_line():
    result = _run(_bin("rmt-build"), "--bundle", str(BUNDLE))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: the tensorrt module is not importable here")
    assert "Traceback" not in result.stderr
