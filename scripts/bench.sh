#!/usr/bin/env bash
# Sets up (scripts/setup_env.sh), then runs every benchmark suite (small sizes on a CPU, the benchmark shapes on a
# GPU; tables printed, JSON and PNG in results/) and the demo. Arguments go to `python -m benchmarks`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh | tail -n 1)
"$PY" -m benchmarks "$@"
"$PY" -m benchmarks.demo
