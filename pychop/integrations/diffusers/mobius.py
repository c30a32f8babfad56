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
untouched, so optimizers, ``save_pretrained`` and ``state_dict`` checkpoints keep working; the replacements are
plain objects, so ``copy.deepcopy`` and ``torch.save`` of the whole model keep the conversion, and
``from_pretrained`` loads the serial model); ``conversion.revert()`` restores the original ``forward`` methods
and with them the exact original function.

Gradient checkpointing (``unet.enable_gradient_checkpointing()``, before or after conversion) gives the
gradients of the converted model without it. diffusers recomputes some pair halves on their own in the backward
(the mid block's motion module, the spatial blocks of ``TransformerSpatioTemporalModel``): a recomputed
temporal call finds the ``h`` and ``s`` its first call used by its own input tensor, held only as long as that
input lives; a checkpoint around a whole block recomputes both halves in order. A checkpoint function that
runs its forward without autograd (``torch.utils.checkpoint`` with ``use_reentrant=True``) cannot propagate
the gradient the temporal half sends to ``h``: a pair whose halves run in different autograd modes is refused.
"""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

import torch
import torch.nn as nn
from torch.utils.weak import WeakTensorKeyDictionary


# (spatial, temporal) module lists side by side in a stage of each supported UNet, paired index by index.
PAIRED_MODULE_LISTS = (("attentions", "motion_modules"), ("attentions", "temp_attentions"),
                       ("transformer_blocks", "temporal_transformer_blocks"))


class _PairLink:
    """What the two halves of one rewired pair pass each other: the spatial call's input ``h`` and output ``s``,
    taken by the temporal call that follows it, and the ``h`` and ``s`` of every temporal call made with autograd,
    by the call's input tensor, for a checkpoint that recomputes that call alone. Copies start empty."""

    def __init__(self):
        self.pending = None  # (h, s, autograd on) of the latest spatial call, until a temporal call takes it
        self.taken = WeakTensorKeyDictionary()  # temporal input -> (h, s or None where s is that input)

    def __reduce__(self):
        return type(self), ()

    def give(self, block_input, spatial_out) -> None:
        self.pending = block_input, spatial_out, torch.is_grad_enabled()

    def take(self, serial_input):
        """(h, s) for the temporal call on ``serial_input``."""
        tracing = torch.compiler.is_compiling()  # compiled graphs recompute inside the graph, never call again
        if not tracing and serial_input in self.taken:  # a checkpoint recomputing this call in the backward
            block_input, spatial_out = self.taken[serial_input]
            return block_input, serial_input if spatial_out is None else spatial_out
        if self.pending is None:
            raise RuntimeError("parallel temporal module called without its spatial transformer having run first")
        (block_input, spatial_out, spatial_grad), self.pending = self.pending, None
        if spatial_grad != torch.is_grad_enabled():
            raise RuntimeError(
                f"the spatial half of a parallel pair ran with autograd {'on' if spatial_grad else 'off'} and its "
                f"temporal half with it {'off' if spatial_grad else 'on'}: a gradient checkpointing function that "
                "runs its forward without autograd (torch.utils.checkpoint with use_reentrant=True) cannot pass "
                "the temporal half's gradient to the pair's input; use diffusers' default "
                "enable_gradient_checkpointing() (non-reentrant)")
        if spatial_grad and not tracing:
            self.taken[serial_input] = block_input, None if spatial_out is serial_input else spatial_out
        return block_input, spatial_out


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


class _PairForward:
    """The ``forward`` of one half of a rewired pair: the module class's own ``forward``, linked to the other
    half."""

    def __init__(self, module: nn.Module, link: _PairLink):
        self.module, self.link = module, link
        self.class_forward = type(module).forward  # a plain function: torch.compile traces it, pickle names it

    def original(self, *args, **kwargs):
        return self.class_forward(self.module, *args, **kwargs)


class _SpatialForward(_PairForward):
    def __call__(self, *args, **kwargs):
        hidden_states, _ = _split_hidden_states(args, kwargs)
        result = self.original(*args, **kwargs)
        self.link.give(hidden_states, _hidden_states_of(result))
        return result


class _TemporalForward(_PairForward):
    def __call__(self, *args, **kwargs):
        serial_input, rebuild = _split_hidden_states(args, kwargs)  # s + e
        block_input, spatial_out = self.link.take(serial_input)
        parallel_input = block_input if serial_input is spatial_out else serial_input - spatial_out + block_input
        args, kwargs = rebuild(parallel_input)
        result = self.original(*args, **kwargs)
        return _with_hidden_states(result, serial_input + (_hidden_states_of(result) - parallel_input))


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

    def __init__(self, modules: List[nn.Module], names: List[str]):
        self._modules, self.pair_names = modules, names

    def revert(self) -> None:
        for module in self._modules:
            if isinstance(module.__dict__.get("forward"), _PairForward):
                del module.forward
        self._modules = []


def convert_to_parallel(unet: nn.Module) -> MobiusConversion:
    """Rewires ``unet``'s spatial transformer + temporal transformer pairs in parallel (see the module
    docstring)."""
    from pychop.integrations.diffusers.dispatch import special_converter  # imports this module: import here
    converter = special_converter(unet)  # raises for a model it does not understand, before touching it
    if converter is not None:
        return converter(unet)
    pairs = parallel_pairs(unet)
    if not pairs:
        raise ValueError(f"{type(unet).__name__} has no spatial transformer + temporal transformer pairs to "
                         "rewire (expected a diffusers UNetMotionModel, UNet3DConditionModel or "
                         "UNetSpatioTemporalConditionModel with cross-attention stages)")
    for _, spatial, temporal in pairs:
        if "forward" in spatial.__dict__ or "forward" in temporal.__dict__:
            raise ValueError("convert_to_parallel: the model is already converted (or its forward is patched)")
    for _, spatial, temporal in pairs:
        link = _PairLink()
        spatial.forward, temporal.forward = _SpatialForward(spatial, link), _TemporalForward(temporal, link)
    modules = [module for _, spatial, temporal in pairs for module in (spatial, temporal)]
    return MobiusConversion(modules, [name for name, _, _ in pairs])
