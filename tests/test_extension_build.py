"""Building and loading pychop._C: clear reasons when it cannot, and the binding's own checks."""

import os

import pytest
import torch

import pychop
from pychop import _build
from pychop.kernels.limits import MAX_HEAD_DIM
from pychop.ops import extension_attention


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
  std::printf("max %d\n", pychop::MAX_HEAD_DIM);
  for (int d = 1; d <= pychop::MAX_HEAD_DIM; ++d)
    PYCHOP_TEMPORAL_LANES_SWITCH(d, [&] { std::printf("temporal %d %d %d\n", d, LANES, PER_LANE); return nullptr; });
  const int limits[] = {0, 15, 16, 31, 32, 63, 64, 1000};
  for (int limit : limits) {
    const auto bytes = [](int block) { return block; };  // a stand-in: shared memory grows with the block
    const char* error = PYCHOP_SPATIAL_BLOCK_SWITCH(bytes, limit, "none fits", [&] {
      std::printf("spatial %d %d\n", limit, BLOCK);
      return nullptr;
    });
    if (error) std::printf("spatial %d 0\n", limit);
  }
}
"""


def test_cuda_head_dim_switches(tmp_path):
    """The switches of csrc/attention/cuda/head_dim_switch.h (plain C++), run on the host: every head dim up to
    the C++ MAX_HEAD_DIM (which equals Python's) gets a temporal lane group of a power of two <= 32 lanes that
    covers it, and the spatial blocks are the largest that fit, none when 16 does not."""
    import shutil
    import subprocess

    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler")
    (tmp_path / "probe.cpp").write_text(SWITCH_PROBE)
    build = subprocess.run([compiler, "-std=c++17", "-Wall", "-Werror", f"-I{_build.CSRC}", "probe.cpp", "-o", "probe"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    lines = [line.split() for line in subprocess.run(["./probe"], cwd=tmp_path, check=True, capture_output=True,
                                                     text=True).stdout.splitlines()]
    assert lines[0] == ["max", str(MAX_HEAD_DIM)]
    temporal = [tuple(map(int, line[1:])) for line in lines if line[0] == "temporal"]
    assert [d for d, _, _ in temporal] == list(range(1, MAX_HEAD_DIM + 1))
    for d, lanes, per_lane in temporal:
        assert lanes in (1, 2, 4, 8, 16, 32) and lanes * per_lane >= d, (d, lanes, per_lane)
    spatial = dict(tuple(map(int, line[1:])) for line in lines if line[0] == "spatial")
    assert spatial == {0: 0, 15: 0, 16: 16, 31: 16, 32: 32, 63: 32, 64: 64, 1000: 64}


def dead_pid() -> int:
    import subprocess
    import sys

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
    import subprocess
    import sys

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
    import shutil

    monkeypatch.delenv(_build.BUILD_DIR_ENV, raising=False)
    copy = tmp_path / "csrc"
    shutil.copytree(_build.CSRC, copy)
    ours = _build.build_dir()
    monkeypatch.setattr(_build, "CSRC", copy)
    assert _build.build_dir() == ours
    with open(copy / "attention" / "binding.cpp", "a") as source:
        source.write("\n// another checkout\n")
    assert _build.build_dir() != ours and _build.build_dir().parent == ours.parent
