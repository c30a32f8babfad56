"""The spatial-temporal self-attention block of a video UNet, in serial and in parallel (Mobius) form.

Both map tokens ``x`` (B, T, S, C) to the same shape and own the same parameters, two ``AttentionBranch``
modules (``spatial``, ``temporal``), so either side can be frozen and state dicts load across forms:

    serial:    y = x + A_s(x);  out = y + A_t(y)
    parallel:  out = x + A_s(x) + A_t(x)

``ParallelSTBlock`` is one LayerNorm + C -> 6C GEMM (``pychop.ops.layer_norm_packed_linear``), one fused
``parallel_st_attention(..., combine="stack")`` on views of the packed projection and one 2C -> C GEMM for both
output projections with the residual. Saved for backward with a fused backend: x, its LayerNorm statistics, the
packed projection and the stacked attention output (9 (B, T, S, C) activations); with
``recompute_projection=True`` the packed projection is recomputed in the backward instead (3). The design and
its memory arithmetic: docs/design.md, section 7.

With ``frame_group`` set (``pychop.distributed.shard_frames``), x holds this rank's frames of videos sharded over a
process group and the temporal branch attends over all of them (``pychop.ops.frame_parallel``; docs/design.md,
section 9).
"""


from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

import pychop
from pychop import autocast_state
from pychop.ops.frame_parallel import frame_parallel_attention
from pychop.ops.layer_norm_linear import layer_norm_packed_linear
from pychop.ops.validation import check_flag, check_window

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

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Diffusers-style self-attention over the L axis of (N, L, C) tokens: returns A(tokens), (N, L, C)."""
        n, length, dim = tokens.shape
        normed = self.norm(tokens)
        q, k, v = (proj(normed).view(n, length, self.heads, -1).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(n, length, dim))

    def over_frames(self, x: torch.Tensor, frame_group, backend: str = "auto") -> torch.Tensor:
        """``forward`` on the (B*S, T, C) pixel sequences of x (B, T, S, C), returned as (B, T, S, C), through
        ``pychop.temporal_attention`` with the frames sharded over ``frame_group`` (x: this rank's frames)."""
        B, T, S, C = x.shape
        normed = self.norm(x)
        q, k, v = (proj(normed).view(B, T, S, self.heads, -1) for proj in (self.to_q, self.to_k, self.to_v))
        out = pychop.temporal_attention(q, k, v, backend=backend, frame_group=frame_group)
        return self.to_out(out.reshape(B, T, S, C))

    def qkv_blocks(self):
        """The (gamma, beta, W, b) blocks of q, k and v for ``layer_norm_packed_linear``: one shared affine."""
        return [(self.norm.weight, self.norm.bias, proj.weight, proj.bias)
                for proj in (self.to_q, self.to_k, self.to_v)]


def check_tokens(x: torch.Tensor, dim: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be tokens of shape (B, T, S, C={dim}), got {shape}")


class SerialSTBlock(nn.Module):
    """Spatial then temporal self-attention, each with its own residual: (B, T, S, C) -> (B, T, S, C).

    ``y = x + A_s(x); out = y + A_t(y)``, written the diffusers way (``scaled_dot_product_attention`` on
    permuted copies). Its parameters are ``ParallelSTBlock``'s: state dicts load across the two forms.

    Args:
        dim: channels C of the tokens; a multiple of ``heads``.
        heads: attention heads H (head dim C / H).
        qkv_bias: whether the q, k and v projections have a bias. Default False.
        eps: the LayerNorms' epsilon. Default 1e-5.

    Attribute ``frame_group`` (None, or a process group / ``FrameShards``, set by
    ``pychop.distributed.shard_frames``): x holds this rank's frames of videos sharded over it, and the temporal
    branch attends over all of them.
    """

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = False, eps: float = 1e-5):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.frame_group = None
        self.spatial = AttentionBranch(dim, heads, qkv_bias=qkv_bias, eps=eps)
        self.temporal = AttentionBranch(dim, heads, qkv_bias=qkv_bias, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tokens(x, self.dim)
        B, T, S, C = x.shape
        frames = x.reshape(B * T, S, C)
        frames = frames + self.spatial(frames)
        if self.frame_group is not None:
            y = frames.view(B, T, S, C)
            return y + self.temporal.over_frames(y, self.frame_group)
        pixels = frames.view(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)
        pixels = pixels + self.temporal(pixels)
        return pixels.view(B, S, T, C).transpose(1, 2).contiguous()


class ParallelSTBlock(nn.Module):
    """Spatial and temporal self-attention side by side on one input (Mobius): (B, T, S, C) -> (B, T, S, C).

    ``out = x + A_s(x) + A_t(x)``, through one fused ``pychop.parallel_st_attention`` call (see the module
    docstring). The spatial and temporal parameters are separate modules, ``block.spatial`` and
    ``block.temporal`` (``block.spatial.requires_grad_(False)`` freezes one side), the same as
    ``SerialSTBlock``'s: state dicts load across the two forms.

    Args:
        dim: channels C of the tokens; a multiple of ``heads``.
        heads: attention heads H (head dim C / H, at most 256).
        qkv_bias: whether the q, k and v projections have a bias. Default False.
        eps: the LayerNorms' epsilon. Default 1e-5.
        backend: the attention backend: ``"auto"`` (default: the fastest available), ``"torch"`` (the unfused
            reference), ``"triton"``, ``"cuda"`` or ``"cpp"``, as for ``pychop.parallel_st_attention``.
        temporal_causal, temporal_window, temporal_grad_window: the temporal branch's options, as for
            ``pychop.parallel_st_attention`` (defaults: every frame, no window, full gradient).
        recompute_projection: True: the (B, T, S, 6C) packed projection is not kept for backward but
            recomputed there (one more C -> 6C GEMM for 6 fewer (B, T, S, C) activations). Default False; an
            attribute that can be switched on an existing block.

    Attribute ``frame_group``: as for ``SerialSTBlock``, passed to the attention op.
    """

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = False, eps: float = 1e-5, backend: str = "auto",
                 temporal_causal: bool = False, temporal_window=None, temporal_grad_window=None,
                 recompute_projection: bool = False):
        super().__init__()
        self.dim, self.heads, self.eps, self.backend = dim, heads, eps, backend
        self.recompute_projection = recompute_projection
        self.frame_group = None
        self.temporal_options = dict(temporal_causal=temporal_causal, temporal_window=temporal_window,
                                     temporal_grad_window=temporal_grad_window)
        self.spatial = AttentionBranch(dim, heads, qkv_bias=qkv_bias, eps=eps)
        self.temporal = AttentionBranch(dim, heads, qkv_bias=qkv_bias, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tokens(x, self.dim)
        B, T, S, C = x.shape
        if self.frame_group is not None:
            o_s, o_t = self._frame_parallel_branches(x)
        else:
            packed = self.project(x)
            q_s, k_s, v_s, q_t, k_t, v_t = packed.view(B, T, S, 6, self.heads, C // self.heads).unbind(3)
            saving = RecomputedViews(self.project, x, packed) if self.recompute_projection else contextlib.nullcontext()
            with saving:
                o_s, o_t = pychop.parallel_st_attention(q_s, k_s, v_s, q_t, k_t, v_t, combine="stack",
                                                        backend=self.backend, **self.temporal_options).unbind(3)
        o_s, o_t = (branch.reshape(-1, C) for branch in (o_s, o_t))  # (N, C) views (of a stacked output: stride 2C)
        residual = x.reshape(-1, C)
        # The residual is added in the first GEMM, except under autocast, whose GEMMs would round it to their
        # lower precision: there it is added after them, in x's dtype, as the serial form adds it.
        fold_residual = o_s.dtype == x.dtype
        weight_s, weight_t = self.spatial.to_out.weight.t(), self.temporal.to_out.weight.t()
        out = torch.addmm(residual, o_s, weight_s) if fold_residual else torch.mm(o_s, weight_s)
        out = torch.addmm(out, o_t, weight_t)
        out.add_(self.spatial.to_out.bias + self.temporal.to_out.bias)  # addmm keeps no output: in place is safe
        if not fold_residual:
            out = residual + out
        return out.view(B, T, S, C)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The packed (B, T, S, 6C) projection q_s, k_s, v_s, q_t, k_t, v_t of LayerNorm(x)."""
        return layer_norm_packed_linear(x, self.spatial.qkv_blocks() + self.temporal.qkv_blocks(), self.eps)

    def project_spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The packed (B, T, S, 3C) projection q_s, k_s, v_s of LayerNorm(x)."""
        return layer_norm_packed_linear(x, self.spatial.qkv_blocks(), self.eps)

    def _frame_parallel_branches(self, x: torch.Tensor):
        """(o_s, o_t) of this rank's frames, the frames sharded over ``frame_group``. The spatial and the temporal
        q, k, v are projected apart (two 3C GEMMs for one 6C): the temporal ones, copied out by the all-to-all
        that regroups them, are then kept by nothing; and the branches come back apart, with no stacked copy."""
        B, T, S, C = x.shape
        heads = (B, T, S, 3, self.heads, C // self.heads)
        spatial = self.project_spatial(x)
        temporal = layer_norm_packed_linear(x, self.temporal.qkv_blocks(), self.eps)
        options = self.temporal_options
        checked = dict(causal=check_flag("temporal_causal", options["temporal_causal"]),
                       window=check_window("temporal_window", options["temporal_window"]),
                       grad_window=check_window("temporal_grad_window", options["temporal_grad_window"]))
        saving = (RecomputedViews(self.project_spatial, x, spatial) if self.recompute_projection
                  else contextlib.nullcontext())
        with saving:
            return frame_parallel_attention(dict(zip(("q_s", "k_s", "v_s"), spatial.view(heads).unbind(3))),
                                            dict(zip(("q_t", "k_t", "v_t"), temporal.view(heads).unbind(3))),
                                            frame_group=self.frame_group, scale=None, temporal_options=checked,
                                            backend=self.backend, combine="pair")


class RecomputedViews(torch.autograd.graph.saved_tensors_hooks):
    """Within it, tensors saved for backward that are views of ``packed`` are kept as (size, stride, offset)
    only; on the first unpack, ``packed`` is recomputed as ``project(x)`` (without grad, under the autocast
    state of the forward) and shared by every view until the last of them is released. ``x`` must be kept
    alive by the graph anyway (it is, as the input of the projection's LayerNorm), so nothing is held that
    would not be."""

    def __init__(self, project, x: torch.Tensor, packed: torch.Tensor):
        if packed.storage_offset() != 0 or not packed.is_contiguous():
            raise ValueError("RecomputedViews: packed must be a contiguous tensor at offset 0")
        storage = packed.untyped_storage().data_ptr()
        recipe = {"project": project, "x": x, "packed": None, "autocast": autocast_state.current()}

        def pack(tensor):
            if tensor.untyped_storage().data_ptr() != storage:
                return tensor
            return recipe, tensor.size(), tensor.stride(), tensor.storage_offset()

        def unpack(saved):
            if isinstance(saved, torch.Tensor):
                return saved
            state, size, stride, offset = saved
            if state["packed"] is None:
                with torch.no_grad(), autocast_state.restored(state["autocast"]):
                    state["packed"] = state["project"](state["x"])
            return state["packed"].as_strided(size, stride, offset)

        super().__init__(pack, unpack)


def make_st_block(mode: str, dim: int, heads: int, **options) -> nn.Module:
    """``SerialSTBlock`` for ``"serial"``, ``ParallelSTBlock`` for ``"parallel"``; options go to the parallel one."""
    if mode == "serial":
        return SerialSTBlock(dim, heads, **{k: v for k, v in options.items() if k in ("qkv_bias", "eps")})
    if mode == "parallel":
        return ParallelSTBlock(dim, heads, **options)
    raise ValueError(f"st_mode must be one of {ST_MODES}, got {mode!r}")
