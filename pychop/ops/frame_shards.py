"""How the frames of a batch of videos are split over a process group: ``FrameShards``.

Frame parallelism gives each rank of a ``torch.distributed`` process group a contiguous block of the frames of
the same videos: rank ``i`` of the group (in group rank order) holds ``counts[i] >= 1`` frames, global frames
``offset(i) .. offset(i) + counts[i] - 1``. The frame-parallel ops (``frame_group=`` of the attention ops,
``pychop.ops.frame_mixing``) take either a ``FrameShards`` or a bare process group; for a bare group they learn
the counts with one small ``all_gather`` per call (``FrameShards.gather``), which a caller that makes many calls
does once and passes on (``pychop.distributed.shard_frames`` does it once per model forward).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.distributed as dist


def split_sizes(total: int, parts: int) -> Tuple[int, ...]:
    """``total`` items in ``parts`` contiguous pieces as even as can be, the larger ones first (the sizes of
    ``torch.tensor_split``)."""
    return tuple(total // parts + (i < total % parts) for i in range(parts))


class FrameShards:
    """Frames split over ``group``: ``counts[i]`` consecutive frames on the group's rank ``i``.

    ``size``, ``rank`` (this process's rank in the group), ``num_frames`` (their sum), ``local_frames`` and
    ``offset`` (this rank's count and first global frame) and ``offsets`` (every rank's first frame) describe
    the split; ``global_rank(i)`` is the default-group rank of the group's rank ``i``.
    """

    def __init__(self, group, counts: Sequence[int]):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("frame sharding needs torch.distributed initialised (init_process_group)")
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
        counts = tuple(counts)
        if len(counts) != group.size():
            raise ValueError(f"counts must give one frame count per rank of the group ({group.size()}), "
                             f"got {len(counts)}: {counts}")
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
            raise ValueError(f"counts must be integers >= 1 (every rank holds at least one frame), got {counts}")
        self.group, self.counts = group, counts
        self.rank = dist.get_rank(group)
        self.offsets = tuple(sum(counts[:i]) for i in range(len(counts)))

    @property
    def size(self) -> int:
        return len(self.counts)

    @property
    def num_frames(self) -> int:
        return sum(self.counts)

    @property
    def local_frames(self) -> int:
        return self.counts[self.rank]

    @property
    def offset(self) -> int:
        return self.offsets[self.rank]

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def __deepcopy__(self, memo) -> "FrameShards":
        return self  # a process group is shared, never copied (a deep copy of a sharded model keeps its group)

    def __repr__(self) -> str:
        return f"FrameShards(rank {self.rank} of {self.size}, counts={self.counts})"

    @classmethod
    def split(cls, group, num_frames: int) -> "FrameShards":
        """``num_frames`` frames split as evenly as can be, the larger blocks on the lower ranks."""
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < group.size():
            raise ValueError(f"num_frames must be an integer of at least the group size {group.size()} (one frame "
                             f"per rank), got {num_frames!r}")
        return cls(group, split_sizes(num_frames, group.size()))

    @classmethod
    def gather(cls, group, local_frames: int, *, device=None, agree: Sequence[int] = (),
               agree_names: str = "") -> "FrameShards":
        """The split in which this rank holds ``local_frames``, learned with one ``all_gather`` over ``group`` of
        a tensor on ``device`` (a CUDA device for NCCL). ``agree`` are sizes every rank must share (the other
        dimensions of the sharded tensors, named by ``agree_names``): a rank that differs is reported on every
        rank, instead of a collective that hangs or mixes up the data."""
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"frame_group must be a torch.distributed ProcessGroup or a FrameShards, got "
                            f"{type(group).__name__}")
        mine = torch.tensor([local_frames, *agree], dtype=torch.int64, device=device)
        everyone = [torch.empty_like(mine) for _ in range(group.size())]
        dist.all_gather(everyone, mine, group=group)
        rows = [tuple(row.tolist()) for row in everyone]
        for i, row in enumerate(rows):
            if row[1:] != tuple(agree):
                raise ValueError(f"frame_group: rank {i} of the group holds {agree_names or 'sizes'} {row[1:]}, this "
                                 f"rank {tuple(agree)}; every rank must hold the same videos (only the frame "
                                 f"count may differ)")
        return cls(group, [row[0] for row in rows])


def resolve(frame_group, local_frames: int, *, device=None, agree: Sequence[int] = (),
            agree_names: str = "") -> FrameShards:
    """``frame_group`` (a FrameShards, or a ProcessGroup, gathered) as the FrameShards of this call, checked
    against the ``local_frames`` this rank holds."""
    if isinstance(frame_group, FrameShards):
        if frame_group.local_frames != local_frames:
            raise ValueError(f"frame_group says rank {frame_group.rank} holds {frame_group.local_frames} frames "
                             f"({frame_group}), but its input has {local_frames}")
        return frame_group
    return FrameShards.gather(frame_group, local_frames, device=device, agree=agree, agree_names=agree_names)
