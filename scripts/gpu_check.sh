#!/usr/bin/env bash
# The GPU check, staged for one short GPU window (one H200: 15 minutes of device time in all, its start included;
# one command at most 10 minutes). Prepared and rehearsed on the CPU; on the GPU machine (python with torch CUDA,
# triton, nvcc, ninja, pytest-xdist, compute-sanitizer; no network):
#
#   bash scripts/gpu_check.sh first      # at most 7 minutes: what matters most
#   bash scripts/gpu_check.sh second     # at most 5 minutes: the rest
#   bash scripts/gpu_check.sh --rehearse first|second    # the same stages at tiny sizes on the CPU
#
# first (budget 420 s): environment (20 s), install without downloads (25 s) while pychop._C builds in the
#   background (~70 s of g++ for binding.cpp, ~25 s of nvcc), triton correctness at shapes A-F x {bf16 with the
#   spatial branch through SDPA and through the Triton kernel, fp16 on the path auto takes} x {every frame, window 8
#   with grad window 4} against float32 torch (130 s; about 80 Triton compiles: the spatial kernels per head dim 40,
#   64, 128 and dtype, the temporal ones also per block of frames 16, 32, 64 and per causal or not), cuda
#   correctness on the same cases (45 s), python -m pychop.check (45 s: every backend on both spatial paths at
#   three shapes, bf16 and float32, against float64; the path auto takes), the attention suite at A-F (115 s: the
#   fused op per backend and spatial path against diffusers' default and the best unfused composition, the branches
#   per SDPA backend, auto against the torch backend; 10 timed rounds of >= 1 ms samples, each shape's tables
#   printed as it ends), the T sweep of the temporal branch (40 s). Expected: 6-7 minutes.
# second (budget 300 s): environment and install (40 s), the chopgrad suite (90 s: peak allocator memory and step
#   time against frames, full backpropagation vs stream, pychop's decoder at Wan widths and diffusers' Wan VAE),
#   the mobius suite (60 s: every form at SD15_VIDEO, batch 2, bf16), 3 timed rounds each, the representative
#   gpu tests (60 s: tests/test_attention_conformance.py on triton and cuda in bf16 and float32, head dims to
#   256 in bf16, and the model, compile and chopgrad gpu tests; on 8 pytest-xdist workers), compute-sanitizer
#   memcheck and racecheck last (50 s, bf16, two shapes, each tool its own half). Expected: 5 minutes.
# Each stage has its own limit; the Triton compiles each stage made on the GPU are in <call>.json
# (triton_compiles: new entries in an empty TRITON_CACHE_DIR).
# A pre-built Triton cache is not carried. The first call compiles about 100 kernels (about 1 s each here, where
# the compile and ptxas run without a GPU), and a carried entry would be found only if its key
# equals the key of the runtime's own launch: the kernel source, the launch's specialisation attributes (16-byte
# divisibility of every pointer and integer, integers equal to 1, None arguments), the options, the bundled
# ptxas and the target. The attributes come from the driver's specialisation of the actual tensors, which cannot
# run without a GPU driver, so that equality cannot be verified here; what an unverified cache would save is
# left to the first GPU run to measure (triton_compiles and the stage times in first.json).
#
# Into $OUT (default results/gpu_check): <call>.log, <call>.json and the suites' PNGs, 8 files in all.
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
