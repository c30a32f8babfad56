#!/usr/bin/env bash
# Sets up an environment for pychop and prints the python to use, as the last line of its output.
#
# - A machine whose python already has a CUDA build of torch (a GPU machine, possibly with no network):
#   installs the checkout into that python with no downloads.
# - Otherwise: a virtual environment in .venv with torch 2.13.0 (the CPU build, where one is at hand), Triton 3.6.0
#   and pychop with its test, benchmark and diffusers extras. Re-running reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "setup: using $("$PYTHON" -c 'import sys; print(sys.executable)') (torch with CUDA found); installing pychop without downloads" >&2
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . >&2
    "$PYTHON" -c "import pytest_timeout" 2>/dev/null || echo "setup: pytest-timeout is not installed here, so" \
        "pytest.ini's per-test timeout does nothing (pip install pytest-timeout where a network is)" >&2
    "$PYTHON" -c "import sys; print(sys.executable)"
    exit 0
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip setuptools wheel >&2
fi
if ! .venv/bin/python -c "import torch, triton" 2>/dev/null; then
    echo "setup: installing torch 2.13.0 (CPU build) and triton 3.6.0 into .venv" >&2
    .venv/bin/python -m pip install -q torch==2.13.0 triton==3.6.0 >&2
fi
echo "setup: installing pychop (editable) with its test, bench and diffusers extras" >&2
.venv/bin/python -m pip install -q -e ".[test,bench,diffusers]" >&2
echo "$PWD/.venv/bin/python"
