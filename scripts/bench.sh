#!/usr/bin/env bash
# Sets up (scripts/setup_env.sh), then runs the benchmark suite (small sizes on a CPU, DESIGN.md's sizes on
# a GPU; results in results/) and the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup_env.sh | tail -n 1)
"$PY" -m benchmarks "$@"
