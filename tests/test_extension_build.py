"""Building and loading pychop._C: clear reasons when it cannot, and the binding's own checks."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pychop
from pychop import _build
from pychop.kernels.limits import MAX_HEAD_DIM
from pychop.ops import extension_attention
from tests import cuda_sim


def test_no_compiler_is_reported(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(_build.ExtensionBuildError, match=r"no C\+\+ compiler found .*/nonexistent/c\+\+"):
        _build._check_toolchain()


def test_cuda_missing_is_reported_by_name():
    if _build.cuda_missing_reason() is not None:
        with pytest.raises(pychop.BackendUnavailable, match=r"backend 'cuda': .*without its CUDA kernels"):
            extension_attention.ensure_available("cuda")
    else:
        extension_attention.ensure_available("cuda")


def test_cuda_toolkit_without_runtime_library_is_reported(monkeypatch, tmp_path):
    """torch takes the toolkit to be two folders above the nvcc on PATH, a wrapper script on some machines."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").touch()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", str(tmp_path))
    assert "the CUDA runtime library was not found" in _build.cuda_missing_reason()
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / "libcudart.so").touch()
    assert _build.cuda_missing_reason() is None


def test_cuda_targets_without_a_visible_gpu(monkeypatch):
    """torch picks nvcc's targets from the visible GPUs and fails with none; pychop then names its own."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    flags = _build.extension_kwargs(with_cuda=True)["extra_cuda_cflags"]
    assert "-gencode=arch=compute_90,code=sm_90" in flags and "-gencode=arch=compute_90,code=compute_90" in flags
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert not any("arch" in flag for flag in _build.extension_kwargs(with_cuda=True)["extra_cuda_cflags"])


def test_build_arguments_are_fresh_lists():
    """torch appends its libraries to the link flags it is given: a CPU-only build after a failed CUDA build
    must not inherit the CUDA libraries."""
    _build.extension_kwargs(with_cuda=True)["extra_ldflags"].append("-lcudart")
    assert "-lcudart" not in _build.extension_kwargs(with_cuda=False)["extra_ldflags"]


def test_sources_exist():
    for path in _build.cpp_sources() + _build.cuda_sources():
        assert torch.utils.cpp_extension._is_cuda_file(path) == path.endswith(".cu")
    assert _build.cuda_sources(), "the CUDA kernels are part of csrc/"


def inputs(**changes):
    shape = changes.pop("shape", (1, 2, 3, 1, 8))
    x = [torch.randn(shape) for _ in range(6)]
    out = torch.empty(shape)
    lse = [torch.empty(shape[0], shape[1], shape[3], shape[2]) for _ in range(2)]
    return x, out, lse


def test_binding_checks_name_the_argument():
    extension = _build.load()
    x, out, lse = inputs()
    x[4] = torch.randn(1, 2, 3, 1, 16)[..., ::2]
    with pytest.raises(RuntimeError, match=r"k_t must have a last-dimension stride of 1"):
        extension.attention_forward(*x, out, None, *lse, 1.0, False, 0, 0)
    x, out, lse = inputs()
    x[2] = x[2].half()
    with pytest.raises(RuntimeError, match=r"v_s has dtype Half, expected Float like q_s"):
        extension.attention_forward(*x, out, None, *lse, 1.0, False, 0, 0)
    x, out, lse = inputs()
    with pytest.raises(RuntimeError, match=r"lse_t must be a contiguous \(B, T, H, S\)"):
        extension.attention_forward(*x, out, None, lse[0], lse[1].transpose(2, 3), 1.0, False, 0, 0)
    x, out, lse = inputs(shape=(1, 2, 3, 1, MAX_HEAD_DIM + 8))
    with pytest.raises(RuntimeError, match=rf"q_s has head dim {MAX_HEAD_DIM + 8}; at most {MAX_HEAD_DIM}"):
        extension.attention_forward(*x, out, None, *lse, 1.0, False, 0, 0)
    x, out, lse = inputs()
    with pytest.raises(RuntimeError, match=r"stacked branches need both branches"):
        extension.attention_forward(*x[:3], None, None, None, out, torch.empty_like(out), lse[0], None, 1.0, False,
                                    0, 0)


SWITCH_PROBE = r"""
#include <cstdio>
#include "attention/cuda/head_dim_switch.h"
int main() {
  const int limits[] = {0, 15, 16, 31, 32, 63, 64, 1000};
  const int rows[] = {1, 16, 17, 32, 33, 4096};
  for (int limit : limits)
    for (int r : rows) {
      const int block = pychop::choose_block(r, [&](int b) { return b <= limit; });  // memory grows with the block
      const char* result = pychop::dispatch_block(block, [&](auto tag) {
        std::printf("block %d %d %d\n", limit, r, decltype(tag)::value);
        return static_cast<const char*>(nullptr);
      });
      if (result) std::printf("block %d %d 0\n", limit, r);
    }
}
"""


def compile_and_run(tmp_path, source_text):
    """Compiles a host C++ program (csrc/ and tests/csrc/ on the include path) with warnings as errors, runs it:
    its stdout."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler")
    source = tmp_path / "probe.cpp"
    source.write_text(source_text)
    build = subprocess.run([compiler, "-std=c++17", "-O2", "-Wall", "-Werror", f"-I{_build.CSRC}",
                            f"-I{cuda_sim.CSRC_TESTS}", str(source), "-o", str(tmp_path / "probe")],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:]
    return run.stdout


def test_cuda_block_choice(tmp_path):
    """csrc/attention/cuda/head_dim_switch.h, run on the host: the largest block that fits, none when 16 does not,
    and no block of more than twice the rows where a smaller one fits (T = 16 frames take 16-row blocks)."""
    output = compile_and_run(tmp_path, SWITCH_PROBE)
    lines = [tuple(map(int, line.split()[1:])) for line in output.splitlines()]
    chosen = {(limit, rows): block for limit, rows, block in lines}
    for (limit, rows), block in chosen.items():
        fitting = [b for b in (64, 32, 16) if b <= limit]
        expected = next((b for b in fitting if rows > b // 2), fitting[-1] if fitting else 0)
        assert block == expected, (limit, rows, block)
    assert chosen[(1000, 4096)] == 64 and chosen[(1000, 16)] == 16 and chosen[(1000, 17)] == 32
    assert chosen[(15, 4096)] == 0 and chosen[(31, 4096)] == 16


def test_cuda_kernel_arithmetic_on_the_host(tmp_path):
    """tests/csrc/attention_host_checks.cpp: the CUDA kernels' plain-C++ parts without a GPU. Each branch's row
    offsets against the (B, T, S, H, D) strides of random layouts; masks and block ranges against brute force; the
    kernels' loops (query and key blocks, online softmax, in-kernel or precomputed delta, grad window, dq
    written once or accumulated, head-dim splits) emulated in double precision against a direct reference, for
    causal, window and grad-window masks, 1 to 130 rows, blocks 16, 32, 64; every shared-memory layout aligned
    and disjoint, and a plan for every head dim up to MAX_HEAD_DIM, dtype and GPU family's shared memory
    (float32 D >= 208 on 99 KiB: head-dim splits)."""
    out = compile_and_run(tmp_path, (Path(__file__).parent / "csrc" / "attention_host_checks.cpp").read_text())
    assert out.splitlines()[-1] == "ok", out[-2000:]
    assert int(out.split("emulated ")[1].split()[0]) > 500


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_dead_owners_lock_is_taken_over(tmp_path):
    """A process killed while it builds leaves its lock file, and torch's, behind; the next build takes both over
    (the lock is held through the file while its owner lives, so a dead owner's file holds nothing)."""
    lock = _build.BuildLock(tmp_path, timeout=5)
    lock.path.write_text(f"{dead_pid()}\n")
    (tmp_path / "lock").write_text("")  # torch.utils.cpp_extension's baton, which it would wait on forever
    with lock:
        assert lock.owner() == os.getpid()
        assert not (tmp_path / "lock").exists()


HOLDER = """
import fcntl, os, sys, time
with open(sys.argv[1], "a+") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    lock.truncate(0)
    lock.write(f"{os.getpid()}\\n")
    lock.flush()
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_live_owners_lock_is_waited_on_with_a_message_and_a_bound(tmp_path, capsys):
    lock = _build.BuildLock(tmp_path, timeout=0.5)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(_build.ExtensionBuildError,
                           match=rf"waited 0.5 s for process {holder.pid}, which holds {lock.path}"):
            with lock:
                pass
        assert f"waiting for process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    with _build.BuildLock(tmp_path, timeout=5):  # its owner is gone now
        pass


def test_the_default_build_folder_is_keyed_by_the_sources(monkeypatch, tmp_path):
    """Two checkouts with different sources build apart; identical sources share one build."""
    monkeypatch.delenv(_build.BUILD_DIR_ENV, raising=False)
    copy = tmp_path / "csrc"
    shutil.copytree(_build.CSRC, copy)
    ours = _build.build_dir()
    monkeypatch.setattr(_build, "CSRC", copy)
    assert _build.build_dir() == ours
    with open(copy / "attention" / "binding.cpp", "a") as source:
        source.write("\n// another checkout\n")
    assert _build.build_dir() != ours and _build.build_dir().parent == ours.parent


@pytest.fixture(scope="module")
def cuda_simulation(tmp_path_factory):
    """tests/csrc/attention_cuda_sim.cpp built against the kernels' own source (tests/cuda_sim.py)."""
    workdir = tmp_path_factory.mktemp("cuda_sim")
    executable = cuda_sim.build(workdir)
    if executable is None:
        pytest.skip("no C++ compiler")
    return executable


def test_cuda_kernels_simulated(cuda_simulation):
    """The CUDA kernels' own source run on the CPU (tests/csrc/cuda_sim/): threads as fibers in random orders
    between barriers, shared memory NaN-poisoned and guarded, cp.async landing only at its wait; forward and
    backward of every dtype, mask, kernel path (one-pass and query-kernel backward, head-dim splits) and head dims
    10 to 256 (40, 72, 160; float32 208 and 256 on a 99 KiB GPU), odd row counts, packed, padded and misaligned
    inputs, against float64 within the project's rule (3 x the plain path's error in the dtype + a floor)."""
    result = cuda_sim.run(cuda_simulation)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "ok", result.stdout[-3000:]
    assert len(result.stdout.splitlines()) > 20


@pytest.mark.slow
def test_cuda_kernels_simulated_all(cuda_simulation):
    """The same over head dims 8 to 256 in every dtype and shared-memory size (99, 163, 227 KiB), 1 to 130 rows;
    the cases shared out over up to 4 processes."""
    shards = max(1, min(4, os.cpu_count() or 1))
    results = cuda_sim.run_sharded(cuda_simulation, shards, "--all")
    for result in results:
        assert result.returncode == 0 and result.stdout.splitlines()[-1] == "ok", result.stdout[-3000:]
    assert sum(len(result.stdout.splitlines()) for result in results) > 150


# Deliberately broken copies of the kernels (tests/cuda_sim.py's edits; the sources themselves are untouched) and
# what the simulation reports for each.
BROKEN_KERNELS = {
    "forward without the barrier before the next key block": (
        {"attention_fwd.cu": ("    __syncthreads();  // the previous block's P V has read k_tile, v_tile, probs\n",
                              "")},
        "out error"),
    "backward waiting for its cp.async after the barrier": (
        {"attention_bwd.cu": ("    wait_async_copies();\n    __syncthreads();\n",
                              "    __syncthreads();\n    wait_async_copies();\n")},
        "error inf"),
    "backward ignoring the grad window in dv": (
        {"attention_bwd.cu": ("first_live_row(br.grad_window, i, first)", "first_live_row(0, i, first)")},
        "dv_t error"),
    "forward summing a row in half the lanes of its warp": (
        {"attention_fwd.cu": ("      block_sum = group_sum(block_sum, 32);",
                              "      if (lane < 16) block_sum = group_sum(block_sum, 32);")},
        "deadlock"),
    "forward launched with 128 bytes too little shared memory": (
        {"attention_fwd.cu": ("THREADS, bytes(BLOCK), stream", "THREADS, bytes(BLOCK) - 128, stream")},
        "past the block's dynamic shared memory"),
}


@pytest.mark.parametrize("broken", [
    pytest.param(name, marks=[] if i == 0 else pytest.mark.slow) for i, name in enumerate(BROKEN_KERNELS)])
def test_cuda_simulation_catches_broken_kernels(cuda_simulation, tmp_path, broken):
    """The simulation fails a kernel with a race (a barrier removed, a cp.async waited for too late), a wrong mask,
    a shuffle that not every lane reaches or a shared-memory overrun, naming what it found."""
    edits, message = BROKEN_KERNELS[broken]
    executable = cuda_sim.build(tmp_path, edits, reuse=cuda_simulation.parent)
    result = cuda_sim.run(executable)
    assert result.returncode == 1 and message in result.stdout, result.stdout[-3000:]
