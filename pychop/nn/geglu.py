"""The GEGLU activation, keeping only its input for backward.

``geglu(projected)`` splits ``projected`` (..., 2F) on its last dimension into ``hidden, gate`` (..., F) each
and returns ``hidden * gelu(gate)``, as diffusers' ``GEGLU`` and the feed-forward of pychop's ``VideoUNet`` do
after their projection. Written as two ops, autograd keeps ``projected`` (for both factors) and ``gelu(gate)``
besides; here only ``projected`` is kept, and ``gelu(gate)`` is computed again in the backward: one GELU for
F fewer values per row. Values and gradients are those of the two ops (the same ops compute them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected):
        hidden, gate = projected.chunk(2, dim=-1)
        ctx.save_for_backward(projected)
        return hidden * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad):
        projected, = ctx.saved_tensors
        hidden, gate = projected.chunk(2, dim=-1)
        grad_hidden = grad * F.gelu(gate)
        grad_gate = torch.ops.aten.gelu_backward(grad * hidden, gate)
        return torch.cat([grad_hidden, grad_gate], dim=-1)


def geglu(projected: torch.Tensor) -> torch.Tensor:
    """``hidden * gelu(gate)`` of ``hidden, gate = projected.chunk(2, -1)``; saves only ``projected``."""
    if projected.shape[-1] % 2:
        raise ValueError(f"projected must have an even last dimension, got {tuple(projected.shape)}")
    return GEGLU.apply(projected)
