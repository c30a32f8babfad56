"""pychop.distributed: long videos across processes, the frames of each video sharded over a process group.

- ``shard_frames(model, group)``: makes pychop's ``VideoUNet`` or diffusers' ``UNetMotionModel`` frame-parallel
  (``FrameSharding``, ``.remove()``); every rank runs the model on its contiguous block of frames.
- ``local_frames(video, group, dim)``: this rank's block of a whole video, split as ``FrameShards.split`` does.
- ``frame_mean(local_sum, local_count, group)``: the per-rank loss for the mean over all frames.
- ``FrameShards``: how the frames are split; the ops below take it or a bare group (``frame_group=`` of
  ``pychop.parallel_st_attention`` and ``temporal_attention``, ``pychop.ops.frame_mixing``).

User guide: docs/distributed.md.
"""

from pychop.distributed.losses import frame_mean, local_frames
from pychop.distributed.shard import FrameSharding, shard_frames
from pychop.ops.frame_shards import FrameShards

__all__ = ["shard_frames", "FrameSharding", "FrameShards", "local_frames", "frame_mean"]
