"""The "cuda" backend (pychop._C's CUDA kernels) against the float64 reference on the GPU: the cases of the
cpp backend, DESIGN.md shapes, and compute-sanitizer memcheck / racecheck at small shapes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.checks import TEMPORAL_OPTIONS, check_against_reference, options_id
from tests.test_attention_cpp import LOW_PRECISION, ODD_SHAPES, SMALL_SHAPE

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("dtype", LOW_PRECISION + (torch.float16,), ids=str)
@pytest.mark.parametrize("options", TEMPORAL_OPTIONS, ids=options_id)
@pytest.mark.parametrize("op", ["parallel", "stacked", "temporal"])
def test_temporal_options(op, options, dtype, seed):
    check_against_reference(op, "cuda", SMALL_SHAPE, dtype, "cuda", seed, **options)


@pytest.mark.parametrize("dtype", LOW_PRECISION + (torch.float16,), ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES + [(1, 2, 130, 2, 160), (1, 2, 65, 1, 256), (1, 2, 9, 3, 8)], ids=str)
@pytest.mark.parametrize("op", ["parallel", "spatial"])
def test_odd_shapes(op, shape, dtype, seed):
    options = dict(causal=True, grad_window=2) if op == "parallel" else {}
    check_against_reference(op, "cuda", shape, dtype, "cuda", seed, **options)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("op", ["parallel", "stacked"])
def test_packed_views_and_scale(op, dtype, seed):
    check_against_reference(op, "cuda", (2, 4, 23, 3, 40), dtype, "cuda", seed, packed=True, scale=0.3,
                            causal=True, grad_window=2)


# DESIGN.md shapes D and F (the float64 reference of the larger ones needs more memory than most GPUs have).
@pytest.mark.parametrize("shape", [(1, 16, 1024, 8, 128), (2, 16, 1024, 8, 40)], ids=["D", "F"])
def test_design_shapes(shape, seed):
    check_against_reference("parallel", "cuda", shape, torch.bfloat16, "cuda", seed, causal=True, grad_window=2)


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool):
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not on PATH")
    command = [sanitizer, "--tool", tool, "--error-exitcode", "1", sys.executable,
               str(ROOT / "scripts" / "sanitize_cuda.py")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ), timeout=1200)
    assert result.returncode == 0, f"compute-sanitizer {tool} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
