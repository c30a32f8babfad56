"""The other layers that mix frames, for frames sharded over a process group (``pychop.ops.frame_shards``).

- ``frame_group_norm(x, num_groups, weight, bias, eps, frame_group)``: GroupNorm whose statistics span frames
  (AnimateDiff's motion modules and pychop's ``TemporalConv`` normalise (B, C, T, H, W) videos per group of
  channels over all frames): each rank sums its frames' values and squares, one ``all_reduce`` adds the sums over
  the group, and every rank normalises its frames with the statistics of all of them. The backward reduces the
  two sums its input gradient needs (of ``g = dy * weight`` and of ``g * x_hat``) the same way. Saved for
  backward: ``x`` and the per-(sample, group) mean and rstd, as ``torch.nn.functional.group_norm`` saves. The
  sums are taken in float32 (float64 for float64 inputs): ``var = E[x^2] - mean^2``.
- ``frame_halo(x, dim, width, frame_group)``: ``x`` with ``width`` frames of each neighbouring rank on either side
  (zeros beyond the first and last frame of the video, as a convolution's zero padding), for a temporal
  convolution of kernel ``2 * width + 1`` run without padding. The backward returns the halo's gradient to the
  rank that owns those frames. One ``all_to_all_single`` each way, sending only to the two neighbours.

Parameter gradients (``weight``, ``bias``) are this rank's part; like every parameter gradient of a
frame-sharded model they are summed over the group by the training set-up (docs/distributed.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pychop.kernels.outputs import new_output
from pychop.ops import frame_shards
from pychop.ops.frame_shards import FrameShards


def _sum_over_group(values: torch.Tensor, shards: FrameShards) -> torch.Tensor:
    dist.all_reduce(values, group=shards.group)
    return values


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel (C,) tensor shaped to broadcast over x (N, C, *)."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


class _FrameGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups: int, eps: float, shards: FrameShards):
        acc = _accumulation_dtype(x.dtype)
        groups = x.reshape(x.shape[0], num_groups, -1).to(acc)
        local = torch.stack([groups.sum(-1), groups.square().sum(-1)]).flatten()
        sums = _sum_over_group(torch.cat([local, local.new_tensor([float(groups.shape[-1])])]), shards)
        count = sums[-1]
        mean, square = (sums[:-1] / count).view(2, x.shape[0], num_groups)
        rstd = (square - mean.square()).clamp_min(0).add(eps).rsqrt()
        y = ((groups - mean[..., None]) * rstd[..., None]).view(x.shape).to(x.dtype)
        if weight is not None:
            y = y * _channel_view(weight, x)
        if bias is not None:
            y = y + _channel_view(bias, x)
        ctx.save_for_backward(x, weight, mean, rstd, count)
        ctx.num_groups, ctx.shards = num_groups, shards
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError("frame_group_norm is differentiable once (create_graph=True is not supported)")
        x, weight, mean, rstd, count = ctx.saved_tensors
        acc = mean.dtype
        shape = (x.shape[0], ctx.num_groups, -1)
        x_hat = (x.reshape(shape).to(acc) - mean[..., None]) * rstd[..., None]
        channel_dims = [0, *range(2, x.dim())]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = (dy.to(acc) * x_hat.view(x.shape)).sum(channel_dims).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = dy.sum(channel_dims, dtype=acc).to(dy.dtype)
        if ctx.needs_input_grad[0]:
            g = dy.to(acc) if weight is None else dy.to(acc) * _channel_view(weight, x).to(acc)
            g = g.reshape(shape)
            sums = _sum_over_group(torch.stack([g.sum(-1), (g * x_hat).sum(-1)]), ctx.shards)
            mean_g, mean_gx = sums[0, ..., None] / count, sums[1, ..., None] / count
            grad_x = (rstd[..., None] * (g - mean_g - x_hat * mean_gx)).view(x.shape).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None


def frame_group_norm(x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5, *,
                     frame_group) -> torch.Tensor:
    """``torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)`` of the whole video, on this rank's
    frames: x (N, C, T_r, ...), frames on dim 2 (a video (B, C, T, H, W)), weight and bias (C,) or None; the
    statistics over every rank's frames (see the module docstring). Returns x's shape and dtype. ``frame_group``: a
    ProcessGroup or FrameShards, as for the attention ops."""
    if x.dim() < 3 or x.shape[1] % num_groups:
        raise ValueError(f"x must be (N, C, T, ...) with C divisible by num_groups={num_groups}, got {tuple(x.shape)}")
    shards = frame_shards.resolve(frame_group, x.shape[2], device=x.device,
                                  agree=(x.shape[0], x.shape[1], *x.shape[3:]), agree_names="(N, C, ...)")
    return _FrameGroupNorm.apply(x, weight, bias, num_groups, float(eps), shards)


class _FrameHalo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim: int, width: int, shards: FrameShards):
        ctx.dim, ctx.width, ctx.shards = dim, width, shards
        before, after = _exchange(x.narrow(dim, 0, width), x.narrow(dim, x.shape[dim] - width, width), shards)
        return torch.cat([before, x, after], dim)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("frame_halo is differentiable once (create_graph=True is not supported)")
        dim, width = ctx.dim, ctx.width
        frames = grad.shape[dim] - 2 * width
        # The halo's gradient goes back to its owners: "before" to the previous rank, "after" to the next; from
        # them come the gradients of their halos, that is of my first and my last frames.
        from_previous, from_next = _exchange(grad.narrow(dim, 0, width),
                                             grad.narrow(dim, grad.shape[dim] - width, width), ctx.shards)
        grad_x = grad.narrow(dim, width, frames).clone()
        grad_x.narrow(dim, 0, width).add_(from_previous)
        grad_x.narrow(dim, frames - width, width).add_(from_next)
        return grad_x, None, None, None


def _exchange(to_previous, to_next, shards: FrameShards):
    """Sends ``to_previous`` to the previous rank of the group and ``to_next`` to the next (tensors of one
    shape); returns what they sent this way (the previous rank's ``to_next``, the next rank's
    ``to_previous``), zeros where there is no such rank."""
    rank, size = shards.rank, shards.size
    block = to_previous.numel()
    neighbours = [i for i in (rank - 1, rank + 1) if 0 <= i < size]
    counts = [block if i in neighbours else 0 for i in range(size)]  # as much back as sent: the same sizes
    recv = new_output((block * len(neighbours),), dtype=to_previous.dtype, device=to_previous.device)
    if neighbours:
        send = torch.cat([(to_previous if i < rank else to_next).reshape(-1) for i in neighbours])
        dist.all_to_all_single(recv, send, counts, counts, group=shards.group)
    pieces = iter(recv.split(block))
    from_previous = next(pieces).view(to_previous.shape) if rank > 0 else torch.zeros_like(to_previous)
    from_next = next(pieces).view(to_next.shape) if rank < size - 1 else torch.zeros_like(to_next)
    return from_previous, from_next


def frame_halo(x: torch.Tensor, dim: int, width: int, *, frame_group) -> torch.Tensor:
    """``x`` (this rank's frames along ``dim``) with ``width`` frames of the neighbouring ranks' on each side,
    zeros past the ends of the video (see the module docstring): ``x.shape[dim] + 2 * width`` frames. Every rank
    must hold at least ``width`` frames. ``frame_group``: a ProcessGroup or FrameShards."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    others = tuple(size for i, size in enumerate(x.shape) if i != dim % x.dim())
    shards = frame_shards.resolve(frame_group, x.shape[dim], device=x.device, agree=others,
                                  agree_names="sizes besides the frames")
    if min(shards.counts) < width:
        raise ValueError(f"frame_halo: every rank must hold at least width={width} frames, the counts are "
                         f"{shards.counts}")
    return _FrameHalo.apply(x, dim % x.dim(), width, shards)
