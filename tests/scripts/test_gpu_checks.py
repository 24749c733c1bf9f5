"""The GPU checks on a machine without a GPU: scripts/gpu_checks.sh fails and says what is
missing, before any test; scripts/gpu_preflight.py runs without torch and names CUDA errors
and the cuda-python pin; scripts/make_gpu_bundles.py writes bundles and PyTorch references that
ONNX Runtime's CPU provider reproduces without torch (which pins the reference files the GPU
tests compare with); tests/gpu collects and skips without torch, and fails under RMT_REQUIRE_GPU=1.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.gpu.conftest import TOLERANCE
from tests.without_modules import run_without

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
RUN_SCRIPT = ("import runpy, sys\npath = sys.argv[1]\nsys.argv = [path, *sys.argv[2:]]\n"
              "runpy.run_path(path, run_name='__main__')\n")
PYTEST = "import sys, pytest\nsys.exit(pytest.main(sys.argv[1:]))\n"


def clean_env(**extra) -> dict[str, str]:
    """This process's environment without the GPU checks' own variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RMT_GPU_BUNDLES", "RMT_REQUIRE_GPU", "OUT", "PYTHON")}
    return {**env, **extra}


def lines_of(output: str, part: str) -> list[str]:
    """The preflight's lines about ``part``: its status line and its hints."""
    found, inside = [], False
    for line in output.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("ok", "MISSING", "skipped"):
            inside = words[1] == part
        elif not line.startswith("  "):
            inside = False
        if inside:
            found.append(line)
    return found


@pytest.fixture(scope="session")
def gpu_bundles(shared_once):
    """scripts/make_gpu_bundles.py's tiny output, made once per test run (about 30 s)."""
    def make(path: Path) -> None:
        done = subprocess.run([sys.executable, str(SCRIPTS / "make_gpu_bundles.py"), "--out", str(path)],
                              capture_output=True, text=True, timeout=900, env=clean_env())
        assert done.returncode == 0, done.stdout + done.stderr
    return shared_once("gpu-bundles", make)


def test_gpu_checks_fail_here_before_any_test_and_say_what_is_missing(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine: scripts/gpu_checks.sh runs the real checks here")
    report = tmp_path / "report"
    done = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh")], capture_output=True, text=True, timeout=600,
                          env=clean_env(OUT=str(report), PYTHON=sys.executable))
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert lines_of(output, "tensorrt")[0].split()[0] == "MISSING", output
    assert "No module named 'tensorrt'" in lines_of(output, "tensorrt")[0]
    assert lines_of(output, "cuda-python")[0].split()[0] == "MISSING", output
    onnxruntime = lines_of(output, "onnxruntime")[0]
    assert onnxruntime.split()[0] == "MISSING" and "missing CUDAExecutionProvider" in onnxruntime, output
    assert "no GPU test was run" in output
    assert "test session starts" not in output  # pytest never ran: the preflight stopped the script
    assert not (report / "gpu-junit.xml").exists() and not (report / "gpu-pytest.log").exists()
    environment = (report / "environment.txt").read_text()
    assert "preflight: FAILED" in environment and environment.rstrip().endswith("exit status: 1")


def test_gpu_checks_refuse_an_unknown_argument(tmp_path):
    done = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh"), "--bundle", "x"], capture_output=True, text=True,
                          timeout=60, env=clean_env(OUT=str(tmp_path / "report")))
    assert done.returncode == 2 and "unknown argument: --bundle" in done.stderr
    assert not (tmp_path / "report").exists()


def test_the_preflight_runs_without_torch_and_says_the_bundles_are_needed():
    done = run_without(("torch",), RUN_SCRIPT, [SCRIPTS / "gpu_preflight.py"], env=clean_env(), cwd=ROOT)
    output = done.stdout
    assert done.returncode == 1, output + done.stderr
    for part in ("driver", "cuda-python", "tensorrt", "onnxruntime", "bundles", "torch"):
        assert lines_of(output, part), f"no line about {part}:\n{output}"
    torch_line = lines_of(output, "torch")[0]
    assert torch_line.split()[0] == "skipped" and "PyTorch peers of the benchmark are skipped" in torch_line
    bundles = "\n".join(lines_of(output, "bundles"))
    assert bundles.split()[0] == "MISSING" and "no torch to make them" in bundles
    assert "make_gpu_bundles.py --out gpu-bundles" in bundles and "gpu_checks.sh --bundles gpu-bundles" in bundles
    missing = re.search(r"missing \(([^)]*)\)", output.splitlines()[-1]).group(1).split(", ")
    assert "bundles" in missing and "torch" not in missing  # torch is optional: its absence is no failure


FAKE_CUDART = """\
SUCCESS, DEVICES, DRIVER, RUNTIME = {values}
NAMES = {{35: b"cudaErrorInsufficientDriver", 100: b"cudaErrorNoDevice"}}

def cudaDriverGetVersion():
    return 0, DRIVER

def cudaRuntimeGetVersion():
    return 0, RUNTIME

def cudaGetDeviceCount():
    return (0, DEVICES) if SUCCESS == 0 else (SUCCESS, 0)

def cudaGetErrorName(error):   # errors are plain ints here: the name can only come from this call
    return 0, NAMES[int(error)]
"""


def fake_gpu_stack(root: Path, bindings: str, driver_cuda: int, runtime_cuda: int, device_error: int) -> dict:
    """cuda-python (cuda.bindings.runtime + its distribution's version), tensorrt 10.3, an
    onnxruntime that lists the GPU providers and an nvidia-smi: an environment for the preflight."""
    runtime = root / "cuda" / "bindings"
    runtime.mkdir(parents=True)
    (root / "cuda" / "__init__.py").write_text("")
    (runtime / "__init__.py").write_text("")
    (runtime / "runtime.py").write_text(FAKE_CUDART.format(values=(device_error, 1, driver_cuda, runtime_cuda)))
    info = root / f"cuda_bindings-{bindings}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: cuda-bindings\nVersion: {bindings}\n")
    (root / "tensorrt").mkdir()
    (root / "tensorrt" / "__init__.py").write_text("__version__ = '10.3.0.30'\n")
    (root / "onnxruntime").mkdir()
    (root / "onnxruntime" / "__init__.py").write_text(
        "__version__ = '1.22.0'\ndef get_available_providers():\n"
        "    return ['TensorrtExecutionProvider', 'CUDAExecutionProvider', 'CPUExecutionProvider']\n")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 9.0, 570.86.15, 143771 MiB'\n")
    smi.chmod(0o755)
    return clean_env(PYTHONPATH=os.pathsep.join([str(root), str(ROOT)]),
                     PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_the_preflight_passes_where_every_part_is_here(tmp_path, gpu_bundles):
    env = fake_gpu_stack(tmp_path, bindings="12.9.0", driver_cuda=12080, runtime_cuda=12090, device_error=0)
    done = run_without(("torch",), RUN_SCRIPT, [SCRIPTS / "gpu_preflight.py", "--bundles", gpu_bundles], env=env,
                       cwd=ROOT)
    output = done.stdout
    assert done.returncode == 0, output + done.stderr
    assert output.splitlines()[-1] == "preflight: ok: everything the GPU checks need is here"
    assert lines_of(output, "cuda-python")[0].split()[0] == "ok"
    assert "cuda-python 12.9.0 (cuda.bindings.runtime), driver supports CUDA 12.8 (12080)" in output
    assert "NVIDIA H200, sm 9.0, driver 570.86.15" in lines_of(output, "driver")[0]
    assert "TensorRT 10.3.0.30 (before 10.8 CumSum imports as a loop" in lines_of(output, "tensorrt")[0]
    assert (f"{gpu_bundles}: tiny, fp16 + fp32, 128 chained segments, batch 2; tiny-armt, fp16 + fp32, 128 chained "
            "segments") in lines_of(output, "bundles")[0]
    assert lines_of(output, "torch")[0].split()[0] == "skipped"


def test_the_preflight_names_the_cuda_error_and_the_cuda_python_pin_on_a_cuda12_driver(tmp_path, gpu_bundles):
    """cuda-bindings 13.x on a CUDA 12 driver (JetPack 6): cudaErrorInsufficientDriver, by name, and
    the fix: cuda-python<13."""
    env = fake_gpu_stack(tmp_path, bindings="13.0.1", driver_cuda=12060, runtime_cuda=13000, device_error=35)
    done = run_without(("torch",), RUN_SCRIPT, [SCRIPTS / "gpu_preflight.py", "--bundles", gpu_bundles], env=env,
                       cwd=ROOT)
    cuda = "\n".join(lines_of(done.stdout, "cuda-python"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert cuda.split()[0] == "MISSING"
    assert "driver supports CUDA 12.6 (12060)" in cuda and "cudaGetDeviceCount: cudaErrorInsufficientDriver" in cuda
    assert "needs a driver >= 580 (CUDA 13)" in cuda and "install cuda-python<13" in cuda
    assert "'cuda-python>=12.6,<13'" in cuda
    assert "(cuda-python)" in done.stdout.splitlines()[-1]  # the one missing part


def test_make_gpu_bundles_writes_what_the_gpu_tests_read(gpu_bundles):
    index = json.loads((gpu_bundles / "index.json").read_text())
    assert (index["model"], index["segments"], index["batch"], index["segment_size"]) == ("tiny", 128, 2, 16)
    assert sorted(index["bundles"]) == ["fp16", "fp32"]
    for precision, entry in index["bundles"].items():
        manifest = json.loads((gpu_bundles / entry["bundle"] / "manifest.json").read_text())
        assert manifest["precision"] == precision
        with np.load(gpu_bundles / entry["reference"]) as stored:
            assert stored["chained_ids"].shape == (2, 128 * 16)
            assert stored["chained_memory"].shape == (2, 4, 32)
            assert stored["chained_last_logits"].shape == (2, 97)
            assert stored["short_ids"].shape == (1, 4 * 16)
    armt = index["armt"]
    assert (armt["model"], armt["segments"], armt["batch"], armt["segment_size"]) == ("tiny-armt", 128, 2, 16)
    assert armt["state"] == ["W_mem.0", "z.0", "W_mem.1", "z.1"] and sorted(armt["bundles"]) == ["fp16", "fp32"]
    for precision, entry in armt["bundles"].items():
        manifest = json.loads((gpu_bundles / entry["bundle"] / "manifest.json").read_text())
        assert (manifest["precision"], manifest["architecture"]) == (precision, "armt")
        assert sorted(manifest["graphs"]) == ["ingest", "step"]  # segment graphs only, as the RMT's
        with np.load(gpu_bundles / entry["reference"]) as stored:
            assert stored["chained_ids"].shape == (2, 128 * 16) and stored["chained_last_logits"].shape == (2, 97)
            assert stored["chained_state.W_mem.1"].shape == (2, 2, 24, 16)
            assert stored["chained_state.z.0"].shape == (2, 2, 24)
            assert "chained_memory" not in stored.files and stored["short_state.z.1"].shape == (1, 2, 24)


def test_the_preflight_says_what_an_older_directory_without_armt_bundles_lacks(tmp_path, gpu_bundles):
    older = tmp_path / "older"
    shutil.copytree(gpu_bundles, older)
    index = json.loads((older / "index.json").read_text())
    del index["armt"]
    (older / "index.json").write_text(json.dumps(index))
    env = fake_gpu_stack(tmp_path / "stack", bindings="12.9.0", driver_cuda=12080, runtime_cuda=12090,
                         device_error=0)
    done = run_without(("torch",), RUN_SCRIPT, [SCRIPTS / "gpu_preflight.py", "--bundles", older], env=env,
                       cwd=ROOT)
    bundles = "\n".join(lines_of(done.stdout, "bundles"))
    assert done.returncode == 1, done.stdout + done.stderr
    assert bundles.split()[0] == "MISSING" and "no ARMT fp32 bundle; no ARMT fp16 bundle" in bundles


def test_the_references_are_the_pytorch_models_outputs(gpu_bundles):
    """The stored outputs are the seeded tiny model's own (its full forward, not just the
    script's segment loop): what the GPU tests compared with when they ran PyTorch themselves."""
    import torch

    from rmt_model import build_model
    from rmt_model.tiny import tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config("gpt2", num_mem_tokens=4, segment_size=16)).eval()
    with np.load(gpu_bundles / "tiny-fp32.npz") as stored:
        with torch.no_grad():
            out = model(torch.from_numpy(stored["chained_ids"]))
        np.testing.assert_allclose(stored["chained_memory"], out.memory.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(stored["chained_last_logits"], out.logits[:, -1].numpy(), rtol=0, atol=1e-5)
    rng_ids = np.random.default_rng(0).integers(0, 97, (2, 128 * 16), dtype=np.int64)
    with np.load(gpu_bundles / "tiny-fp16.npz") as stored:
        np.testing.assert_array_equal(stored["chained_ids"], rng_ids)
    # The ARMT's: the suite's own tiny ARMT (tests/conftest.py armt_bundle_factory's), its forward.
    from tests.rmt_model.test_armt import NEWER, make_armt

    armt = make_armt("gpt2", w_mv_std=0.05, **NEWER).eval()
    with np.load(gpu_bundles / "tiny-armt-fp32.npz") as stored:
        np.testing.assert_array_equal(stored["chained_ids"], rng_ids)
        with torch.no_grad():
            out = armt(torch.from_numpy(stored["chained_ids"]))
        for name, value in out.state.items():
            np.testing.assert_allclose(stored[f"chained_state.{name}"], value.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(stored["chained_last_logits"], out.logits[:, -1].numpy(), rtol=0, atol=1e-5)


ORT_CPU_CHECK = """\
import json, sys
from rmt_runtime import RMTRuntime
from tests.gpu.conftest import load_reference_bundle
errors = {}
for architecture in ("rmt", "armt"):
    for precision in ("fp32", "fp16"):
        reference = load_reference_bundle(sys.argv[1], precision, architecture)
        runtime = RMTRuntime.load(reference.path, provider="cpu")
        errors[f"{architecture} {precision}"] = {name: reference.errors(runtime.run(reference.arrays[name + "_ids"]), name)
                                                 for name in ("chained", "short")}
print(json.dumps({"errors": errors, "torch_loaded": "torch" in sys.modules}))
"""


def test_onnxruntime_cpu_without_torch_reproduces_the_stored_references(gpu_bundles, record_property):
    """The GPU tests' own loading and comparison (tests/gpu/conftest.py), on ONNX Runtime's CPU
    provider, torch unimportable: the stored references hold within the GPU tests' tolerances
    over all 128 chained segments, for the RMT's bundles and the ARMT's (its named state)."""
    done = run_without(("torch",), ORT_CPU_CHECK, [gpu_bundles], env=clean_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["torch_loaded"] is False
    assert sorted(result["errors"]) == ["armt fp16", "armt fp32", "rmt fp16", "rmt fp32"]
    for variant, by_input in result["errors"].items():
        precision = variant.split()[1]
        for name, errors in by_input.items():
            for output, error in errors.items():
                record_property(f"{variant.replace(' ', '_')}_{name}_{output}_max_abs", error)
            assert max(errors.values()) < TOLERANCE[precision], (variant, name, errors)
    assert result["errors"]["rmt fp16"]["chained"]["memory"] > 0  # fp16 really ran in fp16: a comparison, not a copy
    assert sorted(result["errors"]["armt fp32"]["chained"]) == ["last_logits", "state"]
    assert result["errors"]["armt fp16"]["chained"]["state"] > 0


def test_gpu_tests_import_no_torch_and_skip_or_fail_with_the_reason():
    """pytest tests/gpu with torch unimportable (the suite's tests/conftest.py imports torch only in
    the fixtures that use it): every test is collected and skips here; under RMT_REQUIRE_GPU=1 each
    of those skips is an error (the needs_* fixtures fail in setup) that says why."""
    arguments = ["tests/gpu", "-p", "no:cacheprovider", "-q", "-rs"]
    skipped = run_without(("torch",), PYTEST, arguments, env=clean_env(), cwd=ROOT)
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    count = re.fullmatch(r"(\d+) skipped in .*", skipped.stdout.strip().splitlines()[-1])
    assert count and int(count.group(1)) >= 9, skipped.stdout  # every test collected, none passed or errored
    required = run_without(("torch",), PYTEST, arguments, env=clean_env(RMT_REQUIRE_GPU="1"), cwd=ROOT)
    assert required.returncode == 1, required.stdout
    assert re.fullmatch(rf"{count.group(1)} errors in .*", required.stdout.strip().splitlines()[-1]), required.stdout
    assert required.stdout.count("RMT_REQUIRE_GPU=1 but") >= int(count.group(1))


def test_without_bundles_or_torch_the_gpu_tests_say_how_to_get_them():
    code = ("from tests.gpu.conftest import bundle_directory\n"
            "directory, reason = bundle_directory(None)\nprint(directory)\nprint(reason)\n")
    done = run_without(("torch",), code, [], env=clean_env(), cwd=ROOT)
    directory, reason = done.stdout.splitlines()[:2]
    assert directory == "None", done.stdout + done.stderr
    assert "RMT_GPU_BUNDLES is not set and torch is not installed" in reason
    assert "scripts/make_gpu_bundles.py --out DIR" in reason and "gpu_checks.sh --bundles DIR" in reason


def test_make_gpu_bundles_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    done = subprocess.run([sys.executable, str(SCRIPTS / "make_gpu_bundles.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=clean_env())
    assert done.returncode != 0 and "is not empty and holds no index.json" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
