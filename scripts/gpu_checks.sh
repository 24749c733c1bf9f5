#!/usr/bin/env bash
# Every GPU check in one go, for a machine with an NVIDIA GPU (a GPU server or a Jetson).
# Writes a report to ${OUT:-gpu-report}/ (environment.txt with the preflight, the pytest log and
# JUnit XML, gpu-bench.md). Usage:
#   scripts/gpu_checks.sh                  # torch here: makes the test bundles first (~30 s)
#   scripts/gpu_checks.sh --bundles DIR    # bundles made elsewhere by scripts/make_gpu_bundles.py: no torch needed
# Python: $PYTHON if set, else .venv/bin/python if present, else python3.
# Needs: the project installed with its dev requirements, and onnxruntime-gpu in place of
# onnxruntime (the two provide the same module; never install both).
set -uo pipefail
bundles=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bundles) [ $# -ge 2 ] || { echo "gpu_checks: --bundles needs a directory" >&2; exit 2; }
               bundles=$2; shift 2 ;;
    --bundles=*) bundles=${1#--bundles=}; shift ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_checks: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
# A relative --bundles is relative to where the script was started, before the cd below.
if [ -n "$bundles" ] && [ -d "$bundles" ]; then bundles=$(cd "$bundles" && pwd); fi
cd "$(dirname "$0")/.." || exit 2
report=${OUT:-gpu-report}
mkdir -p "$report"
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
finish() { echo "exit status: $1" | tee -a "$report/environment.txt"; exit "$1"; }

# Preflight: the driver, cuda-python, TensorRT, ONNX Runtime's GPU providers, the bundles and
# (optional) torch, each printed with what was found or why it is missing. A missing part
# stops here: no test runs, and nothing tested is not a pass.
{
  echo "date: $(date -u +%FT%TZ)"
  "$py" scripts/gpu_preflight.py ${bundles:+--bundles "$bundles"}
} 2>&1 | tee "$report/environment.txt"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  echo "gpu_checks: the preflight failed (above): no GPU test was run" | tee -a "$report/environment.txt"
  finish 1
fi

if [ -z "$bundles" ]; then  # the preflight passed without --bundles only because torch is here
  rm -rf "$report/bundles"
  "$py" scripts/make_gpu_bundles.py --out "$report/bundles" 2>&1 | tee "$report/make-bundles.log"
  if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    echo "gpu_checks: making the test bundles failed (above, and $report/make-bundles.log)" \
      | tee -a "$report/environment.txt"
    finish 1
  fi
  bundles=$(cd "$report/bundles" && pwd)
fi

# RMT_REQUIRE_GPU=1: a GPU test whose provider, TensorRT, cuda-python, GPU or bundles are missing
# fails instead of skipping (tests/gpu/conftest.py), so a run that tested nothing cannot pass.
# --confcutdir: tests/gpu needs only its own conftest (the suite's needs the dev packages, e.g. filelock).
RMT_REQUIRE_GPU=1 RMT_GPU_BUNDLES="$bundles" PYTHONUNBUFFERED=1 "$py" -m pytest -m gpu tests/gpu \
  --confcutdir=tests/gpu -v -rs --junitxml="$report/gpu-junit.xml" 2>&1 | tee "$report/gpu-pytest.log"
status=${PIPESTATUS[0]}

# Throughput side by side (TensorRT native with and without CUDA graphs, ORT CUDA/TensorRT EPs,
# PyTorch on CUDA); variants missing here are listed as skipped with the reason. The benchmark
# builds its model with torch: without torch (a Jetson) it is skipped, which is not a failure.
if "$py" -c "import torch" >/dev/null 2>&1; then
  "$py" benchmarks/gpu_bench.py --model "${GPU_BENCH_MODEL:-gpt2-small}" 2>&1 | tee "$report/gpu-bench.md"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "gpu_bench: skipped: torch is not installed (benchmarks/gpu_bench.py builds its model and the PyTorch" \
       "peers with it)" | tee "$report/gpu-bench.md"
fi
finish "$status"
