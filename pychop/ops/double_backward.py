"""``scaled_dot_product_attention`` that is differentiable twice, for the torch backend.

SDPA's fused kernels (flash and memory-efficient, on the CPU and on GPUs) have no double backward: a gradient
penalty (``torch.autograd.grad(..., create_graph=True)`` and a backward of its result) fails in them. ``sdpa``
calls SDPA as it is, so the forward and the first-order backward run SDPA's own kernels unchanged, and puts an
identity node after it (``_TwiceDifferentiable``) that saves nothing SDPA does not save already (its inputs).
In a plain backward the node passes the output gradient on to SDPA's backward. In a backward that builds a
graph (``create_graph=True``: grad mode is on inside it) it computes the input gradients instead from SDPA's
math path, recomputed on the saved inputs with a graph, and SDPA's kernel backward does not run: the result
is differentiable again, to any order. Under ``torch.compile`` the node is left out (compiled graphs are
differentiated once here).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


class _TwiceDifferentiable(torch.autograd.Function):
    """Identity on SDPA's output ``out``; its backward is described in the module docstring."""

    @staticmethod
    def forward(ctx, out, q, k, v, attn_mask, scale):
        ctx.save_for_backward(q, k, v)
        ctx.attn_mask, ctx.scale = attn_mask, scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        if not torch.is_grad_enabled():  # a plain backward: SDPA's own
            return grad_out, None, None, None, None, None
        q, k, v = ctx.saved_tensors
        wanted = [x for x, need in zip((q, k, v), ctx.needs_input_grad[1:4]) if need]
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.attn_mask, scale=ctx.scale)
        found = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True))
        return (None, *[next(found) if need else None for need in ctx.needs_input_grad[1:4]], None, None)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: Optional[torch.Tensor] = None,
         scale: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)``, differentiable twice (see
    the module docstring). ``attn_mask`` is a constant (no gradient reaches it)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    if (not torch.is_grad_enabled() or torch.compiler.is_compiling()
            or not (q.requires_grad or k.requires_grad or v.requires_grad)):
        return out
    return _TwiceDifferentiable.apply(out, q, k, v, attn_mask, scale)
