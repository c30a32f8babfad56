"""Second-order gradients (a gradient penalty, create_graph=True) through the torch backend, the fallback the fused
backends' error names: exact against gradgradcheck's finite differences in float64 and, in float32, against the
float64 loop-level reference; the first-order backward keeps SDPA's own kernels."""

import pytest
import torch

from tests.checks import DEVICES, input_count, make_inputs, op_call, reference_call

SHAPE = (1, 3, 3, 1, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op, options", [("parallel", {}), ("temporal", {"causal": True}), ("temporal", {"window": 2}),
                                         ("spatial", {})], ids=["parallel", "temporal-causal", "temporal-window2",
                                                                "spatial"])
def test_torch_backend_passes_gradgradcheck(op, options, device, seed):
    """Without a grad window (which detaches keys on purpose, so finite differences do not apply to it)."""
    inputs = make_inputs(SHAPE, torch.float64, device, input_count(op))
    fn = lambda *x: op_call(op, x, backend="torch", **options)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True), f"seed={seed}"


def penalty_grads(fn, inputs):
    """Gradients on the inputs of the squared norm of d(sum(out^2))/d(first input), built with create_graph."""
    out = fn(*inputs)
    grad, = torch.autograd.grad(out.square().sum(), inputs[0], create_graph=True)
    return torch.autograd.grad(grad.square().sum(), inputs, allow_unused=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", [{}, {"causal": True, "grad_window": 1}], ids=["none", "causal-grad_window1"])
@pytest.mark.parametrize("op", ["parallel", "temporal"])
def test_float32_gradient_penalty_matches_float64_reference(op, options, device, seed):
    inputs = make_inputs((2, 4, 6, 2, 8), torch.float32, device, input_count(op))
    actual = penalty_grads(lambda *x: op_call(op, x, backend="torch", **options), inputs)
    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    expected = penalty_grads(lambda *x: reference_call(op, x, **options), inputs64)
    for k, (a, e) in enumerate(zip(actual, expected)):
        e = torch.zeros_like(a, dtype=torch.float64) if e is None else e
        error = ((a.double() - e).abs().max() / e.abs().max().clamp_min(1.0)).item()
        assert error < 1e-4, f"input {k}: {error:.3g} (seed={seed})"
