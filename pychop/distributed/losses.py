"""Splitting a video over the frame group, and the loss each rank backpropagates.

The objective of a frame-sharded step is the single-process one: the mean of a per-element loss over all frames
of the videos. Rank r of a frame group of P ranks holds ``n_r`` of the ``N = sum n_r`` elements and computes
their sum ``s_r``; the mean is ``sum_r s_r / N``. Training wrappers average parameter gradients over ranks (DDP,
FSDP2), so each rank backpropagates ``P * s_r / N`` (``frame_mean``): their average over the group is the
mean. With every rank holding as many frames this is the local mean, the usual data-parallel loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pychop.ops.frame_shards import FrameShards


def local_frames(video: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's contiguous block of ``video``'s frames (on dimension ``dim``), split over ``group`` as
    ``FrameShards.split`` does (the first ``T % P`` ranks one frame more): a view."""
    shards = FrameShards.split(group, video.shape[dim])
    return video.narrow(dim, shards.offset, shards.local_frames)


def frame_mean(local_sum: torch.Tensor, local_count: int, group) -> torch.Tensor:
    """``P * local_sum / N``: the loss a rank of ``group`` (P ranks) backpropagates so that the average over the
    group (what DDP and FSDP2 take of the gradients) is the mean over all ``N`` elements, ``N`` the sum of the
    ranks' ``local_count`` (one ``all_reduce``). ``local_sum``: this rank's elements' losses, summed."""
    total = torch.tensor([float(local_count)], dtype=torch.float64, device=local_sum.device)
    dist.all_reduce(total, group=group)
    return local_sum * (group.size() / total.item())
