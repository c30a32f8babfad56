"""Rewire a diffusers video UNet into the parallel (Mobius) spatial-temporal form, and back.

Two diffusers video UNets run, per layer of every cross-attention stage, a spatial transformer
``attentions[i]`` (a ``Transformer2DModel``: self-attention, text cross-attention, feed-forward, with its own
residual) and then a temporal transformer, also residual, in series:

- ``UNetMotionModel`` (AnimateDiff): the motion module ``motion_modules[i]`` (``AnimateDiffTransformer3D``) in
  ``CrossAttnDownBlockMotion``, ``CrossAttnUpBlockMotion`` and ``UNetMidBlockCrossAttnMotion``;
- ``UNet3DConditionModel`` (ModelScope text-to-video): ``temp_attentions[i]`` (``TransformerTemporalModel``) in
  ``CrossAttnDownBlock3D``, ``CrossAttnUpBlock3D`` and ``UNetMidBlock3DCrossAttn``.

    serial:    s = spatial(h);  out = temporal(s)        = h + d_s(h) + d_t(h + d_s(h))
    parallel:  out = spatial(h) + temporal(h) - h        = h + d_s(h) + d_t(h)

``convert_to_parallel(unet)`` rewires every such pair into the parallel form: both modules read the same
input ``h`` and their updates are summed into the residual. Temporal modules without a spatial transformer
beside them (``DownBlockMotion``, ``UpBlockMotion``, ``UNet3DConditionModel.transformer_in``) stay in series,
and so do the temporal convolutions of ``UNet3DConditionModel``. The converted model is a different function
from the original (as in the Mobius paper): it is meant for fine-tuning the temporal modules in the parallel
form, typically with the spatial weights frozen (``unet.freeze_unet2d_params()`` on a ``UNetMotionModel``).

The rewiring replaces the ``forward`` of the paired module instances (parameters, names and state dict are
untouched, so optimizers and checkpoints keep working); ``conversion.revert()`` restores the original
``forward`` methods and with them the exact original function. Not compatible with gradient checkpointing of
the temporal modules (the parallel temporal module reads an input its checkpointed call would not carry):
conversion refuses a model with gradient checkpointing enabled.
"""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

import torch.nn as nn

_MISSING = object()


# The attribute holding the temporal transformers beside ``attentions`` in a stage of each supported UNet.
TEMPORAL_MODULE_LISTS = ("motion_modules", "temp_attentions")


class _SharedInput:
    """Carries a pair's input from the spatial module's call to the temporal module's call."""

    def __init__(self):
        self.hidden_states = None


def _split_hidden_states(args, kwargs):
    """The hidden states of a module call (first positional or ``hidden_states=``) and a function to
    rebuild the call's arguments with other hidden states."""
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"], lambda h: (args, {**kwargs, "hidden_states": h})
    if not args:
        raise TypeError("expected the hidden states as the first argument or as hidden_states=")
    return args[0], lambda h: ((h, *args[1:]), kwargs)


def _spatial_forward(original, shared: _SharedInput):
    def forward(*args, **kwargs):
        shared.hidden_states, _ = _split_hidden_states(args, kwargs)
        return original(*args, **kwargs)
    return forward


def _hidden_states_of(result):
    """The hidden states of a module call's result: a tensor, a tuple led by them, or a diffusers output."""
    if isinstance(result, tuple):
        return result[0]
    return result.sample if dataclasses.is_dataclass(result) else result


def _with_hidden_states(result, hidden_states):
    """``result`` of a module call, in its own form, with its hidden states replaced."""
    if isinstance(result, tuple):
        return (hidden_states, *result[1:])
    if dataclasses.is_dataclass(result):
        return dataclasses.replace(result, sample=hidden_states)
    return hidden_states


def _temporal_forward(original, shared: _SharedInput):
    def forward(*args, **kwargs):
        spatial_out, rebuild = _split_hidden_states(args, kwargs)
        block_input, shared.hidden_states = shared.hidden_states, None
        if block_input is None:
            raise RuntimeError("parallel temporal module called without its spatial transformer having run first")
        args, kwargs = rebuild(block_input)
        result = original(*args, **kwargs)
        return _with_hidden_states(result, spatial_out + (_hidden_states_of(result) - block_input))
    return forward


def parallel_pairs(unet: nn.Module) -> List[Tuple[str, nn.Module, nn.Module]]:
    """(stage name and layer, spatial transformer, temporal module) of every pair that the conversion rewires."""
    pairs = []
    for name, block in unet.named_modules():
        attentions = getattr(block, "attentions", None)
        for attribute in TEMPORAL_MODULE_LISTS:
            temporal = getattr(block, attribute, None)
            if not (isinstance(attentions, nn.ModuleList) and isinstance(temporal, nn.ModuleList)):
                continue
            if len(attentions) != len(temporal):
                raise ValueError(f"{name}: {len(attentions)} spatial transformers but {len(temporal)} {attribute}; "
                                 "cannot pair them")
            pairs += [(f"{name}[{i}]", a, m) for i, (a, m) in enumerate(zip(attentions, temporal))]
    return pairs


class MobiusConversion:
    """The rewired pairs of ``convert_to_parallel``; ``revert()`` restores the serial model exactly."""

    def __init__(self, patched: List[Tuple[nn.Module, object]], names: List[str]):
        self._patched, self.pair_names = patched, names

    def revert(self) -> None:
        for module, saved in self._patched:
            if saved is _MISSING:
                del module.forward
            else:
                module.forward = saved
        self._patched = []


def convert_to_parallel(unet: nn.Module) -> MobiusConversion:
    """Rewires ``unet``'s spatial transformer + temporal transformer pairs in parallel (see the module
    docstring)."""
    if getattr(unet, "is_gradient_checkpointing", False):
        raise ValueError("convert_to_parallel: disable gradient checkpointing first "
                         "(unet.disable_gradient_checkpointing()); see pychop.integrations.diffusers.mobius")
    pairs = parallel_pairs(unet)
    if not pairs:
        raise ValueError(f"{type(unet).__name__} has no spatial transformer + temporal transformer pairs to "
                         "rewire (expected a diffusers UNetMotionModel or UNet3DConditionModel with "
                         "cross-attention stages)")
    patched = []
    for _, spatial, temporal in pairs:
        if "forward" in spatial.__dict__ or "forward" in temporal.__dict__:
            raise ValueError("convert_to_parallel: the model is already converted (or its forward is patched)")
    for _, spatial, temporal in pairs:
        shared = _SharedInput()
        for module, make in ((spatial, _spatial_forward), (temporal, _temporal_forward)):
            patched.append((module, module.__dict__.get("forward", _MISSING)))
            module.forward = make(module.forward, shared)
    return MobiusConversion(patched, [name for name, _, _ in pairs])
