"""Backend dispatch: names, the PYCHOP_BACKEND variable, 'auto', and why a backend cannot run."""

import pytest
import torch

import pychop
from pychop.ops import backends


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
