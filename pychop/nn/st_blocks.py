"""The spatial-temporal self-attention block of a video UNet, in serial and in parallel (Mobius) form.

Both forms map tokens ``x`` of shape (B, T, S, C) (batch, frames, spatial tokens per frame, channels) to the
same shape and own the same parameters, two ``AttentionBranch`` modules: ``spatial`` (attention within each
frame) and ``temporal`` (attention across frames, per token). Each branch has its own LayerNorm affine and its
own q, k, v and output projections, so either side can be frozen (``block.spatial.requires_grad_(False)``)
and a serial block's state dict loads into a parallel block and back. The two forms are different functions:

    serial:    y = x + A_s(x);  out = y + A_t(y)                     (as diffusers composes them)
    parallel:  out = x + A_s(x) + A_t(x)                             (Mobius: both read the same input)

with ``A(x) = attention(q, k, v of LayerNorm(x)) @ W_out + b_out``.

``SerialSTBlock`` is written the way diffusers writes it: per branch a LayerNorm, three projections, the view
to (N, H, L, D), ``scaled_dot_product_attention``, the transpose back and the output projection; the temporal
branch runs on a permuted (B*S, T, C) copy, and the result is permuted back.

``ParallelSTBlock`` is one LayerNorm, one C -> 6C GEMM, the attention, and one 2C -> C output projection
into the residual:

1. ``layer_norm_packed_linear`` normalises once and projects with the weight
   ``[W_qkv_s * gamma_s; W_qkv_t * gamma_t]`` (each branch's LayerNorm affine folded into its own projection,
   bias ``W_qkv beta``), producing the packed (B, T, S, 6, H, D) tensor; q_s ... v_t are views of it.
2. The attention runs on those views, on pychop's (B, T, S, H, D) layout: no permutes, no copies.
3. ``out = x + [o_s, o_t] [W_out_s; W_out_t] + b_out_s + b_out_t``, as two accumulating ``addmm`` calls on
   the residual (K = C each: the FLOPs of one 2C -> C GEMM, no concatenated copy of o_s and o_t).

Why the branches, not the sum: ``pychop.parallel_st_attention`` returns ``o_s + o_t``, and
``(o_s + o_t) W`` equals ``o_s W_s + o_t W_t`` only when ``W_s = W_t`` (nor can an output projection be
folded into per-head values: it mixes heads). Using the summed op would tie the two output projections into
one shared parameter, which cannot stay frozen on one side and trained on the other. So the block calls the
op's two branches, ``pychop.spatial_attention`` and ``pychop.temporal_attention`` (the same fused kernels,
the same layout and views), and keeps ``o_s`` and ``o_t`` apart. The cost against one summed call: two
kernel launches instead of one, and one (B, T, S, C) output more held for backward (``o_s`` and ``o_t``
instead of their sum; ``o_s`` only while the spatial output projection is trainable, since ``addmm`` saves
its input only for a weight gradient).

Saved for backward by the parallel block with a fused backend: the input x and its LayerNorm statistics, the
packed projection (B, T, S, 6C), ``o_s`` and ``o_t`` with the attention's row statistics, and the folded
(6C, C) projection weight: about 9 (B, T, S, C) activations. The serial block with the spatial side frozen
keeps about 11 (its input, spatial q, k, v and output, the permuted copy, the temporal LayerNorm output,
temporal q, k, v and output).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import pychop
from pychop.nn.fused_linear import layer_norm_packed_linear

ST_MODES = ("serial", "parallel")


class AttentionBranch(nn.Module):
    """One self-attention branch: LayerNorm, q / k / v projections (C -> C each) and an output projection."""

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = False, eps: float = 1e-5):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)

    def attend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Diffusers-style self-attention over the L axis of (N, L, C) tokens: returns A(tokens), (N, L, C)."""
        n, length, dim = tokens.shape
        normed = self.norm(tokens)
        q, k, v = (proj(normed).view(n, length, self.heads, -1).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(n, length, dim))

    def folded_qkv(self):
        """(weight (3C, C), bias (3C,)) of q, k, v applied to the un-affine LayerNorm output (affine folded in)."""
        # Per projection, so that autograd saves the parameters themselves rather than a concatenated copy.
        projections = (self.to_q, self.to_k, self.to_v)
        weight = torch.cat([proj.weight * self.norm.weight for proj in projections])
        bias = torch.cat([F.linear(self.norm.bias, proj.weight, proj.bias) for proj in projections])
        return weight, bias


def check_tokens(x: torch.Tensor, dim: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be tokens of shape (B, T, S, C={dim}), got {shape}")


class SerialSTBlock(nn.Module):
    """Spatial then temporal self-attention, each with its own residual: (B, T, S, C) -> (B, T, S, C)."""

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = False, eps: float = 1e-5):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.spatial = AttentionBranch(dim, heads, qkv_bias=qkv_bias, eps=eps)
        self.temporal = AttentionBranch(dim, heads, qkv_bias=qkv_bias, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tokens(x, self.dim)
        B, T, S, C = x.shape
        frames = x.reshape(B * T, S, C)
        frames = frames + self.spatial.attend(frames)
        pixels = frames.view(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)
        pixels = pixels + self.temporal.attend(pixels)
        return pixels.view(B, S, T, C).transpose(1, 2).contiguous()


class ParallelSTBlock(nn.Module):
    """Spatial and temporal self-attention side by side on one input (Mobius): (B, T, S, C) -> (B, T, S, C).

    ``backend`` selects the attention backend (``"auto"``: the fastest available, ``"torch"``: the unfused
    reference); the temporal options are those of ``pychop.temporal_attention``.
    """

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = False, eps: float = 1e-5, backend: str = "auto",
                 temporal_causal: bool = False, temporal_window=None, temporal_grad_window=None):
        super().__init__()
        self.dim, self.heads, self.eps, self.backend = dim, heads, eps, backend
        self.temporal_options = dict(causal=temporal_causal, window=temporal_window, grad_window=temporal_grad_window)
        self.spatial = AttentionBranch(dim, heads, qkv_bias=qkv_bias, eps=eps)
        self.temporal = AttentionBranch(dim, heads, qkv_bias=qkv_bias, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tokens(x, self.dim)
        B, T, S, C = x.shape
        w_s, b_s = self.spatial.folded_qkv()
        w_t, b_t = self.temporal.folded_qkv()
        packed = layer_norm_packed_linear(x, [w_s, w_t], [b_s, b_t], self.eps)
        q_s, k_s, v_s, q_t, k_t, v_t = packed.view(B, T, S, 6, self.heads, C // self.heads).unbind(3)
        o_s = pychop.spatial_attention(q_s, k_s, v_s, backend=self.backend)
        o_t = pychop.temporal_attention(q_t, k_t, v_t, backend=self.backend, **self.temporal_options)
        out = torch.addmm(x.reshape(-1, C), o_s.reshape(-1, C), self.spatial.to_out.weight.t())
        out = torch.addmm(out, o_t.reshape(-1, C), self.temporal.to_out.weight.t())
        out.add_(self.spatial.to_out.bias + self.temporal.to_out.bias)  # addmm keeps no output: in place is safe
        return out.view(B, T, S, C)


def make_st_block(mode: str, dim: int, heads: int, **options) -> nn.Module:
    """``SerialSTBlock`` for ``"serial"``, ``ParallelSTBlock`` for ``"parallel"``; options go to the parallel one."""
    if mode == "serial":
        return SerialSTBlock(dim, heads, **{k: v for k, v in options.items() if k in ("qkv_bias", "eps")})
    if mode == "parallel":
        return ParallelSTBlock(dim, heads, **options)
    raise ValueError(f"st_mode must be one of {ST_MODES}, got {mode!r}")
