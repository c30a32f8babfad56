"""Rewire a diffusers video UNet into the parallel (Mobius) spatial-temporal form, and back.

``convert_to_parallel(unet)`` rewires every spatial transformer + temporal module pair of a ``UNetMotionModel``
(``attentions`` / ``motion_modules``), ``UNet3DConditionModel`` (``attentions`` / ``temp_attentions``) or
``UNetSpatioTemporalConditionModel`` (``transformer_blocks`` / ``temporal_transformer_blocks``): with spatial
input ``h``, output ``s`` and the embedding ``e`` added between the halves (zero in the first two),

    serial:    out = s + e + d_t(s + e)
    parallel:  out = s + e + d_t(h + e)

Temporal modules with no spatial transformer beside them stay in series. The converted model is a new function,
meant for fine-tuning the temporal modules. Only the ``forward`` of the paired instances is replaced (by
picklable objects: parameters, state dict, ``deepcopy`` and ``torch.save`` are unaffected);
``conversion.revert()`` restores the exact original. Gradient checkpointing works before or after conversion,
except reentrant checkpointing (refused at the first forward). Latte models go to ``latte.py``; models the
converter does not understand are refused untouched (``dispatch.py``). Design: docs/design.md, section 7.
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


def check_forwards_unchanged(modules: List[Tuple[str, nn.Module]]) -> None:
    """Raise ``ValueError`` naming the first module whose ``forward`` is replaced on the instance, and by what."""
    for name, module in modules:
        forward = module.__dict__.get("forward")
        if forward is None:
            continue
        changed_by = getattr(forward, "changed_by", None)
        if changed_by is not None:  # pychop.memory.lean_frozen's recomputed region
            raise ValueError(f"convert_to_parallel: {name} runs a forward set by {changed_by}; remove() its handle, "
                             "call convert_to_parallel first, then lean_frozen again (it supports converted models)")
        raise ValueError(f"convert_to_parallel: the model is already converted (or its forward is patched: {name} "
                         f"has a forward of its own, {type(forward).__name__})")


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
    """Rewires ``unet``'s spatial transformer + temporal transformer pairs in parallel, Mobius' form: each
    temporal module reads its spatial transformer's input instead of its output (see the module docstring).
    The converted model is a new function, to fine-tune the temporal modules.

    Args:
        unet: a diffusers ``UNetMotionModel``, ``UNet3DConditionModel``, ``UNetSpatioTemporalConditionModel``
            or ``LatteTransformer3DModel``; any other model is refused, untouched, with the reason.

    Returns a ``MobiusConversion``: ``conversion.revert()`` restores the exact original model.
    """
    from pychop.integrations.diffusers.dispatch import special_converter  # imports this module: import here
    converter = special_converter(unet)  # raises for a model it does not understand, before touching it
    if converter is not None:
        return converter(unet)
    pairs = parallel_pairs(unet)
    if not pairs:
        raise ValueError(f"{type(unet).__name__} has no spatial transformer + temporal transformer pairs to "
                         "rewire (expected a diffusers UNetMotionModel, UNet3DConditionModel or "
                         "UNetSpatioTemporalConditionModel with cross-attention stages)")
    check_forwards_unchanged([(name, module) for name, spatial, temporal in pairs for module in (spatial, temporal)])
    for _, spatial, temporal in pairs:
        link = _PairLink()
        spatial.forward, temporal.forward = _SpatialForward(spatial, link), _TemporalForward(temporal, link)
    modules = [module for _, spatial, temporal in pairs for module in (spatial, temporal)]
    return MobiusConversion(modules, [name for name, _, _ in pairs])
