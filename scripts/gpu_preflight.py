"""Before the GPU checks: is everything they need here? One line per part, each with what was
found or why it is missing, and a hint where one helps. Torch-free: runs on a Jetson as is.

    python3 scripts/gpu_preflight.py [--bundles DIR]

Parts: the NVIDIA driver (nvidia-smi), cuda-python (either module layout: its version, the
CUDA version the driver supports, the GPUs it sees, each CUDA error by name), TensorRT, ONNX
Runtime's CUDA and TensorRT providers, the test bundles (--bundles DIR, made by
scripts/make_gpu_bundles.py), and torch, which is optional: absent (a Jetson), the PyTorch
peers of the benchmark are skipped and the bundles must be given; present, it must see CUDA.
Exits 1 when a required part is missing, so that scripts/gpu_checks.sh stops before any test:
a GPU run that tested nothing cannot pass.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# cuda-bindings 13.x link the CUDA 13 runtime: a CUDA 12 driver refuses them with
# cudaErrorInsufficientDriver. The driver branch that brings CUDA 13 is 580.
CUDA13_DRIVER_BRANCH = 580
CU12_PIN = "cuda-python>=12.6,<13"
CU13_PIN = "cuda-python>=13,<14"
PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
PRECISIONS = ("fp32", "fp16")
TEGRA_RELEASE = Path("/etc/nv_tegra_release")


@dataclass
class Part:
    name: str
    status: str                   # "ok", "MISSING" (required, absent) or "skipped" (optional, absent)
    detail: str
    hints: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)   # what later checks read: versions, driver


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def _cuda_version(number: int) -> str:
    return f"{number // 1000}.{number % 1000 // 10}"


def jetson_release() -> str | None:
    """'R36 (release), REVISION: 4.3' from /etc/nv_tegra_release on a Jetson, else None."""
    try:
        return _first_line(TEGRA_RELEASE.read_text()).lstrip("# ").split(", GCID")[0]
    except OSError:
        return None


def check_driver() -> Part:
    smi = shutil.which("nvidia-smi")
    jetson = jetson_release()
    why = "nvidia-smi is not on PATH"
    if smi:
        try:
            done = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version,memory.total",
                                   "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
            rows = [row for row in done.stdout.strip().splitlines() if row.strip()]
            if done.returncode == 0 and rows:
                fields = [f.strip() for f in rows[0].split(",")]
                driver = fields[2] if len(fields) > 2 else "?"
                more = f" (+{len(rows) - 1} more)" if len(rows) > 1 else ""
                return Part("driver", "ok", f"{fields[0]}, sm {fields[1] if len(fields) > 1 else '?'}, driver {driver}, "
                                            f"{fields[3] if len(fields) > 3 else '?'}{more}",
                            facts={"driver_major": _major(driver)})
            why = f"nvidia-smi failed (exit {done.returncode}): {_first_line(done.stderr or done.stdout) or 'no GPU listed'}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = f"nvidia-smi did not answer: {exc}"
    if jetson:  # Jetson's driver is part of L4T; older releases' nvidia-smi answers no queries
        return Part("driver", "ok", f"Jetson, L4T {jetson} ({why}: the driver is checked through CUDA below)")
    return Part("driver", "MISSING", f"no NVIDIA driver found: {why}",
                ["install the NVIDIA driver (a GPU machine) or flash JetPack (a Jetson)"])


def cudart_module():
    """cuda-python's runtime API in either layout and the layout's name, or (None, None)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        return cudart, "cuda.bindings.runtime"
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
            return cudart, "cuda.cudart"
        except ImportError:
            return None, None


def error_name(cudart, error) -> str:
    """A CUDA error's name (cudaErrorInsufficientDriver), through cudaGetErrorName where it answers."""
    try:
        named = cudart.cudaGetErrorName(error)
        name = named[-1] if isinstance(named, tuple) else named
        name = name.decode() if isinstance(name, bytes) else str(name)
        if name:
            return name
    except Exception:  # noqa: BLE001 - fall back to the enum's own name
        pass
    return getattr(error, "name", None) or f"CUDA error {int(error)}"


def _call(cudart, function: str):
    """(error name or None, value or None, exception text or None) of a cudaXxx() -> (error, value) call."""
    try:
        error, value = getattr(cudart, function)()
    except Exception as exc:  # noqa: BLE001 - a failing binding is reported, not raised
        return None, None, f"{type(exc).__name__}: {_first_line(exc)}"
    if int(error) != 0:
        return error_name(cudart, error), None, None
    return None, value, None


def mismatch_hint(bindings_version: str | None, driver_cuda: int | None, driver_major: int | None) -> str | None:
    """The cuda-python/driver mismatch, said plainly: cuda-bindings 13.x need a CUDA 13 driver (>= 580)."""
    if (_major(bindings_version) or 0) < 13:
        return None
    if (driver_cuda and driver_cuda < 13000) or (driver_major and driver_major < CUDA13_DRIVER_BRANCH):
        supports = f"CUDA {_cuda_version(driver_cuda)}" if driver_cuda else f"driver {driver_major}"
        return (f"cuda-python {bindings_version} (cuda-bindings 13.x) needs a driver >= {CUDA13_DRIVER_BRANCH} "
                f"(CUDA 13); this driver supports {supports}. On CUDA 12 drivers (JetPack 6) install "
                f"cuda-python<13: pip install '{CU12_PIN}' (the rmt-edge[trt] extra)")
    return None


def check_cuda_python(driver_major: int | None) -> Part:
    cudart, layout = cudart_module()
    if cudart is None:
        return Part("cuda-python", "MISSING", "not installed (neither cuda.bindings.runtime nor cuda.cudart imports)",
                    [f"CUDA 12 drivers (JetPack 6, drivers < {CUDA13_DRIVER_BRANCH}): pip install '{CU12_PIN}'; "
                     f"CUDA 13 drivers (JetPack 7, >= {CUDA13_DRIVER_BRANCH}): pip install '{CU13_PIN}'"])
    version = _version("cuda-bindings", "cuda-python") or "?"
    bindings = _version("cuda-bindings") or version
    problems, hints = [], []
    driver_error, driver_cuda, driver_exc = _call(cudart, "cudaDriverGetVersion")
    runtime_error, runtime_cuda, runtime_exc = _call(cudart, "cudaRuntimeGetVersion")
    count_error, count, count_exc = _call(cudart, "cudaGetDeviceCount")
    seen = [f"cuda-python {version} ({layout})"]
    if driver_cuda:
        seen.append(f"driver supports CUDA {_cuda_version(driver_cuda)} ({driver_cuda})")
    elif driver_cuda == 0:
        problems.append("cudaDriverGetVersion: 0 (no CUDA driver is loaded)")
    else:
        problems.append(f"cudaDriverGetVersion: {driver_error or driver_exc}")
    if runtime_cuda:
        seen.append(f"runtime CUDA {_cuda_version(runtime_cuda)}")
    if count_error or count_exc:
        problems.append(f"cudaGetDeviceCount: {count_error or count_exc}")
    elif not count:
        problems.append("cudaGetDeviceCount: 0 devices")
    else:
        seen.append(f"{count} device{'s' if count > 1 else ''}")
    hint = mismatch_hint(bindings, driver_cuda, driver_major)
    if hint:
        hints.append(hint)
    elif runtime_cuda and driver_cuda and runtime_cuda > driver_cuda:
        hints.append(f"the CUDA runtime cuda-python links ({_cuda_version(runtime_cuda)}) is newer than the driver "
                     f"supports ({_cuda_version(driver_cuda)}): install the cuda-python of the driver's CUDA "
                     f"major, or a newer driver")
    if problems:
        return Part("cuda-python", "MISSING", "; ".join(seen + problems), hints)
    return Part("cuda-python", "ok", ", ".join(seen), hints)


def check_tensorrt() -> Part:
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001 - ImportError, or a library it loads is missing
        return Part("tensorrt", "MISSING", f"TensorRT is not importable: {type(exc).__name__}: {_first_line(exc)}",
                    ["Jetson: JetPack ships it (sudo apt install python3-libnvinfer; a venv made with "
                     "--system-site-packages sees it); x86: pip install 'rmt-edge[trt]' (CUDA 12 driver) or "
                     "'rmt-edge[trt-cu13]' (CUDA 13 driver)"])
    version = str(getattr(trt, "__version__", "?"))
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return Part("tensorrt", "MISSING", f"TensorRT reports the version {version!r}, which is not one it has")
    if major < 10:
        return Part("tensorrt", "MISSING", f"TensorRT {version}: rmt-edge needs TensorRT 10 or newer "
                                           "(name-based I/O, execute_async_v3)", ["JetPack 6 or newer"])
    notes = []
    if (major, minor) < (10, 8):
        notes.append("before 10.8 CumSum imports as a loop: graphs with one cannot be captured as CUDA graphs and "
                     "run plainly (the CUDA-graph test records which)")
    if major >= 11:
        notes.append("no fp16 builder flag (strongly typed networks only): use fp16 bundles")
    return Part("tensorrt", "ok", f"TensorRT {version}" + (f" ({'; '.join(notes)})" if notes else ""),
                facts={"version": version})


def check_onnxruntime() -> Part:
    try:
        import onnxruntime as ort
    except Exception as exc:  # noqa: BLE001
        return Part("onnxruntime", "MISSING", f"not importable: {type(exc).__name__}: {_first_line(exc)}",
                    ["pip install onnxruntime-gpu (never together with onnxruntime)"])
    providers = list(ort.get_available_providers())
    missing = [p for p in PROVIDERS if p not in providers]
    detail = f"onnxruntime {ort.__version__}, providers {', '.join(providers)}"
    if missing:
        return Part("onnxruntime", "MISSING", f"{detail}; missing {', '.join(missing)}",
                    ["install onnxruntime-gpu in place of onnxruntime (the two provide one module: never both); "
                     "on a Jetson the wheel built for its JetPack (the Jetson AI Lab index)"])
    return Part("onnxruntime", "ok", detail)


def check_torch() -> Part:
    if importlib.util.find_spec("torch") is None:
        return Part("torch", "skipped", "not installed (optional: a Jetson has none): the PyTorch peers of the "
                                        "benchmark are skipped, and the GPU tests need pre-exported bundles "
                                        "(--bundles DIR)", facts={"present": False})
    try:
        import torch
        available = torch.cuda.is_available()
    except Exception as exc:  # noqa: BLE001
        return Part("torch", "MISSING", f"installed but not importable: {type(exc).__name__}: {_first_line(exc)}",
                    ["repair or uninstall torch here (it is optional)"], facts={"present": True})
    if not available:
        return Part("torch", "MISSING", f"torch {torch.__version__} is installed but sees no CUDA GPU "
                                        f"(torch.version.cuda={torch.version.cuda})",
                    ["install a CUDA build of torch, or uninstall it here (it is optional: the GPU tests then read "
                     "--bundles DIR)"], facts={"present": True})
    return Part("torch", "ok", f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                               f"{torch.cuda.get_device_name(0)}", facts={"present": True})


def read_bundles(directory: Path) -> tuple[dict | None, list[str]]:
    """The index of a make_gpu_bundles.py directory and every problem with it (hashes verified)."""
    index_file = directory / "index.json"
    if not index_file.is_file():
        return None, [f"{directory} has no index.json (not made by scripts/make_gpu_bundles.py)"]
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, [f"{index_file} is unreadable: {exc}"]
    problems = []
    # The RMT's bundles, and the tiny ARMT's (index "armt", which an older script did not write).
    kinds = {"": index.get("bundles", {}), "ARMT ": dict(index.get("armt") or {}).get("bundles", {})}
    for what, entries in kinds.items():
        for precision in PRECISIONS:
            if precision not in entries:
                problems.append(f"no {what}{precision} bundle")
    try:
        from rmt_runtime import Bundle, BundleError
    except ImportError as exc:
        return index, problems + [f"rmt_runtime is not importable ({exc}): install the project here"]
    for what, entries in kinds.items():
        for precision, entry in sorted(entries.items()):
            if not (directory / entry.get("reference", "?")).is_file():
                problems.append(f"{what}{precision}: reference {entry.get('reference')} is missing")
            try:
                Bundle.load(directory / entry.get("bundle", "?"))
            except (BundleError, OSError) as exc:
                problems.append(f"{what}{precision}: {_first_line(exc)}")
    return index, problems


def check_bundles(directory: Path | None, torch_present: bool) -> Part:
    if directory is None:
        if torch_present:
            return Part("bundles", "ok", "none given: scripts/gpu_checks.sh makes them first with torch "
                                         "(scripts/make_gpu_bundles.py)")
        return Part("bundles", "MISSING", "no --bundles DIR given and no torch to make them",
                    ["on a machine with torch: python scripts/make_gpu_bundles.py --out gpu-bundles; copy "
                     "gpu-bundles here; run scripts/gpu_checks.sh --bundles gpu-bundles"])
    if not directory.is_dir():
        return Part("bundles", "MISSING", f"{directory} is not a directory",
                    ["make it with python scripts/make_gpu_bundles.py --out DIR where torch is, and copy it here"])
    index, problems = read_bundles(directory)
    if problems:
        return Part("bundles", "MISSING", f"{directory}: " + "; ".join(problems),
                    ["remake it with python scripts/make_gpu_bundles.py --out DIR where torch is"])
    armt = index["armt"]
    return Part("bundles", "ok", f"{directory}: {index.get('model')}, {' + '.join(sorted(index['bundles']))}, "
                                 f"{index.get('segments')} chained segments, batch {index.get('batch')}; "
                                 f"{armt.get('model')}, {' + '.join(sorted(armt['bundles']))}, "
                                 f"{armt.get('segments')} chained segments")


def run(bundles: Path | None) -> list[Part]:
    driver = check_driver()
    parts = [driver, check_cuda_python(driver.facts.get("driver_major")), check_tensorrt(), check_onnxruntime()]
    torch_part = check_torch()
    parts += [check_bundles(bundles, torch_part.facts.get("present", False)), torch_part]
    return parts


def report(parts: list[Part]) -> int:
    jetson = jetson_release()
    print(f"GPU preflight: python {platform.python_version()} on {platform.system()} {platform.machine()}"
          + (f", Jetson L4T {jetson}" if jetson else ""))
    width = max(len(p.name) for p in parts)
    for part in parts:
        print(f"  {part.status:<8} {part.name:<{width}}  {part.detail}")
        for hint in part.hints:
            print(f"  {'':<8} {'':<{width}}  -> {hint}")
    missing = [p.name for p in parts if p.status == "MISSING"]
    if missing:
        print(f"preflight: FAILED: {len(missing)} required part{'s' if len(missing) > 1 else ''} missing "
              f"({', '.join(missing)}): no GPU test runs until they are here")
        return 1
    print("preflight: ok: everything the GPU checks need is here")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", type=Path, help="the test bundles (scripts/make_gpu_bundles.py --out DIR); "
                                                     "without it, torch must be here to make them")
    args = parser.parse_args(argv)
    return report(run(args.bundles))


if __name__ == "__main__":
    sys.exit(main())
