"""The attention ops with the frames sharded over a process group (``frame_group=`` of the public ops).

Each rank holds a contiguous block of frames of the same videos: inputs (B, T_r, S, H, D), rank ``r`` holding
global frames ``offset_r .. offset_r + T_r - 1`` (``pychop.ops.frame_shards``); the output is this rank's
frames, equal to those frames of the single-process op on all T frames.

- The spatial branch attends within a frame: it runs here, on the local frames, as ``spatial_attention``.
- The temporal branch attends across frames. Its B*S*H sequences are independent, so it is regrouped with one
  ``all_to_all_single`` (DeepSpeed-Ulysses' idea): from frame shards (every sequence, T_r frames) to sequence
  shards (a chunk of the sequences, all T frames), split along one of the axes S, H or B (the first that the
  group size divides, else the largest; uneven chunks are fine). ``temporal_attention`` runs on the chunk with
  any backend; frames are in global order there, so ``causal``, ``window`` and ``grad_window`` mean what they
  mean on one process. A second all-to-all returns its output to frame shards.
- Overlap: the all-to-all of q_t, k_t, v_t (one collective for the three) is issued with ``async_op=True``
  before the spatial branch computes and waited on after it. The backward mirrors it: the all-to-all that
  returns dq_t, dk_t, dv_t to their frames is issued before the spatial branch's backward (which autograd runs
  next: it was recorded between the two) and waited on after it. The output's all-to-all, and its gradient's,
  have nothing to hide behind.

Frame counts may differ between ranks (``all_to_all_single`` with uneven splits). Traffic per rank and call,
with P ranks and E = B*T_r*S*H*D elements here: (P-1)/P * 4E sent in the forward (q, k, v, output) and as much
in the backward. Saved for backward, besides what the two branches save: nothing (the temporal branch saves its
regrouped inputs, the same number of elements as the local ones). Double backward is not supported.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from pychop import autocast_state
from pychop.kernels.outputs import new_output
from pychop.ops import frame_shards
from pychop.ops.attention import spatial_attention, temporal_attention
from pychop.ops.frame_shards import FrameShards, split_sizes
from pychop.ops.validation import check_attention_inputs

SEQUENCE_AXES = (2, 3, 0)  # S, H, B of (B, T, S, H, D): the axes a chunk may split, preferred first


def _buffer(shape, like: torch.Tensor) -> torch.Tensor:
    """A buffer for the collectives (NaN-filled under PYCHOP_POISON_OUTPUTS=1, as kernel outputs are)."""
    return new_output(tuple(shape) if not isinstance(shape, int) else (shape,), dtype=like.dtype, device=like.device)


class Regroup:
    """One regrouping's geometry: this rank's frame shard (B, T_r, S, H, D) <-> its sequence chunk
    (B, T, S, H, D) with ``axis`` cut to ``chunks[rank]``. Buffers are frame-major: a rank's block for another
    is (frames, m, *chunk) for m tensors, so that one ``all_to_all_single`` moves all m."""

    def __init__(self, shards: FrameShards, shape: Sequence[int]):
        self.shards, self.shape = shards, tuple(shape)
        size = shards.size
        axis = next((a for a in SEQUENCE_AXES if self.shape[a] % size == 0), None)
        if axis is None:
            axis = max(SEQUENCE_AXES, key=lambda a: self.shape[a])
            if self.shape[axis] < size:
                raise ValueError(
                    f"frame_group: the temporal branch splits its B*S*H sequences over the {size} ranks along "
                    f"tokens S, heads H or batch B, but each is smaller than {size} in shape "
                    f"{self.shape} (B, T, S, H, D); use fewer ranks")
        self.axis = axis
        self.chunks = split_sizes(self.shape[axis], size)
        self.starts = tuple(sum(self.chunks[:j]) for j in range(size))

    def chunk_shape(self, j: int) -> Tuple[int, ...]:
        """(B, S, H, D) with the sequence axis cut to rank j's chunk."""
        shape = list(self.shape)
        shape[self.axis] = self.chunks[j]
        del shape[1]
        return tuple(shape)

    def block(self, frames: int, m: int, j: int) -> int:
        """Elements of a block of ``frames`` frames of rank j's chunk, for m tensors."""
        return frames * m * torch.Size(self.chunk_shape(j)).numel()

    def frames_to_sequences(self, tensors: Sequence[torch.Tensor], async_op: bool):
        """Sends every rank its chunk of the local frames of each tensor (B, T_r, S, H, D); returns the buffer
        (T, m, *chunk) being received and the work (None when done)."""
        shards, m, mine = self.shards, len(tensors), self.shards.rank
        sent = [self.block(shards.local_frames, m, j) for j in range(shards.size)]
        send = _buffer(sum(sent), tensors[0])
        for j, piece in enumerate(send.split(sent)):
            piece = piece.view(shards.local_frames, m, *self.chunk_shape(j))
            for k, x in enumerate(tensors):
                piece[:, k].copy_(x.narrow(self.axis, self.starts[j], self.chunks[j]).transpose(0, 1))
        received = [self.block(count, m, mine) for count in shards.counts]
        recv = _buffer((shards.num_frames, m, *self.chunk_shape(mine)), send)
        work = dist.all_to_all_single(recv.view(-1), send, received, sent, group=shards.group, async_op=async_op)
        return recv, work

    @staticmethod
    def sequences(recv: torch.Tensor) -> List[torch.Tensor]:
        """The m chunks (B, T, *) of a buffer (T, m, B, *) received by ``frames_to_sequences``: views."""
        return [recv[:, k].transpose(0, 1) for k in range(recv.shape[1])]

    def sequences_to_frames(self, tensors: Sequence[torch.Tensor], async_op: bool):
        """Sends every rank its frames of this rank's chunk of each tensor (B, T, *chunk); returns the flat
        buffer being received (``frames`` unpacks it) and the work (None when done)."""
        shards, m, mine = self.shards, len(tensors), self.shards.rank
        send = torch.stack([y.transpose(0, 1) for y in tensors], dim=1)  # (T, m, *chunk): blocks by frame range
        sent = [self.block(count, m, mine) for count in shards.counts]
        received = [self.block(shards.local_frames, m, j) for j in range(shards.size)]
        recv = _buffer(sum(received), send)
        work = dist.all_to_all_single(recv, send.view(-1), received, sent, group=shards.group, async_op=async_op)
        return recv, work

    def frames(self, recv: torch.Tensor, m: int) -> List[torch.Tensor]:
        """The m local-frame tensors (B, T_r, S, H, D), contiguous, from a buffer of ``sequences_to_frames``."""
        shards = self.shards
        outs = [_buffer(self.shape, recv) for _ in range(m)]
        received = [self.block(shards.local_frames, m, j) for j in range(shards.size)]
        for j, piece in enumerate(recv.split(received)):
            piece = piece.view(shards.local_frames, m, *self.chunk_shape(j))
            for k, out in enumerate(outs):
                out.narrow(self.axis, self.starts[j], self.chunks[j]).copy_(piece[:, k].transpose(0, 1))
        return outs


class _InFlight:
    """An all-to-all between the two Functions that issue and finish it: its work and receive buffer."""

    def __init__(self):
        self.work, self.recv = None, None

    def finish(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        recv, self.work, self.recv = self.recv, None, None
        return recv


def _no_double_backward():
    if torch.is_grad_enabled():
        raise RuntimeError("frame-parallel attention is differentiable once: its all-to-alls carry no graph "
                           "(a backward with create_graph=True would miss the second-order terms)")


class _SendTemporalInputs(torch.autograd.Function):
    """Issues the all-to-all of q_t, k_t, v_t to sequence shards and returns its receive buffer, still being
    written: only ``_ReceiveTemporalInputs`` may read it. Backward: waits for the all-to-all that
    ``_ReceiveTemporalInputs``'s backward issued and returns the gradients of the local frames."""

    @staticmethod
    def forward(ctx, regroup: Regroup, flight: _InFlight, q, k, v):
        flight.recv, flight.work = regroup.frames_to_sequences([q, k, v], async_op=True)
        ctx.regroup, ctx.flight = regroup, flight
        return flight.recv

    @staticmethod
    def backward(ctx, _token):
        _no_double_backward()
        return (None, None, *ctx.regroup.frames(ctx.flight.finish(), 3))


class _ReceiveTemporalInputs(torch.autograd.Function):
    """Waits for the all-to-all of ``_SendTemporalInputs`` and returns the chunks q, k, v (B, T, *chunk), views
    of its buffer. Backward: issues the all-to-all of their gradients back to frame shards and returns at once
    (a stand-in gradient; the result travels in ``flight``), so that autograd computes the spatial backward
    while it runs."""

    @staticmethod
    def forward(ctx, regroup: Regroup, flight: _InFlight, recv):
        flight.finish()
        ctx.regroup, ctx.flight, ctx.recv_shape = regroup, flight, recv.shape
        return tuple(Regroup.sequences(recv))

    @staticmethod
    def backward(ctx, *grads):
        _no_double_backward()
        flight = ctx.flight  # grads: three tensors (autograd gives zeros for an output without gradient)
        flight.recv, flight.work = ctx.regroup.sequences_to_frames(grads, async_op=True)
        return None, None, grads[0].new_zeros(()).expand(ctx.recv_shape)


class _ReturnTemporalOutput(torch.autograd.Function):
    """The temporal output chunk (B, T, *chunk) back to frame shards (B, T_r, S, H, D); backward the reverse."""

    @staticmethod
    def forward(ctx, regroup: Regroup, out):
        ctx.regroup = regroup
        recv, _ = regroup.sequences_to_frames([out], async_op=False)
        return regroup.frames(recv, 1)[0]

    @staticmethod
    def backward(ctx, grad):
        _no_double_backward()
        recv, _ = ctx.regroup.frames_to_sequences([grad], async_op=False)
        return None, Regroup.sequences(recv)[0]


def check_frame_group(frame_group) -> None:
    if not isinstance(frame_group, (FrameShards, dist.ProcessGroup)):
        raise TypeError(f"frame_group must be a torch.distributed ProcessGroup (or a pychop.ops.frame_shards."
                        f"FrameShards) over which the frames are sharded, or None, got {type(frame_group).__name__}")


@torch.compiler.disable  # collectives issued and waited on across autograd Functions: run eagerly
def frame_parallel_attention(spatial: Optional[dict], temporal: dict, *, frame_group, scale, temporal_options: dict,
                             backend: str, spatial_path: str = "auto", combine: str = "sum"):
    """The temporal branch (``temporal``: q, k, v by argument name) and optionally the spatial branch, on this
    rank's frames of videos sharded over ``frame_group`` (see the module docstring); ``temporal_options``
    (``causal``, ``window``, ``grad_window``) checked, as ``temporal_attention`` takes them. Returns this rank's
    frames of the output as the public op would on all frames: the temporal branch alone, or with the spatial
    one ``o_s + o_t`` (``combine="sum"``), stacked (``"stack"``) or the pair ``(o_s, o_t)`` (``"pair"``: two
    tensors, no copy into a stacked one; ``ParallelSTBlock`` feeds them to its two output GEMMs)."""
    check_frame_group(frame_group)
    tensors = {**(spatial or {}), **temporal}
    check_attention_inputs(tensors)
    first = next(iter(tensors.values()))
    B, T, S, H, D = first.shape
    shards = frame_shards.resolve(frame_group, T, device=first.device, agree=(B, S, H, D), agree_names="(B, S, H, D)")
    dtype = autocast_state.compute_dtype(first)  # regroup in the dtype the kernels will read
    q_t, k_t, v_t = (x.to(dtype) for x in temporal.values())
    regroup = Regroup(shards, first.shape)

    flight = _InFlight()
    recv = _SendTemporalInputs.apply(regroup, flight, q_t, k_t, v_t)
    o_s = (spatial_attention(*spatial.values(), scale=scale, backend=backend, spatial_path=spatial_path)
           if spatial is not None else None)
    chunks = _ReceiveTemporalInputs.apply(regroup, flight, recv)
    o_t = _ReturnTemporalOutput.apply(regroup, temporal_attention(*chunks, scale=scale, backend=backend,
                                                                  **temporal_options))
    if o_s is None:
        return o_t
    if combine == "pair":
        return o_s, o_t
    return torch.stack([o_s, o_t], dim=3) if combine == "stack" else o_s + o_t
