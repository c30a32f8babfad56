"""``shard_frames(model, group)``: a whole video model made frame-parallel over a process group.

Every rank of ``group`` calls the model on its own contiguous block of the frames of the same videos and gets
those frames of the output: equal to the single-process model's output on all frames. What mixes frames is
handled, per model:

- ``pychop.models.VideoUNet`` (serial and parallel ``st_mode``): the temporal attention of every
  spatial-temporal block (``frame_group`` of ``SerialSTBlock`` / ``ParallelSTBlock``: all-to-all regrouping,
  ``pychop.ops.frame_parallel``) and every ``TemporalConv`` (GroupNorm statistics reduced over the group, a halo
  of one frame from each neighbour for the (3, 1, 1) convolution: ``pychop.ops.frame_mixing``).
- diffusers' ``UNetMotionModel``, serial or converted by ``convert_to_parallel``: the motion modules' GroupNorm
  over (C, T, H, W), their temporal self-attention (pychop's processor with the frame group) and their sinusoidal
  positional embeddings (by global frame index); ``pychop.distributed.motion``.

Any other model is refused by name. At every forward a pre-hook learns how many frames each rank holds (one
``all_gather`` of the frame count: ranks may hold different counts) and hands the split (a ``FrameShards``) to
the sharded layers. Parameter gradients are each rank's part: sum them over the group (docs/distributed.md:
DDP or FSDP2 over every rank, with the loss reduction shown there).
"""

from __future__ import annotations

import sys
from typing import Callable, List, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from pychop.models import VideoUNet
from pychop.nn import ParallelSTBlock, SerialSTBlock, TemporalConv
from pychop.ops.frame_shards import FrameShards

SUPPORTED = "pychop's VideoUNet and diffusers' UNetMotionModel"


class FrameSharding:
    """The changes ``shard_frames`` made; ``remove()`` undoes them. ``module_names``: the layers that take the
    frame group; ``shards``: the split of the latest forward (None before the first)."""

    def __init__(self, model: nn.Module, group, frame_dim: int, targets: List[Tuple[str, object]],
                 undo: List[Callable[[], None]]):
        self.model, self.group, self.frame_dim = model, group, frame_dim
        self._targets, self._undo = targets, undo
        self.module_names = [name for name, _ in targets]
        self.shards = None
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def _before_forward(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if not isinstance(sample, torch.Tensor) or sample.dim() != 5:
            raise ValueError(f"{type(module).__name__} sharded over frames expects its sample (a 5-D video tensor "
                             f"with this rank's frames on dim {self.frame_dim}) as the first argument")
        others = tuple(size for i, size in enumerate(sample.shape) if i != self.frame_dim)
        self.shards = FrameShards.gather(self.group, sample.shape[self.frame_dim], device=sample.device,
                                         agree=others, agree_names="sample sizes besides the frames")
        for _, target in self._targets:
            target.frame_group = self.shards

    def remove(self) -> None:
        self._hook.remove()
        for undo in reversed(self._undo):
            undo()
        self._targets, self._undo = [], []

    def __enter__(self) -> "FrameSharding":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _video_unet_targets(model: VideoUNet):
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, (SerialSTBlock, ParallelSTBlock, TemporalConv))]
    sharded = [name for name, module in targets if module.frame_group is not None]
    if sharded:
        raise ValueError(f"shard_frames: {sharded[0]} is already frame-sharded; remove() that sharding first")

    def undo():
        for _, module in targets:
            module.frame_group = None
    return targets, [undo]


def shard_frames(model: nn.Module, group, *, backend: str = "auto") -> FrameSharding:
    """Makes ``model`` (a ``VideoUNet`` or a diffusers ``UNetMotionModel``) frame-parallel over ``group``, in
    place; returns the handle (``.remove()``). Apply to the model itself, before wrapping it in DDP or FSDP.

    ``group``: the ``torch.distributed`` process group over which each video's frames are split (e.g.
    ``mesh.get_group("frames")`` of a 2-D DeviceMesh). ``backend``: the attention backend of the diffusers
    model's temporal attention (pychop's VideoUNet blocks keep their own). Inputs and outputs are this rank's
    frames: a VideoUNet's sample (B, T_r, C, H, W); a UNetMotionModel's sample (B, C, T_r, H, W) and its
    per-frame text (B*T_r, L, D). See the module docstring for what is handled.
    """
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("shard_frames: pass the model itself (model.module) and wrap it in DDP afterwards")
    if isinstance(model, VideoUNet):
        targets, undo = _video_unet_targets(model)
        return FrameSharding(model, group, 1, targets, undo)
    if "diffusers" in sys.modules:
        from pychop.distributed import motion
        if isinstance(model, motion.UNetMotionModel):
            targets, undo = motion.motion_targets(model, backend)
            return FrameSharding(model, group, 2, targets, undo)
    raise TypeError(f"shard_frames supports {SUPPORTED}; {type(model).__name__} is neither (its layers that "
                    "mix frames are not known to be handled)")
