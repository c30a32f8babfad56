#!/usr/bin/env bash
# The GPU check: on a GPU machine whose python already has torch (CUDA) and triton, with no network.
# Installs the checkout without downloads, builds the extension, runs the gpu-marked tests and the benchmark
# suites at DESIGN.md's sizes, and prints a summary table last. Into $OUT (default results/gpu_check) go one
# log (gpu_check.log), the tests' JUnit XML and each suite's JSON and PNG: 8 files in all.
# Usage: bash scripts/gpu_check.sh [extra pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu_check}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA GPU visible to torch')" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# torch takes the CUDA toolkit to be two folders above the nvcc on PATH, which may be a wrapper script
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi

echo "== install (no downloads)"
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 3

echo "== backends (builds pychop._C with its CUDA kernels on first use)"
"$PY" - <<'PY'
import torch, pychop
for name, reason in pychop.available_backends(torch.device("cuda")).items():
    print(f"{name:>7}: {'available' if reason is None else reason}")
PY

echo "== gpu tests"
# Compiling Triton's kernel variants (one per dtype, head dim and option set) dominates: 4 pytest-xdist workers
# compile side by side where it is installed (the largest test, shape C against float32 torch, holds an
# estimated 8 GB of GPU memory: four fit on one card).
workers=()
if "$PY" -c "import xdist" 2>/dev/null; then workers=(-n 4); fi
"$PY" -m pytest -m gpu -q -p no:cacheprovider "${workers[@]}" --junitxml="$OUT/gpu_tests.xml" "$@"

echo "== benchmarks"
"$PY" -m benchmarks --device cuda --out "$OUT"

echo "== summary"
"$PY" -m benchmarks.summary "$OUT"
