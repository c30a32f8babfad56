"""What only the "cuda" backend (pychop._C's CUDA kernels) has: a deterministic backward (no atomics), and
compute-sanitizer memcheck / racecheck. Every scenario every fused backend meets is
in tests/test_attention_conformance.py."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pychop
from tests.checks import check_against_reference

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("shape", [(1, 2, 16, 1, 8), (1, 70, 3, 2, 40), (2, 3, 200, 2, 64)], ids=str)
def test_backward_is_deterministic(deterministic_setting, shape):
    """No atomics: under torch.use_deterministic_algorithms the backward runs, and twice gives the same bits. One
    key block per problem (T = 2, S = 16), the query kernel's dq (T = 70, S = 200), summed and stacked."""
    torch.use_deterministic_algorithms(True)
    assert pychop.ops.backends.resolve("auto", torch.device("cuda")) != "torch"
    x = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(6)]
    for combine in ("sum", "stack"):
        out = pychop.parallel_st_attention(*x, temporal_causal=True, temporal_grad_window=2, combine=combine,
                                           backend="cuda")
        dout = torch.randn_like(out)
        first, second = (torch.autograd.grad(out, x, dout, retain_graph=True) for _ in range(2))
        for a, b in zip(first, second):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 7, 1, 208), (1, 2, 70, 1, 256), (1, 70, 3, 1, 256), (1, 3, 40, 1, 160)],
                         ids=str)
def test_blocks_of_a_99_kib_gpu(monkeypatch, shape, dtype, seed):
    """The blocks a GPU with 99 KiB of shared memory per block (sm_86, sm_89, sm_120) takes, forced on this one:
    float32 D = 208 and 256 did not launch there before; D > 240 now splits the key kernel's gradient columns."""
    monkeypatch.setenv("PYCHOP_CUDA_SHARED_MEMORY_LIMIT", "101376")
    check_against_reference("parallel", "cuda", shape, dtype, "cuda", seed, causal=True, grad_window=2)


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
