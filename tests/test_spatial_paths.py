"""The spatial branch's two paths (pychop.ops.spatial_paths): the rule of "auto", the SDPA calls (the GPU ones
traced on fake CUDA tensors, so their arguments are checked without a GPU), what each path keeps for backward,
and the option's errors. Correctness of both paths: tests/test_attention_conformance.py."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import pychop
from benchmarks.floors import sdpa_from_tokens
from pychop.chopgrad.memory import SavedActivationMeter
from pychop.nn import ParallelSTBlock
from pychop.ops import sdpa_spatial, spatial_paths
from tests.checks import make_inputs, runnable_backends

FUSED_CPU = [name for name in runnable_backends() if name != "torch"]
FUSED_MODELS = [name for name in runnable_backends(interpreted=False) if name != "torch"]


@pytest.mark.parametrize("stacked", [False, True], ids=["summed", "stacked"])
@pytest.mark.parametrize("head_dim", [40, 64, 128, 256])
def test_gpu_rule_is_the_floors_models(head_dim, stacked):
    """SDPA_FROM_TOKENS is where benchmarks.floors puts the crossover of the two paths' floors (H200 ceilings)."""
    assert spatial_paths.SDPA_FROM_TOKENS[(stacked, True)] == sdpa_from_tokens(head_dim, stacked=stacked)


def test_auto_takes_sdpa_on_a_cpu_and_follows_the_rule_on_a_gpu():
    q, k, v = make_inputs((1, 2, 9, 2, 16), torch.float32, "cpu", 3, packed=True)
    assert spatial_paths.choose("auto", q, k, v, stacked=True) == "flash_cpu"
    gpu = torch.device("cuda")
    threshold = spatial_paths.SDPA_FROM_TOKENS[(False, True)]
    assert not spatial_paths.prefers_sdpa(gpu, torch.bfloat16, threshold - 1, stacked=False)
    assert spatial_paths.prefers_sdpa(gpu, torch.bfloat16, threshold, stacked=False)
    assert spatial_paths.prefers_sdpa(gpu, torch.float32, 16, stacked=True)


def test_the_environment_variable_replaces_auto(monkeypatch):
    q, k, v = make_inputs((1, 2, 9, 2, 16), torch.float32, "cpu", 3)
    monkeypatch.setenv(spatial_paths.ENV_VAR, "kernel")
    assert spatial_paths.choose("auto", q, k, v, stacked=False) is None
    assert spatial_paths.choose("sdpa", q, k, v, stacked=False) == "flash_cpu", "an explicit argument wins"
    monkeypatch.setenv(spatial_paths.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"PYCHOP_SPATIAL_PATH must be one of \('auto', 'sdpa', 'kernel'\)"):
        spatial_paths.choose("auto", q, k, v, stacked=False)


def test_spatial_path_errors(monkeypatch):
    x = make_inputs((1, 2, 5, 1, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"spatial_path must be one of \('auto', 'sdpa', 'kernel'\).*got 'flash'"):
        pychop.parallel_st_attention(*x, spatial_path="flash")
    with pytest.raises(ValueError, match=r"spatial_path='kernel' needs a fused backend"):
        pychop.spatial_attention(*x[:3], backend="torch", spatial_path="kernel")
    pychop.spatial_attention(*x[:3], backend="torch", spatial_path="sdpa")  # the torch backend's own path
    monkeypatch.setattr(sdpa_spatial, "sdpa_kernel_for", lambda q, k, v: None)
    with pytest.raises(ValueError, match=r"spatial_path='sdpa': no fused kernel .* use spatial_path='kernel'"):
        spatial_paths.choose("sdpa", *x[:3], stacked=False)
    assert spatial_paths.choose("auto", *x[:3], stacked=False) is None


@pytest.mark.parametrize("kernel", ["cudnn", "flash", "efficient"])
def test_gpu_kernels_are_called_as_torch_declares_them(kernel):
    """Forward and backward of each GPU kernel on fake CUDA tensors (ATen's meta functions check the arguments):
    views of a packed projection in, (B, T, S, H, D) out; the backward reads a stacked output's strided half and
    its gradient (cuDNN's copied dense first, which fake CUDA tensors cannot run: given dense here)."""
    B, T, S, H, D = 2, 3, 64, 4, 64
    with FakeTensorMode(allow_non_fake_inputs=True):
        packed = torch.empty(B, T, S, 6, H, D, device="cuda", dtype=torch.bfloat16)
        q, k, v = packed.unbind(3)[:3]  # (fake CUDA tensors take no indexing)
        out, stats = sdpa_spatial.forward(kernel, q, k, v, 0.125)
        assert out.shape == (B, T, S, H, D) and stats[0].dtype == torch.float32
        half = torch.empty(B, T, S, 2, H, D, device="cuda", dtype=torch.bfloat16).select(3, 0)
        if kernel == "cudnn":
            half = torch.empty(B, T, S, H, D, device="cuda", dtype=torch.bfloat16)
        grads = sdpa_spatial.backward(kernel, half, q, k, v, half, stats, 0.125)
        assert [g.shape for g in grads] == [(B, T, S, H, D)] * 3


def test_cudnn_gets_output_and_gradient_in_the_layout_of_its_forward():
    """cuDNN keys its compiled backward on q, k, v alone: o and dO always go in dense, in q's memory order."""
    packed = torch.randn(2, 3, 5, 6, 4, 8)
    q4 = sdpa_spatial.frames_view(packed.select(3, 0))
    half = sdpa_spatial.frames_view(torch.randn(2, 3, 5, 2, 4, 8).select(3, 0))
    dense = sdpa_spatial._in_layout_of(half, q4)
    assert dense.stride() == (5 * 4 * 8, 8, 4 * 8, 1) and torch.equal(dense, half)  # (B*T, S, H, D) memory
    already = sdpa_spatial.frames_view(torch.randn(2, 3, 5, 4, 8))
    assert sdpa_spatial._in_layout_of(already, q4).data_ptr() == already.data_ptr()  # no copy
    other_order = torch.randn(6, 4, 5, 8)  # q of (B*T, H, S, D) memory: dense in that order
    assert sdpa_spatial._in_layout_of(half, other_order).is_contiguous()


def saved_bytes(fn):
    return SavedActivationMeter().measure(fn)


@pytest.mark.parametrize("combine", ["sum", "stack"])
@pytest.mark.parametrize("backend", FUSED_CPU)
def test_both_paths_keep_the_same_bytes_in_the_op(backend, combine):
    """The SDPA path keeps what the kernel path keeps: the inputs, one output-sized tensor (stacked: the output,
    o_s its half; summed: o_s) and each branch's row statistics."""
    x = make_inputs((1, 3, 16, 2, 8), torch.float32, "cpu", packed=True)
    kept = {path: saved_bytes(lambda path=path: pychop.parallel_st_attention(*x, combine=combine, backend=backend,
                                                                              spatial_path=path))
            for path in ("sdpa", "kernel")}
    assert kept["sdpa"] == kept["kernel"] > 0


@pytest.mark.parametrize("backend", FUSED_MODELS)
def test_parallel_block_keeps_no_more_bytes_on_the_sdpa_path(backend, monkeypatch):
    """ParallelSTBlock (combine="stack" on views of its packed projection): the saved activations of a training
    step, SDPA path against the kernel path, which keeps what the block kept before the SDPA path."""
    block = ParallelSTBlock(32, 2, backend=backend, temporal_causal=True)
    x = torch.randn(2, 3, 10, 32, requires_grad=True)
    kept = {}
    for path in ("sdpa", "kernel"):
        monkeypatch.setenv(spatial_paths.ENV_VAR, path)
        kept[path] = SavedActivationMeter(block).measure(lambda: block(x).square().sum().backward())
    assert kept["sdpa"] <= kept["kernel"]


@pytest.fixture
def pretend_gpu(monkeypatch):
    """A GPU of capability `pretend_gpu.capability` with cuDNN `pretend_gpu.cudnn`, whose SDPA kernels take
    whatever `pretend_gpu.takes` names (torch's own checks stood in for)."""
    import contextlib
    from types import SimpleNamespace

    gpu = SimpleNamespace(capability=(9, 0), cudnn=91600, takes={"cudnn", "flash", "efficient"})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu.capability)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: gpu.cudnn)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    for name, check in sdpa_spatial._CAN_USE.items():
        monkeypatch.setattr(torch.backends.cuda, check, lambda params, debug=False, name=name: name in gpu.takes)
    return gpu


def test_gpu_kernels_in_torch_s_order(pretend_gpu, deterministic_setting):
    """cuDNN first where torch itself puts it first (capability 9.x or 10.x, cuDNN past 9.15), FlashAttention first
    elsewhere; no memory-efficient kernel under deterministic algorithms; misaligned rows take none."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        packed = torch.empty(1, 2, 64, 6, 2, 64, device="cuda", dtype=torch.bfloat16)
        q, k, v = packed.unbind(3)[:3]
        assert sdpa_spatial.sdpa_kernel_for(q, k, v) == "cudnn"
        pretend_gpu.cudnn = 91500
        assert sdpa_spatial.sdpa_kernel_for(q, k, v) == "flash"
        pretend_gpu.capability, pretend_gpu.cudnn = (8, 9), 92000
        assert sdpa_spatial.gpu_order(torch.device("cuda")) == ("flash", "efficient", "cudnn")
        pretend_gpu.takes = {"efficient", "cudnn"}
        assert sdpa_spatial.sdpa_kernel_for(q, k, v) == "efficient"
        torch.use_deterministic_algorithms(True)
        assert sdpa_spatial.sdpa_kernel_for(q, k, v) == "cudnn"
        pretend_gpu.takes = set()
        assert sdpa_spatial.sdpa_kernel_for(q, k, v) is None
        pretend_gpu.takes = {"flash"}
        odd = torch.empty(1, 2, 64, 2, 65, device="cuda", dtype=torch.bfloat16).narrow(-1, 1, 64)  # 2 bytes in
        assert sdpa_spatial.sdpa_kernel_for(odd, odd, odd) is None
