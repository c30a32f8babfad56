"""Frame sharding of diffusers' ``UNetMotionModel`` (AnimateDiff), for ``shard_frames``.

Everything in a UNetMotionModel works per frame except its motion modules (``AnimateDiffTransformer3D``), which
see (B, C, T, H, W) videos and (B*H*W, T, C) pixel sequences. In each, three things mix frames:

- ``norm``: GroupNorm of the (B, C, T, H, W) video, statistics over channels x frames x height x width: its
  forward becomes ``pychop.ops.frame_mixing.frame_group_norm`` (sums reduced over the group).
- the temporal self-attention of each transformer block (``attn1``, ``attn2``): pychop's
  ``TemporalAttentionProcessor`` with the frame group (``pychop.ops.frame_parallel``).
- sinusoidal positional embeddings (``pos_embed``): frame t of this rank gets row ``offset + t``, its global
  index, instead of row t.

Refused, naming the module: transformer blocks other than ``BasicTransformerBlock`` (e.g. FreeNoise's, whose
frame windows are not sharded), cross-attention inside a motion module, other positional embeddings, attention
features the processor does not implement. Works on a model converted by ``convert_to_parallel`` (the
conversion replaces the motion modules' ``forward``, not their layers') and with ``lean_frozen``.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn
from diffusers import UNetMotionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

from pychop.integrations.diffusers.motion import TemporalAttentionProcessor, check_supported
from pychop.ops.frame_mixing import frame_group_norm

__all__ = ["UNetMotionModel", "motion_targets"]


class _ShardedGroupNorm:
    """The ``forward`` of a motion module's GroupNorm, on this rank's frames of a (B, C, T, H, W) video."""

    def __init__(self, norm: nn.GroupNorm):
        self.norm, self.frame_group = norm, None

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        return frame_group_norm(video, norm.num_groups, norm.weight, norm.bias, norm.eps,
                                frame_group=self.frame_group)


class _ShardedPositions:
    """The ``forward`` of a ``SinusoidalPositionalEmbedding`` on (N, T_r, C) frame sequences: rows of the global
    frame indices of this rank."""

    def __init__(self, embedding: SinusoidalPositionalEmbedding):
        self.embedding, self.frame_group = embedding, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shards, table = self.frame_group, self.embedding.pe
        if shards.num_frames > table.shape[1]:
            raise ValueError(f"the motion module's positional embedding holds {table.shape[1]} frames, the videos "
                             f"have {shards.num_frames} (motion_max_seq_length)")
        return x + table[:, shards.offset:shards.offset + x.shape[1]]


def _patch_forward(module: nn.Module, forward) -> callable:
    module.forward = forward

    def undo():
        if module.__dict__.get("forward") is forward:
            del module.forward
    return undo


def motion_targets(unet: UNetMotionModel, backend: str) -> Tuple[List[Tuple[str, object]], list]:
    """(name, object with a ``frame_group``) of every sharded layer of ``unet`` and the undo functions; refuses
    (before changing anything) what it cannot shard."""
    motion_modules = [(name, m) for name, m in unet.named_modules() if isinstance(m, AnimateDiffTransformer3D)]
    if not motion_modules:
        raise ValueError(f"{type(unet).__name__} has no motion modules (AnimateDiffTransformer3D) to shard")
    norms, positions, attentions = [], [], []
    for name, module in motion_modules:
        if type(module.norm) is not nn.GroupNorm or "forward" in module.norm.__dict__:
            raise ValueError(f"shard_frames: {name}.norm is not a plain GroupNorm (or is patched already)")
        norms.append((f"{name}.norm", module.norm))
        for i, block in enumerate(module.transformer_blocks):
            where = f"{name}.transformer_blocks.{i}"
            if type(block) is not BasicTransformerBlock:
                raise ValueError(f"shard_frames: {where} is a {type(block).__name__}; only BasicTransformerBlock "
                                 "motion modules can be sharded over frames (FreeNoise's windows cannot)")
            if block.pos_embed is not None:
                if type(block.pos_embed) is not SinusoidalPositionalEmbedding:
                    raise ValueError(f"shard_frames: {where}.pos_embed is a {type(block.pos_embed).__name__}; "
                                     "only sinusoidal positional embeddings are supported")
                positions.append((f"{where}.pos_embed", block.pos_embed))
        for sub_name, sub in module.named_modules():
            if isinstance(sub, Attention):
                if sub.is_cross_attention:
                    raise ValueError(f"shard_frames: {name}.{sub_name} is a cross-attention inside a motion module "
                                     "(temporal_cross_attention_dim); not supported")
                check_supported(f"{name}.{sub_name}", sub)
                attentions.append((f"{name}.{sub_name}", sub))
    processor = TemporalAttentionProcessor(backend)
    targets, undo = [("temporal attention processor", processor)], []
    for _, attn in attentions:
        original = attn.get_processor()
        undo.append(lambda attn=attn, original=original: attn.set_processor(original))
        attn.set_processor(processor)
    for name, norm in norms:
        forward = _ShardedGroupNorm(norm)
        undo.append(_patch_forward(norm, forward))
        targets.append((name, forward))
    for name, embedding in positions:
        forward = _ShardedPositions(embedding)
        undo.append(_patch_forward(embedding, forward))
        targets.append((name, forward))
    return targets, undo
