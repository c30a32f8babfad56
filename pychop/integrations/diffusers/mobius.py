"""Rewire a diffusers video UNet into the parallel (Mobius) spatial-temporal form, and back.

Diffusers' video UNets run a spatial transformer and then a temporal one, both residual, in series:

- ``UNetMotionModel`` (AnimateDiff): in ``CrossAttnDownBlockMotion``, ``CrossAttnUpBlockMotion`` and
  ``UNetMidBlockCrossAttnMotion``, ``attentions[i]`` (``Transformer2DModel``: self-attention, text
  cross-attention, feed-forward) then the motion module ``motion_modules[i]`` (``AnimateDiffTransformer3D``);
- ``UNet3DConditionModel`` (ModelScope text-to-video): in ``CrossAttnDownBlock3D``, ``CrossAttnUpBlock3D`` and
  ``UNetMidBlock3DCrossAttn``, ``attentions[i]`` then ``temp_attentions[i]`` (``TransformerTemporalModel``);
- ``UNetSpatioTemporalConditionModel`` (Stable Video Diffusion): in every ``TransformerSpatioTemporalModel``,
  ``transformer_blocks[i]`` (``BasicTransformerBlock``) then ``temporal_transformer_blocks[i]``
  (``TemporalBasicTransformerBlock``), which reads the spatial output plus a frame embedding ``e`` and whose
  output the model's ``time_mixer`` then blends with the spatial output.

With ``d_s``, ``d_t`` the two updates and ``e`` the embedding added between them (zero in the first two):

    serial:    s = spatial(h);  out = temporal(s + e)    = s + e + d_t(s + e)
    parallel:                   out = s + e + d_t(h + e)

``convert_to_parallel(unet)`` rewires every such pair into the parallel form: the temporal module reads the
spatial module's input ``h`` (plus ``e``) instead of its output, and its update is added to the spatial output.
Temporal modules without a spatial transformer beside them (``DownBlockMotion``, ``UpBlockMotion``,
``UNet3DConditionModel.transformer_in``) stay in series, and so do the temporal convolutions and temporal
ResNet blocks. The converted model is a different function from the original (as in the Mobius paper): it is
meant for fine-tuning the temporal modules in the parallel form, typically with the spatial weights frozen
(``unet.freeze_unet2d_params()`` on a ``UNetMotionModel``).

The rewiring replaces the ``forward`` of the paired module instances (parameters, names and state dict are
untouched, so optimizers and checkpoints keep working); ``conversion.revert()`` restores the original
``forward`` methods and with them the exact original function. Not compatible with gradient checkpointing
(a checkpointed spatial call would run again in the backward without its temporal partner): conversion
refuses a model with gradient checkpointing enabled.
"""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

import torch.nn as nn

_MISSING = object()


# (spatial, temporal) module lists side by side in a stage of each supported UNet, paired index by index.
PAIRED_MODULE_LISTS = (("attentions", "motion_modules"), ("attentions", "temp_attentions"),
                       ("transformer_blocks", "temporal_transformer_blocks"))


class _SharedInput:
    """Carries a pair's spatial input and output from the spatial module's call to the temporal module's."""

    def __init__(self):
        self.hidden_states = self.spatial_out = None


def _split_hidden_states(args, kwargs):
    """The hidden states of a module call (first positional or ``hidden_states=``) and a function to
    rebuild the call's arguments with other hidden states."""
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"], lambda h: (args, {**kwargs, "hidden_states": h})
    if not args:
        raise TypeError("expected the hidden states as the first argument or as hidden_states=")
    return args[0], lambda h: ((h, *args[1:]), kwargs)


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


def _spatial_forward(original, shared: _SharedInput):
    def forward(*args, **kwargs):
        hidden_states, _ = _split_hidden_states(args, kwargs)
        result = original(*args, **kwargs)
        shared.hidden_states, shared.spatial_out = hidden_states, _hidden_states_of(result)
        return result
    return forward


def _temporal_forward(original, shared: _SharedInput):
    def forward(*args, **kwargs):
        serial_input, rebuild = _split_hidden_states(args, kwargs)  # s + e
        block_input, spatial_out = shared.hidden_states, shared.spatial_out
        shared.hidden_states = shared.spatial_out = None
        if block_input is None:
            raise RuntimeError("parallel temporal module called without its spatial transformer having run first")
        parallel_input = block_input if serial_input is spatial_out else serial_input - spatial_out + block_input
        args, kwargs = rebuild(parallel_input)
        result = original(*args, **kwargs)
        return _with_hidden_states(result, serial_input + (_hidden_states_of(result) - parallel_input))
    return forward


def parallel_pairs(unet: nn.Module) -> List[Tuple[str, nn.Module, nn.Module]]:
    """(stage name and layer, spatial transformer, temporal module) of every pair that the conversion rewires."""
    pairs = []
    for name, block in unet.named_modules():
        for spatial_list, temporal_list in PAIRED_MODULE_LISTS:
            spatial, temporal = getattr(block, spatial_list, None), getattr(block, temporal_list, None)
            if not (isinstance(spatial, nn.ModuleList) and isinstance(temporal, nn.ModuleList)):
                continue
            if len(spatial) != len(temporal):
                raise ValueError(f"{name}: {len(spatial)} {spatial_list} but {len(temporal)} {temporal_list}; "
                                 "cannot pair them")
            for i, module in enumerate(temporal):
                if not getattr(module, "is_res", True):
                    raise ValueError(f"{name}.{temporal_list}[{i}] has no residual connection: its update "
                                     "cannot be added beside the spatial module's")
            pairs += [(f"{name}.{spatial_list}[{i}]", a, m) for i, (a, m) in enumerate(zip(spatial, temporal))]
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
    from pychop.integrations.diffusers.dispatch import special_converter  # imports this module: import here
    converter = special_converter(unet)  # raises for a model it does not understand, before touching it
    if converter is not None:
        return converter(unet)
    if getattr(unet, "is_gradient_checkpointing", False):
        raise ValueError("convert_to_parallel: disable gradient checkpointing first "
                         "(unet.disable_gradient_checkpointing()); see pychop.integrations.diffusers.mobius")
    pairs = parallel_pairs(unet)
    if not pairs:
        raise ValueError(f"{type(unet).__name__} has no spatial transformer + temporal transformer pairs to "
                         "rewire (expected a diffusers UNetMotionModel, UNet3DConditionModel or "
                         "UNetSpatioTemporalConditionModel with cross-attention stages)")
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
