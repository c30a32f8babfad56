"""What only the "cuda" backend (pychop._C's CUDA kernels) has: its nondeterministic backward refused under
deterministic algorithms, and compute-sanitizer memcheck / racecheck. Every scenario every fused backend meets is
in tests/test_attention_conformance.py."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pychop

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent


def test_backward_refused_under_deterministic_algorithms(deterministic_setting):
    q, k, v = (torch.randn(1, 2, 16, 1, 8, device="cuda", requires_grad=True) for _ in range(3))
    torch.use_deterministic_algorithms(True)
    out = pychop.spatial_attention(q, k, v, backend="cuda")  # the forward is deterministic
    with pytest.raises(RuntimeError, match="not deterministic"):
        out.sum().backward()
    pychop.temporal_attention(q, k, v, backend="cuda").sum().backward()
    assert pychop.ops.backends.resolve("auto", q.device) != "cuda"


def compute_sanitizer():
    """compute-sanitizer from PATH or the CUDA toolkit (CUDA_HOME, /usr/local/cuda); on a GPU machine it must be
    there: a missing sanitizer fails the check instead of skipping it."""
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    found = shutil.which("compute-sanitizer") or next(
        (str(Path(home) / "bin" / "compute-sanitizer") for home in homes
         if home and (Path(home) / "bin" / "compute-sanitizer").exists()), None)
    assert found, "compute-sanitizer is not on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin"
    return found


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool):
    command = [compute_sanitizer(), "--tool", tool, "--error-exitcode", "1", sys.executable,
               str(ROOT / "scripts" / "sanitize_cuda.py")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ), timeout=1200)
    assert result.returncode == 0, f"compute-sanitizer {tool} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
