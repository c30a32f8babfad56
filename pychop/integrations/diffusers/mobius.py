"""Rewire a diffusers ``UNetMotionModel`` into the parallel (Mobius) spatial-temporal form, and back.

In ``UNetMotionModel`` every cross-attention stage (``CrossAttnDownBlockMotion``, ``CrossAttnUpBlockMotion``,
``UNetMidBlockCrossAttnMotion``) runs, per layer, a spatial transformer ``attentions[i]`` (a
``Transformer2DModel``: self-attention, text cross-attention, feed-forward, with its own residual) and then
the motion module ``motion_modules[i]`` (an ``AnimateDiffTransformer3D``, also residual), in series:

    serial:    s = spatial(h);  out = motion(s)          = h + d_s(h) + d_t(h + d_s(h))
    parallel:  out = spatial(h) + motion(h) - h          = h + d_s(h) + d_t(h)

``convert_to_parallel(unet)`` rewires every such pair into the parallel form: both modules read the same
input ``h`` and their updates are summed into the residual. Stages without a spatial transformer
(``DownBlockMotion``, ``UpBlockMotion``) keep their motion modules in series. The converted model is a
different function from the original (as in the Mobius paper): it is meant for fine-tuning the motion modules
in the parallel form, typically with the spatial weights frozen (``unet.freeze_unet2d_params()``).

The rewiring replaces the ``forward`` of the paired module instances (parameters, names and state dict are
untouched, so optimizers and checkpoints keep working); ``conversion.revert()`` restores the original
``forward`` methods and with them the exact original function. Not compatible with gradient checkpointing of
the motion modules (the parallel motion module reads an input its checkpointed call would not carry):
conversion refuses a model with gradient checkpointing enabled.
"""

from __future__ import annotations

from typing import List, Tuple

import torch.nn as nn

_MISSING = object()


class _SharedInput:
    """Carries a pair's input from the spatial module's call to the motion module's call."""

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


def _motion_forward(original, shared: _SharedInput):
    def forward(*args, **kwargs):
        spatial_out, rebuild = _split_hidden_states(args, kwargs)
        block_input, shared.hidden_states = shared.hidden_states, None
        if block_input is None:
            raise RuntimeError("parallel motion module called without its spatial transformer having run first")
        args, kwargs = rebuild(block_input)
        return spatial_out + (original(*args, **kwargs) - block_input)
    return forward


def parallel_pairs(unet: nn.Module) -> List[Tuple[str, nn.Module, nn.Module]]:
    """(stage name and layer, spatial transformer, motion module) of every pair that the conversion rewires."""
    pairs = []
    for name, block in unet.named_modules():
        attentions = getattr(block, "attentions", None)
        motion_modules = getattr(block, "motion_modules", None)
        if isinstance(attentions, nn.ModuleList) and isinstance(motion_modules, nn.ModuleList):
            if len(attentions) != len(motion_modules):
                raise ValueError(f"{name}: {len(attentions)} spatial transformers but {len(motion_modules)} "
                                 "motion modules; cannot pair them")
            pairs += [(f"{name}[{i}]", a, m) for i, (a, m) in enumerate(zip(attentions, motion_modules))]
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
    """Rewires ``unet``'s spatial transformer + motion module pairs in parallel (see the module docstring)."""
    if getattr(unet, "is_gradient_checkpointing", False):
        raise ValueError("convert_to_parallel: disable gradient checkpointing first "
                         "(unet.disable_gradient_checkpointing()); see pychop.integrations.diffusers.mobius")
    pairs = parallel_pairs(unet)
    if not pairs:
        raise ValueError(f"{type(unet).__name__} has no spatial transformer + motion module pairs to rewire "
                         "(expected a diffusers UNetMotionModel with cross-attention stages)")
    patched = []
    for _, spatial, motion in pairs:
        if "forward" in spatial.__dict__ or "forward" in motion.__dict__:
            raise ValueError("convert_to_parallel: the model is already converted (or its forward is patched)")
    for _, spatial, motion in pairs:
        shared = _SharedInput()
        for module, make in ((spatial, _spatial_forward), (motion, _motion_forward)):
            patched.append((module, module.__dict__.get("forward", _MISSING)))
            module.forward = make(module.forward, shared)
    return MobiusConversion(patched, [name for name, _, _ in pairs])
