"""Backend dispatch: names, the PYCHOP_BACKEND variable, 'auto', and why a backend cannot run."""

import warnings

import pytest
import torch

import pychop
from pychop.ops import backends
from tests.checks import runnable_backends


def inputs(device="cpu"):
    return [torch.randn(1, 2, 3, 1, 4, device=device) for _ in range(6)]


def test_every_backend_reports_status():
    status = pychop.available_backends(torch.device("cpu"))
    assert set(status) == set(pychop.BACKENDS)
    assert status["torch"] is None
    for name, reason in status.items():
        assert reason is None or name in reason, f"the reason for {name} must name it: {reason}"


def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(pychop.BackendUnavailable, match=r"backend 'cuda' runs on cuda tensors, these are on cpu"):
        pychop.parallel_st_attention(*inputs(), backend="cuda")


def test_auto_on_cpu_picks_an_available_backend_and_matches_torch():
    name = backends.resolve("auto", torch.device("cpu"))
    assert name in backends.AUTO_ORDER["cpu"]
    x = inputs()
    torch.testing.assert_close(pychop.parallel_st_attention(*x), pychop.parallel_st_attention(*x, backend="torch"))


def test_environment_variable_replaces_auto(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.resolve("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(pychop.BackendUnavailable, match="cuda"):
        backends.resolve("auto", torch.device("cpu"))
    assert backends.resolve("torch", torch.device("cpu")) == "torch", "an explicit backend wins"
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=r"PYCHOP_BACKEND must be one of"):
        backends.resolve("auto", torch.device("cpu"))


def test_triton_missing_is_reported(monkeypatch):
    real_find_spec = backends.importlib.util.find_spec
    monkeypatch.setattr(backends.importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    monkeypatch.setattr(backends, "_cache", {})
    with pytest.raises(pychop.BackendUnavailable, match=r"Triton is not installed"):
        backends.load("triton", torch.device("cpu"))


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["str", "torch.device"])
def test_available_backends_takes_a_string_or_a_device(device):
    assert pychop.available_backends(device) == pychop.available_backends(torch.device("cpu"))


def test_available_backends_refuses_what_is_not_a_device():
    with pytest.raises(ValueError, match=r"device must name a torch device such as 'cpu' or 'cuda', got 'gpu'"):
        pychop.available_backends("gpu")
    with pytest.raises(TypeError, match=r"device must be a torch.device or a string such as 'cpu', got 3.5"):
        pychop.available_backends(3.5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN in the Triton interpreter
@pytest.mark.parametrize("backend", runnable_backends("cpu"))
@pytest.mark.parametrize("name, causal", [("q_s", False), ("q_t", False), ("q_t", True)])
def test_a_nan_in_a_query_turns_exactly_its_output_row_nan(backend, name, causal):
    """A query row holding a NaN gives a NaN output row on every backend, and leaves every other row finite. (The
    torch reference propagates it itself: SDPA's CPU kernel returns zeros for that row.)"""
    tensors = dict(zip(("q_s", "k_s", "v_s", "q_t", "k_t", "v_t"), (torch.randn(1, 3, 5, 2, 8) for _ in range(6))))
    tensors[name][0, 1, 2, 1, 3] = float("nan")
    out = pychop.parallel_st_attention(**tensors, temporal_causal=causal, backend=backend)
    expected = torch.zeros(out.shape[:4], dtype=torch.bool)
    expected[0, 1, 2, 1] = True
    assert torch.equal(out.isnan().any(-1), expected) and out.isnan().all(-1)[0, 1, 2, 1]


# --------------------------------------------------------------------------------------------------------------
# auto never fails where the torch backend runs: launch failures fall back, with one warning.
# --------------------------------------------------------------------------------------------------------------

def launch_failures():
    """The failures of a fused backend that can compile or launch nothing for some inputs, as raised."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    return {"out-of-resources": OutOfResources(106496, 101376, "shared memory"),
            "compile-error": CompilationError("def kernel(): ...", None, "unsupported layout"),
            "no-kernel-image": RuntimeError("CUDA error: no kernel image is available for execution on the device"),
            "extension-launch": RuntimeError("pychop._C CUDA launch failed: invalid device function")}


def raising(error):
    def kernel(*args, **kwargs):
        raise error
    return kernel


needs_cpp = pytest.mark.skipif(pychop.available_backends("cpu")["cpp"] is not None, reason="needs the cpp backend")


@pytest.fixture
def no_failures_yet(monkeypatch):
    monkeypatch.setattr(backends, "_failures", {})


@needs_cpp
@pytest.mark.parametrize("spatial_path", ["sdpa", "kernel"])
@pytest.mark.parametrize("stage", ["forward", "backward"])
@pytest.mark.parametrize("failure", list(launch_failures()))
def test_auto_falls_back_on_a_launch_failure_with_one_warning(failure, stage, spatial_path, monkeypatch,
                                                              no_failures_yet):
    """The cpp kernels raise as a GPU backend's would: auto goes on with the torch backend (the last of the CPU's
    order), warns once naming the reason, and computes what the torch backend computes, forward and backward,
    then and in later calls of that kind, which warn no more."""
    from pychop.ops import extension_attention

    error = launch_failures()[failure]
    monkeypatch.setattr(extension_attention, stage, raising(error))
    x = [t.requires_grad_() for t in inputs()]
    dout = torch.randn(1, 2, 3, 1, 4)
    expected = pychop.parallel_st_attention(*x, temporal_causal=True, backend="torch")
    expected_grads = torch.autograd.grad(expected, x, dout)
    with pytest.warns(RuntimeWarning, match=rf"backend 'cpp' cannot run these inputs \({type(error).__name__}"):
        out = pychop.parallel_st_attention(*x, temporal_causal=True, spatial_path=spatial_path)
        grads = torch.autograd.grad(out, x, dout)
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        again = pychop.parallel_st_attention(*x, temporal_causal=True, spatial_path=spatial_path)
        torch.autograd.grad(again, x, dout)
    torch.testing.assert_close(again, expected)


@needs_cpp
@pytest.mark.parametrize("failure", list(launch_failures()))
def test_a_named_backend_raises_its_launch_failure(failure, monkeypatch, no_failures_yet):
    from pychop.ops import extension_attention

    error = launch_failures()[failure]
    monkeypatch.setattr(extension_attention, "forward", raising(error))
    with pytest.raises(type(error)):
        pychop.parallel_st_attention(*inputs(), backend="cpp")
    monkeypatch.setenv(backends.ENV_VAR, "cpp")  # named through the environment, too
    with pytest.raises(type(error)):
        pychop.parallel_st_attention(*inputs())


@needs_cpp
@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access was encountered"),
                                   torch.cuda.OutOfMemoryError("CUDA out of memory"), ValueError("a bug")],
                         ids=["illegal-access", "out-of-memory", "other"])
def test_auto_passes_on_every_other_error(error, monkeypatch, no_failures_yet):
    """Only a kernel that cannot launch is a reason to take another backend: a fault, running out of memory (the
    torch backend needs more) or a bug raises."""
    from pychop.ops import extension_attention

    monkeypatch.setattr(extension_attention, "forward", raising(error))
    with pytest.raises(type(error)):
        pychop.parallel_st_attention(*inputs(), spatial_path="kernel")


def test_launch_failures_are_named():
    for error in launch_failures().values():
        assert type(error).__name__ in backends.launch_failure(error)
    assert "unsupported layout" in backends.launch_failure(launch_failures()["compile-error"])
    assert backends.launch_failure(pychop.BackendUnavailable("backend 'cuda': no GPU")) is not None
    for fault in ("CUDA error: an illegal memory access was encountered",
                  "pychop._C CUDA launch failed: misaligned address"):
        assert backends.launch_failure(RuntimeError(fault)) is None


def test_fallbacks_follow_the_auto_order(monkeypatch, no_failures_yet):
    kind = ("cpu", torch.float32)
    assert backends.fallbacks("torch", torch.device("cpu"), kind) == ["torch"]
    expected = ["cpp", "torch"] if pychop.available_backends("cpu")["cpp"] is None else ["torch"]
    assert backends.fallbacks("cpp", torch.device("cpu"), kind) == expected
    backends._failures[("cpp", kind)] = "pretend"
    assert backends.fallbacks("cpp", torch.device("cpu"), kind) == ["torch"]
    assert backends.fallbacks("cpp", torch.device("cpu"), ("cpu", torch.bfloat16)) == expected


def test_a_backend_that_cannot_load_is_skipped_silently(monkeypatch):
    """Not built, not installed, no GPU: auto takes the next backend without a warning, as before any launch."""
    def unavailable(device):
        raise pychop.BackendUnavailable("backend 'cpp': pretend it failed to build")

    monkeypatch.setitem(backends._LOADERS, "cpp", unavailable)
    monkeypatch.setattr(backends, "_cache", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", torch.device("cpu")) == "torch"
        pychop.parallel_st_attention(*inputs())


def test_device_guard_makes_the_tensors_device_current():
    """Every fused launch runs under the tensors' device (Triton and the extension launch on the current one)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pychop.ops.attention import device_guard

    with FakeTensorMode():
        x = torch.empty(2, device="cuda:1")
    guard = device_guard(x)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(device_guard(torch.empty(2)), torch.cuda.device)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", [name for name in runnable_backends("cuda") if name != "torch"]
                         if torch.cuda.is_available() else [])
def test_tensors_on_a_device_that_is_not_current(backend):
    x = [t.to("cuda:1") for t in inputs()]
    with torch.cuda.device(0):
        out = pychop.parallel_st_attention(*x, backend=backend, spatial_path="kernel")
    torch.testing.assert_close(out, pychop.parallel_st_attention(*x, backend="torch"), rtol=1e-4, atol=1e-4)
