"""LayerNorm fused with a packed projection whose blocks each carry their own LayerNorm affine.

``layer_norm_packed_linear(x, blocks, eps)`` takes blocks ``(gamma_i, beta_i, W_i, b_i)`` and computes

    y = [layer_norm(x, gamma_i, beta_i) @ W_i.T + b_i  for each block i]   x (..., C) -> y (..., sum of W_i rows)

concatenated on the last dimension, with one normalisation and one GEMM: each affine is folded into its
projection (``W_i * gamma_i``, ``W_i beta_i + b_i``). Blocks may share an affine (the q, k and v projections of
one attention branch do). Saved for backward: ``x`` and its per-row mean and rstd, nothing else. The
parameters are referenced, not copied: the folded weight is rebuilt in the backward instead of stored, and
the normalised input is recomputed only when a weight gradient is needed. Every parameter gets a gradient only
when it requires one, so a frozen block costs no weight-gradient GEMM.

Under autocast it computes as LayerNorm + Linear do there: the normalisation in x's dtype, the GEMMs in the
autocast dtype (the output too), parameter gradients in the parameters' dtype. The backward keeps the
forward's dtypes whatever the autocast state when it runs.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from pychop import autocast_state

Block = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # gamma, beta, W, b
PER_BLOCK = 4  # tensors in a block


def _folded(blocks) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight (sum R_i, C), bias (sum R_i,)) of the projection applied to the affine-free normalised input."""
    weight = torch.cat([w * gamma for gamma, _, w, _ in blocks])
    bias = torch.cat([torch.mv(w, beta) if b is None else torch.addmv(b, w, beta) for _, beta, w, b in blocks])
    return weight, bias


def _blocks(layout, params):
    """The (gamma, beta, W, b) blocks from their indices into the distinct parameters (-1: no bias)."""
    return [(params[g], params[c], params[w], params[b] if b >= 0 else None) for g, c, w, b in layout]


class LayerNormPackedLinear(torch.autograd.Function):
    """Each distinct parameter is one input (``layout`` indexes them per block): blocks that share an affine
    get its gradient summed here, and torch.compile, which refuses one tensor passed as two inputs, can trace
    it."""

    @staticmethod
    def forward(ctx, x, eps: float, layout, *params):
        features = x.shape[-1]
        rows = x.reshape(-1, features)
        dtype = autocast_state.compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            normed, mean, rstd = torch.native_layer_norm(rows, (features,), None, None, eps)
            weight, bias = _folded(_blocks(layout, params))
            out = torch.addmm(bias.to(dtype), normed.to(dtype), weight.to(dtype).t())
        ctx.save_for_backward(rows, mean, rstd, *params)
        ctx.eps, ctx.layout, ctx.input_shape = eps, layout, x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return LayerNormPackedLinear._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        """grad_out is in the forward's GEMM dtype; its GEMMs run in it, the rest in the inputs' dtypes."""
        rows, mean, rstd, *params = ctx.saved_tensors
        blocks = _blocks(ctx.layout, params)
        features = rows.shape[-1]
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        need_x, need = ctx.needs_input_grad[0], ctx.needs_input_grad[3:]
        grad_x = None
        if need_x:
            grad_normed = grad_rows @ _folded(blocks)[0].to(grad_rows.dtype)
            grad_x = torch.ops.aten.native_layer_norm_backward(
                grad_normed.to(rows.dtype), rows, (features,), mean, rstd, None, None, [True, False, False])[0]
            grad_x = grad_x.view(ctx.input_shape)
        grads = [None] * len(params)

        def accumulate(index, grad):
            grads[index] = grad if grads[index] is None else grads[index] + grad

        normed = None
        start = 0
        for (i_gamma, i_beta, i_w, i_b), (gamma, beta, w, _) in zip(ctx.layout, blocks):
            need_gamma, need_beta, need_w = need[i_gamma], need[i_beta], need[i_w]
            need_b = i_b >= 0 and need[i_b]
            block = grad_rows[:, start:start + w.shape[0]]
            start += w.shape[0]
            grad_bias = None  # of W beta + b
            if need_w or need_beta or need_b:
                grad_bias = block.sum(0, dtype=w.dtype)
            grad_weight = None  # of the folded W * gamma
            if need_w or need_gamma:
                if normed is None:
                    normed = torch.native_layer_norm(rows, (features,), None, None, ctx.eps)[0].to(block.dtype)
                grad_weight = (block.t() @ normed).to(w.dtype)
            if need_gamma:
                accumulate(i_gamma, (grad_weight * w).sum(0))
            if need_beta:
                accumulate(i_beta, grad_bias @ w)
            if need_w:
                accumulate(i_w, torch.addr(grad_weight * gamma, grad_bias, beta))
            if need_b:
                accumulate(i_b, grad_bias)
        return (grad_x, None, None, *grads)


def layer_norm_packed_linear(x: torch.Tensor, blocks: Sequence[Block], eps: float = 1e-5) -> torch.Tensor:
    """Concatenation over blocks ``(gamma, beta, W, b)`` of ``layer_norm(x, gamma, beta) @ W.T + b``: x (..., C),
    gamma and beta (C,), W (R_i, C), b (R_i,) or None, all one float dtype -> (..., sum R_i)."""
    if not blocks:
        raise ValueError("blocks must hold at least one (gamma, beta, weight, bias) block")
    features = x.shape[-1]
    params, layout = [], []

    def index(tensor):  # of `tensor` among the distinct parameters, added when new; -1 for None
        if tensor is None:
            return -1
        for i, seen in enumerate(params):
            if seen is tensor:
                return i
        params.append(tensor)
        return len(params) - 1

    for i, block in enumerate(blocks):
        if len(block) != PER_BLOCK:
            raise ValueError(f"blocks[{i}] must be (gamma, beta, weight, bias), got {len(block)} items")
        gamma, beta, w, b = block
        if w.dim() != 2 or w.shape[1] != features:
            raise ValueError(f"blocks[{i}] weight must have shape (rows, {features}), got {tuple(w.shape)}")
        if gamma.shape != (features,) or beta.shape != (features,):
            raise ValueError(f"blocks[{i}] gamma and beta must have shape ({features},), got {tuple(gamma.shape)} "
                             f"and {tuple(beta.shape)}")
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError(f"blocks[{i}] bias must have shape ({w.shape[0]},) or be None, got {tuple(b.shape)}")
        layout.append(tuple(index(t) for t in block))
    return LayerNormPackedLinear.apply(x, float(eps), tuple(layout), *params)
