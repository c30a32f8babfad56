"""LayerNorm fused with one packed linear projection whose weight is made of separately trainable blocks.

``layer_norm_packed_linear(x, weights, biases, eps)`` computes

    y = layer_norm(x) @ cat(weights).T + cat(biases)          x (..., C) -> y (..., sum of the blocks' rows)

with one normalisation and one GEMM. Saved for backward: ``x``, the per-row mean and rstd and the concatenated
weight; the normalised input is recomputed in the backward instead of kept (one (N, C) activation less than
LayerNorm followed by a linear layer). The backward computes a weight block's (and bias block's) gradient only
when that block requires it, so a frozen block costs no weight-gradient GEMM.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


class LayerNormPackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps: float, num_blocks: int, *weights_then_biases):
        weights, biases = weights_then_biases[:num_blocks], weights_then_biases[num_blocks:]
        features = x.shape[-1]
        rows = x.reshape(-1, features)
        normed, mean, rstd = torch.native_layer_norm(rows, (features,), None, None, eps)
        weight = torch.cat(weights)
        if any(b is not None for b in biases):
            bias = torch.cat([torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b
                              for w, b in zip(weights, biases)])
            out = torch.addmm(bias, normed, weight.t())
        else:
            out = normed @ weight.t()
        ctx.save_for_backward(rows, mean, rstd, weight)
        ctx.eps, ctx.num_blocks, ctx.input_shape = eps, num_blocks, x.shape
        ctx.block_sizes = [w.shape[0] for w in weights]
        ctx.has_bias = [b is not None for b in biases]
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        rows, mean, rstd, weight = ctx.saved_tensors
        features, n = rows.shape[-1], ctx.num_blocks
        grad_rows = grad_out.reshape(-1, weight.shape[0])
        need = ctx.needs_input_grad
        need_weight, need_bias = need[3:3 + n], need[3 + n:]
        grad_x = None
        if need[0]:
            grad_normed = grad_rows @ weight
            grad_x = torch.ops.aten.native_layer_norm_backward(
                grad_normed, rows, (features,), mean, rstd, None, None, [True, False, False])[0]
            grad_x = grad_x.view(ctx.input_shape)
        normed = None
        if any(need_weight):
            normed = torch.native_layer_norm(rows, (features,), None, None, ctx.eps)[0]
        grad_weights, grad_biases, start = [], [], 0
        for size, wants_weight, wants_bias, has_bias in zip(ctx.block_sizes, need_weight, need_bias, ctx.has_bias):
            block = grad_rows[:, start:start + size]
            grad_weights.append(block.t() @ normed if wants_weight else None)
            grad_biases.append(block.sum(0) if wants_bias and has_bias else None)
            start += size
        return (grad_x, None, None, *grad_weights, *grad_biases)


def layer_norm_packed_linear(x: torch.Tensor, weights: Sequence[torch.Tensor],
                             biases: Sequence[Optional[torch.Tensor]], eps: float = 1e-5) -> torch.Tensor:
    """layer_norm(x) (no affine) @ cat(weights).T + cat(biases); each weight block (rows_i, C) and bias block
    (rows_i,) or None gets its own gradient, computed only when it requires one. x: (..., C), any float dtype."""
    if len(weights) != len(biases) or not weights:
        raise ValueError(f"weights and biases must be non-empty and of one length, got {len(weights)} and "
                         f"{len(biases)}")
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"weights[{i}] must have shape (rows, {x.shape[-1]}), got {tuple(w.shape)}")
    return LayerNormPackedLinear.apply(x, float(eps), len(weights), *weights, *biases)
