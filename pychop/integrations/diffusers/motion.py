"""Attention processors that run diffusers' temporal self-attention through ``pychop.temporal_attention``.

Temporal attention in diffusers (the motion modules of ``UNetMotionModel``, i.e. ``AnimateDiffTransformer3D``;
``TransformerTemporalModel`` of ``UNet3DConditionModel``; the temporal blocks of
``TransformerSpatioTemporalModel`` in ``UNetSpatioTemporalConditionModel`` and of ``LatteTransformer3DModel``)
calls its ``Attention`` modules on hidden states of shape (B*S, T, C): every spatial token is a sequence of T
frames. Positional embeddings and normalisation happen in the transformer block before the processor, and stay
there.

``TemporalAttentionProcessor`` projects q, k, v with the module's own layers (or its fused ``to_qkv``), views
each (B*S, T, C) projection as pychop's (B', T, S', H, D) = (B*S, T, 1, H, D) (a view, no copy), calls
``pychop.temporal_attention`` with the module's scale, and applies the module's output projection, dropout,
residual and output rescale exactly as diffusers' ``AttnProcessor2_0`` does. The op's (B*S, T, 1, H, D)
output is (B*S, T, C) again without a copy (fused backends return it contiguous).

``patch_temporal_attention(model, backend="auto")`` installs one on every temporal self-attention module of
``model`` and returns a ``TemporalAttentionPatch``; ``patch.remove()`` (or leaving its ``with`` block) puts the
original processors back. Cross-attention modules (those with ``is_cross_attention``) and every spatial
attention are left alone. Modules using features the processor does not implement (spatial or group norm,
q/k norms, attention masks) are refused with a clear error when patching.

A patched model keeps diffusers' whole processor API. The processor is a drop-in ``AttnProcessor2_0`` (it
subclasses it and computes the same function), and it presents itself as one to diffusers' exact-class checks
(``set_default_attn_processor`` accepts only processors whose ``__class__`` is in diffusers' own lists), so
``set_default_attn_processor``, ``set_attn_processor`` and ``fuse_qkv_projections`` replace it as they replace
diffusers' processors, and ``unfuse_qkv_projections`` puts it back. ``patch.applied`` says whether every patched
module still runs pychop's processor; ``patch.remove()`` restores only the modules that still do.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn
from diffusers import LatteTransformer3DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel, TransformerTemporalModel
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

import pychop


class TemporalAttentionProcessor(AttnProcessor2_0):
    """A diffusers attention processor for temporal self-attention on (B*S, T, C) hidden states: diffusers'
    ``AttnProcessor2_0`` with pychop's attention op. ``frame_group`` (None, or set by
    ``pychop.distributed.shard_frames``): T is this rank's frames of videos sharded over it."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.frame_group = None
        self.restored = None  # once its patch is removed: id(module) -> the processor the patch had replaced

    @property
    def __class__(self):
        """``AttnProcessor2_0``, the processor this one stands in for: diffusers' ``set_default_attn_processor``
        accepts only processors whose ``__class__`` is one of its own (``type(self)`` stays this class)."""
        return AttnProcessor2_0

    def __reduce__(self):
        return type(self), (self.backend,)  # pickle would otherwise rebuild the object from ``__class__``

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("TemporalAttentionProcessor runs self-attention without a mask; it got "
                             f"encoder_hidden_states={type(encoder_hidden_states).__name__}, "
                             f"attention_mask={type(attention_mask).__name__}")
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be (batch * tokens, frames, channels), got "
                             f"{tuple(hidden_states.shape)}")
        residual = hidden_states
        sequences, frames, _ = hidden_states.shape
        heads = attn.heads
        if getattr(attn, "fused_projections", False):
            qkv = attn.to_qkv(hidden_states)
            q, k, v = qkv.view(sequences, frames, 1, 3, heads, -1).unbind(3)
        else:
            q, k, v = (proj(hidden_states).view(sequences, frames, 1, heads, -1)
                       for proj in (attn.to_q, attn.to_k, attn.to_v))
        out = pychop.temporal_attention(q, k, v, scale=attn.scale, backend=self.backend, frame_group=self.frame_group)
        out = out.reshape(sequences, frames, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def temporal_attention_modules(model: nn.Module) -> List[Tuple[str, Attention]]:
    """(name, module) of every temporal self-attention ``Attention`` in ``model`` (see the module docstring)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (AnimateDiffTransformer3D, TransformerTemporalModel)):
            scope = module
        elif isinstance(module, (TransformerSpatioTemporalModel, LatteTransformer3DModel)):
            scope = module.temporal_transformer_blocks
            name = f"{name}.temporal_transformer_blocks" if name else "temporal_transformer_blocks"
        else:
            continue
        for sub_name, sub in scope.named_modules():
            if isinstance(sub, Attention) and not sub.is_cross_attention:
                found[f"{name}.{sub_name}" if name else sub_name] = sub
    return list(found.items())


def check_supported(name: str, attn: Attention) -> None:
    for feature in ("spatial_norm", "group_norm", "norm_q", "norm_k"):
        if getattr(attn, feature, None) is not None:
            raise ValueError(f"{name}: attention with {feature} is not supported by TemporalAttentionProcessor")


def _before_removed_patches(processor, attn: Attention):
    """``processor``, or, while it is the processor of a removed patch, the one that patch had replaced on
    ``attn`` (a chain back in time, so it ends)."""
    while isinstance(processor, TemporalAttentionProcessor) and id(attn) in (processor.restored or {}):
        processor = processor.restored[id(attn)]
    return processor


class TemporalAttentionPatch:
    """The processors replaced by ``patch_temporal_attention``; ``remove()`` restores them on the modules that
    still run pychop's processor (a module whose processor was replaced since, e.g. by diffusers'
    ``set_default_attn_processor``, keeps its new one)."""

    def __init__(self, processor: TemporalAttentionProcessor, originals: List[Tuple[str, Attention, object]]):
        self._processor, self._originals = processor, originals

    @property
    def module_names(self) -> List[str]:
        return [name for name, _, _ in self._originals]

    @property
    def applied(self) -> bool:
        """Whether every patched module runs this patch's processor now (False once removed, or once any of them
        was given another processor)."""
        return bool(self._originals) and all(attn.processor is self._processor for _, attn, _ in self._originals)

    def remove(self) -> None:
        """Restores the modules that still run this patch's processor. Where the processor it had replaced is
        another patch's, removed since, that patch's original goes back instead: patches removed in any order
        leave the processors that were there before any of them."""
        self._processor.restored = {id(attn): processor for _, attn, processor in self._originals}
        for _, attn, processor in self._originals:
            if attn.processor is self._processor:
                attn.set_processor(_before_removed_patches(processor, attn))
        self._originals = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def patch_temporal_attention(model: nn.Module, backend: str = "auto") -> TemporalAttentionPatch:
    """Runs every temporal self-attention of ``model`` through ``pychop.temporal_attention`` (the same
    function; see the module docstring).

    Args:
        model: a diffusers model with temporal self-attention: ``UNetMotionModel`` (AnimateDiff),
            ``UNet3DConditionModel``, ``UNetSpatioTemporalConditionModel`` (SVD), ``LatteTransformer3DModel``.
        backend: the attention backend, as for ``pychop.temporal_attention`` (default ``"auto"``).

    Returns a ``TemporalAttentionPatch``: ``patch.remove()`` (or leaving its ``with`` block) puts the original
    processors back; ``patch.applied`` says whether every patched module still runs pychop's.
    """
    modules = temporal_attention_modules(model)
    if not modules:
        raise ValueError(f"model ({type(model).__name__}) has no temporal self-attention modules (motion "
                         "modules, TransformerTemporalModel, TransformerSpatioTemporalModel or "
                         "LatteTransformer3DModel)")
    for name, attn in modules:
        check_supported(name, attn)
    processor = TemporalAttentionProcessor(backend)
    originals = []
    for name, attn in modules:
        originals.append((name, attn, attn.get_processor()))
        attn.set_processor(processor)
    return TemporalAttentionPatch(processor, originals)
