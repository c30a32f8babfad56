"""pychop.ops.layer_norm_packed_linear against F.layer_norm + F.linear per block, in float64 and under autocast."""

import pytest
import torch
import torch.nn.functional as F

from pychop.ops import layer_norm_packed_linear
from tests.checks import relative_error


def test_layer_norm_packed_linear_matches_plain_and_skips_frozen_blocks(seed):
    """Two blocks share a trainable affine, a third has its own frozen one: values and every gradient against
    layer_norm + linear per block, in float64; frozen parameters get no gradient."""
    C = 8
    x = torch.randn(4, 5, C, dtype=torch.float64, requires_grad=True)
    param = lambda *shape: torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    gamma1, beta1, gamma2, beta2 = param(C), param(C), param(C), param(C)
    w1, w2, w3, b1, b3 = param(6, C), param(3, C), param(5, C), param(6), param(5)
    for frozen in (gamma2, beta2, w3, b3):
        frozen.requires_grad_(False)
    blocks = [(gamma1, beta1, w1, b1), (gamma1, beta1, w2, None), (gamma2, beta2, w3, b3)]
    out = layer_norm_packed_linear(x, blocks, eps=1e-5)
    expected = torch.cat([F.linear(F.layer_norm(x, (C,), g, b, eps=1e-5), w, bias) for g, b, w, bias in blocks], -1)
    assert relative_error(out, expected) < 1e-12
    dout = torch.randn_like(out)
    trainable = {"x": x, "gamma1": gamma1, "beta1": beta1, "w1": w1, "w2": w2, "b1": b1}
    grads = torch.autograd.grad(out, list(trainable.values()), dout, retain_graph=True)
    expected_grads = torch.autograd.grad(expected, list(trainable.values()), dout)
    for name, g, e in zip(trainable, grads, expected_grads):
        assert relative_error(g, e) < 1e-10, name
    out.backward(dout)
    assert all(p.grad is None for p in (gamma2, beta2, w3, b3))


def test_layer_norm_packed_linear_under_autocast_computes_as_layer_norm_and_linear(seed):
    """Under bfloat16 autocast: a bfloat16 output and float32 gradients, as F.layer_norm + F.linear give, each
    within 3x their error against float64 (plus a floor)."""
    C = 16
    x = torch.randn(4, 5, C, requires_grad=True)
    param = lambda *shape: torch.randn(*shape, requires_grad=True)
    gamma, beta = torch.empty(C).uniform_(0.5, 1.5).requires_grad_(), param(C)
    blocks = [(gamma, beta, param(24, C), param(24)), (gamma, beta, param(8, C), None)]
    leaves = [x, gamma, beta, blocks[0][2], blocks[0][3], blocks[1][2]]

    def plain(x, blocks):
        return torch.cat([F.linear(F.layer_norm(x, (C,), g, b, eps=1e-5), w, bias) for g, b, w, bias in blocks], -1)

    dout = torch.randn(4, 5, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_out, base_out = layer_norm_packed_linear(x, blocks), plain(x, blocks)
        fused_grads = torch.autograd.grad(fused_out, leaves, dout)
        base_grads = torch.autograd.grad(base_out, leaves, dout)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, g64, b64, w0, c0, w1 = leaves64
    ref_out = plain(x64, [(g64, b64, w0, c0), (g64, b64, w1, None)])
    ref_grads = torch.autograd.grad(ref_out, leaves64, dout.double())
    names = ("out", "x", "gamma", "beta", "w0", "b0", "w1")
    for name, a, b, r in zip(names, (fused_out, *fused_grads), (base_out, *base_grads), (ref_out, *ref_grads)):
        assert a.dtype == b.dtype, f"{name}: {a.dtype}, layer_norm + linear give {b.dtype}"
        bound = 3 * relative_error(b, r) + 1e-3
        assert relative_error(a, r) <= bound, f"{name}: error above {bound:.3g} (seed {seed})"


def test_layer_norm_packed_linear_saves_no_weight_copies():
    """Only x and its row statistics are saved: parameters are referenced, the folded weight is rebuilt."""
    C = 8
    x = torch.randn(16, C, requires_grad=True)
    gamma, beta, w = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True), torch.randn(24, C)
    params = {gamma.data_ptr(), beta.data_ptr(), w.data_ptr()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer_norm_packed_linear(x, [(gamma, beta, w, None)])
    new = [t for t in saved if t.data_ptr() not in params]
    assert sum(t.numel() for t in new) == 16 * C + 2 * 16, [tuple(t.shape) for t in new]


def test_layer_norm_packed_linear_rejects_bad_blocks():
    x = torch.randn(3, 8)
    affine = (torch.ones(8), torch.zeros(8))
    with pytest.raises(ValueError, match=r"blocks\[1\] weight must have shape \(rows, 8\)"):
        layer_norm_packed_linear(x, [(*affine, torch.randn(4, 8), None), (*affine, torch.randn(4, 7), None)])
    with pytest.raises(ValueError, match=r"blocks\[0\] gamma and beta must have shape \(8,\)"):
        layer_norm_packed_linear(x, [(torch.ones(7), torch.zeros(8), torch.randn(4, 8), None)])
    with pytest.raises(ValueError, match="at least one"):
        layer_norm_packed_linear(x, [])
