#!/usr/bin/env bash
# Sets up (scripts/setup_env.sh) and runs every test that can run on this machine: the CPU tests, Triton's
# kernels in its CPU interpreter, the C++ extension's CPU kernels, and the gpu-marked tests where a GPU is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh | tail -n 1)
exec "$PY" -m pytest "$@"
