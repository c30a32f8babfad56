#!/usr/bin/env bash
# The GPU check, staged for one short GPU window (one H200: 15 minutes of device time in all, its start included;
# one command at most 10 minutes). Prepared and rehearsed on the CPU; on the GPU machine (python with torch CUDA,
# triton, nvcc, ninja, pytest-xdist, compute-sanitizer; no network):
#
#   bash scripts/gpu_check.sh first      # at most 7 minutes: what matters most
#   bash scripts/gpu_check.sh second     # at most 5 minutes: the rest
#   bash scripts/gpu_check.sh --rehearse first|second    # the same stages at tiny sizes on the CPU
#
# first: environment (20 s), install without downloads (45 s), pychop._C built in the background meanwhile
#   (~70 s g++ for binding.cpp, ~25 s nvcc), triton correctness at shapes A-F x bf16, fp16 x 2 option sets
#   against float32 torch (120 s; about 30 Triton compiles: 3 spatial kernels per head dim 40, 64, 128 and
#   dtype, 3 temporal kernels per (head dim, frames block 16, 32, 64) and dtype), cuda correctness at the same
#   cases (75 s), the attention suite with repeats sized to each kernel's time (150 s). Expected: 5-6 minutes.
# second: environment, install (65 s), the chopgrad suite (60 s) and the mobius suite (60 s) with peak allocator
#   memory and step times, the representative gpu tests (70 s: tests/test_attention_conformance.py on triton and
#   cuda in bf16 and float32-cuda, the model, compile and chopgrad gpu tests; about 120 Triton compiles on 8
#   pytest-xdist workers), compute-sanitizer memcheck and racecheck last (40 s). Expected: 4-5 minutes.
# Each stage has its own limit; the compile counts measured on the GPU are in <call>.json (triton_compiles).
# A pre-built Triton cache is not carried: the first call compiles about 30 kernels (about 40 s on 4 workers'
# worth of the GPU machine's 16 cores), under the minute that would make carrying one worth its risk (its key
# must equal the key of the runtime's own launch, integer specialisations included).
#
# Into $OUT (default results/gpu_check): <call>.log, <call>.json and the suites' PNGs, at most 7 files.
# Commit what comes back under benchmarks/results/<gpu name>/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    PY=.venv/bin/python  # rehearsal on a CPU machine: the environment scripts/setup_env.sh made
fi
args=()
for arg in "$@"; do args+=("$arg"); done
exec "$PY" scripts/gpu_check.py "${args[@]}" --out "${OUT:-results/gpu_check}"
