"""Backend dispatch: names, the PYCHOP_BACKEND variable, 'auto', and why a backend cannot run."""

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
