#!/usr/bin/env bash
# Sets up (scripts/setup_env.sh) and runs every test that can run on this machine: the CPU tests, Triton's
# kernels in its CPU interpreter, the C++ extension's CPU kernels, and the gpu-marked tests where a GPU is.
#
#   bash scripts/test.sh [--quick] [--avx2] [pytest arguments]
#
#   --quick  the fast tier: leaves out the tests marked slow (-m "not slow", combined with any -m given), at least
#            one test of every test module still runs. 2.9 minutes on a quiet 2-core machine, the full run 11.6
#            (docs/design.md, section 8).
#   --avx2   takes the CPU code paths an AVX2-only x86 machine takes, whatever this x86 machine has: torch's
#            (ATEN_CPU_CAPABILITY), MKL's and oneDNN's kernels and numpy's (NPY_DISABLE_CPU_FEATURES). numpy's
#            OpenBLAS is left to choose (some machines set OPENBLAS_CORETYPE to avoid kernels that fail on them):
#            Triton's interpreter no longer computes tl.dot with it. CI runs the numerics-marked tests once more
#            this way (.ci/run).
#
#   The tests run in PYCHOP_TEST_WORKERS processes (pytest-xdist; default 2, 0 or 1: in this process alone),
#   unless the arguments say -n themselves. Every worker takes the run's seed.
#
# Every run prints its random seed in the header; PYCHOP_TEST_SEED=<seed> (or --seed <seed>) replays it.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --avx2)
            [ "$(uname -m)" = x86_64 ] || { echo "scripts/test.sh: --avx2 needs an x86-64 CPU, this is $(uname -m)" >&2; exit 2; }
            export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
                NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR" ;;
        -m)
            [ $# -ge 2 ] || { echo "scripts/test.sh: -m needs a marker expression" >&2; exit 2; }
            marks="$2"; shift ;;
        *) args+=("$1") ;;
    esac
    shift
done
if [ "$quick" = 1 ]; then
    marks="${marks:+($marks) and }not slow"
fi
if [ -n "${marks:-}" ]; then
    args=(-m "$marks" ${args[@]+"${args[@]}"})
fi

PY=$(bash scripts/setup_env.sh | tail -n 1)
workers=${PYCHOP_TEST_WORKERS:-2}
case " ${args[*]-} " in *" -n "*|*" -n"[0-9a]*|*" --numprocesses"*) workers=0 ;; esac
if [ "$workers" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
    args=(-n "$workers" --dist worksteal ${args[@]+"${args[@]}"})
fi
exec "$PY" -m pytest ${args[@]+"${args[@]}"}
