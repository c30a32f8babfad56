"""Mobius for a factorized video transformer: diffusers' ``LatteTransformer3DModel`` in parallel form, and back.

Latte alternates spatial and temporal ``BasicTransformerBlock``s, both residual. Spatial block i sees the
tokens of each frame, (B*F, S, C); the model then regroups them per token, (B*S, F, C) (``to_temporal``),
adds the temporal position embedding ``e`` (before the first temporal block only; zero otherwise) and runs
temporal block i, whose output is regrouped per frame for the next spatial block. With ``d_t`` the temporal
block's update (its output less its input):

    serial:    s = spatial(h);  out = temporal(P(s) + e)   = P(s) + e + d_t(P(s) + e)
    parallel:                   out = P(s) + e + d_t(P(h) + e)

with ``P = to_temporal``: in the parallel form the temporal block reads the spatial block's input instead of
its output, and its update is added to the spatial output, as ``convert_to_parallel`` does for UNets.

``convert_latte_to_parallel(model)`` (what ``convert_to_parallel`` calls for a Latte model) rewires every
spatial + temporal pair so, and runs the temporal self-attention through ``pychop.temporal_attention``
(``patch_temporal_attention``); ``conversion.revert()`` restores the original ``forward`` methods and attention
processors, and with them the exact original function. Everything is checked before anything is changed.
"""

from __future__ import annotations

from typing import List

import torch
from diffusers import LatteTransformer3DModel

from pychop.integrations.diffusers.mobius import (
    MobiusConversion,
    _hidden_states_of,
    _PairForward,
    _PairLink,
    _SpatialForward,
    _split_hidden_states,
    _with_hidden_states,
    check_forwards_unchanged,
)
from pychop.integrations.diffusers.motion import TemporalAttentionPatch, patch_temporal_attention


def to_temporal(frames: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Tokens per frame (B*F, S, C) regrouped per token, (B*S, F, C), as Latte regroups them."""
    rows, tokens, channels = frames.shape
    return frames.view(rows // num_frames, num_frames, tokens, channels).transpose(1, 2).reshape(-1, num_frames,
                                                                                                  channels)


class _LatteTemporalForward(_PairForward):
    """The temporal block's ``forward`` in the parallel form: it reads P(h) + e, where the serial model gives it
    P(s) + e, and its update is added to its serial input."""

    def __call__(self, *args, **kwargs):
        serial_input, rebuild = _split_hidden_states(args, kwargs)  # P(s) + e, (B*S, F, C)
        block_input, spatial_out = self.link.take(serial_input)  # h and s, (B*F, S, C)
        frames = serial_input.shape[1]
        # P(h) + e, with e = serial_input - P(s): exactly P(h) where e is zero.
        parallel_input = to_temporal(block_input, frames) + (serial_input - to_temporal(spatial_out, frames))
        args, kwargs = rebuild(parallel_input)
        result = self.original(*args, **kwargs)
        return _with_hidden_states(result, serial_input + (_hidden_states_of(result) - parallel_input))


class LatteConversion(MobiusConversion):
    """The rewired pairs and the temporal attention patch; ``revert()`` restores the serial model exactly."""

    def __init__(self, modules, names: List[str], attention: TemporalAttentionPatch):
        super().__init__(modules, names)
        self.attention = attention

    def revert(self) -> None:
        self.attention.remove()
        super().revert()


def convert_latte_to_parallel(model: LatteTransformer3DModel) -> LatteConversion:
    """Rewires ``model``'s spatial + temporal block pairs in parallel (see the module docstring)."""
    pairs = list(zip(model.transformer_blocks, model.temporal_transformer_blocks))
    if len(model.transformer_blocks) != len(model.temporal_transformer_blocks):
        raise ValueError(f"LatteTransformer3DModel: {len(model.transformer_blocks)} spatial blocks but "
                         f"{len(model.temporal_transformer_blocks)} temporal blocks; cannot pair them")
    check_forwards_unchanged([(f"{kind}[{i}]", block) for i, pair in enumerate(pairs)
                              for kind, block in zip(("transformer_blocks", "temporal_transformer_blocks"), pair)])
    attention = patch_temporal_attention(model)  # checks its attention modules first, then patches them
    for spatial, temporal in pairs:
        link = _PairLink()
        spatial.forward, temporal.forward = _SpatialForward(spatial, link), _LatteTemporalForward(temporal, link)
    modules = [module for pair in pairs for module in pair]
    return LatteConversion(modules, [f"transformer_blocks[{i}]" for i in range(len(pairs))], attention)
