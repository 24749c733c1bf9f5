#!/usr/bin/env bash
# Every GPU check in one go, for a machine with an NVIDIA GPU. Writes a report to
# ${OUT:-gpu-report}/ (pytest log + JUnit XML + environment + gpu-bench.md). Usage:
#   scripts/gpu_checks.sh            # uses .venv if present, else python3
# Needs: the project installed with its dev requirements, and onnxruntime-gpu in place of
# onnxruntime (the two provide the same module; never install both).
set -uo pipefail
cd "$(dirname "$0")/.."
report=${OUT:-gpu-report}
mkdir -p "$report"
py=.venv/bin/python
[ -x "$py" ] || py=python3
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi: not found"
  "$py" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1
  "$py" -c "import tensorrt as t; print('tensorrt', t.__version__)" 2>&1 | tail -n 1
} | tee "$report/environment.txt"
# RMT_REQUIRE_GPU=1: a GPU test whose provider, TensorRT, cuda-python or GPU is missing fails
# instead of skipping (tests/gpu/conftest.py), so a run that tested nothing cannot pass.
RMT_REQUIRE_GPU=1 PYTHONUNBUFFERED=1 "$py" -m pytest -m gpu tests/gpu -v -rs --junitxml="$report/gpu-junit.xml" 2>&1 | tee "$report/gpu-pytest.log"
status=${PIPESTATUS[0]}
# Throughput side by side (TensorRT native with and without CUDA graphs, ORT CUDA/TensorRT EPs,
# PyTorch on CUDA); variants missing here are listed as skipped with the reason.
"$py" benchmarks/gpu_bench.py --model "${GPU_BENCH_MODEL:-gpt2-small}" 2>&1 | tee "$report/gpu-bench.md"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "exit status: $status" | tee -a "$report/environment.txt"
exit "$status"
