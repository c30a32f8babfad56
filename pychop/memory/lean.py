"""``lean_frozen``: the frozen parts of a module save only what their input gradient needs.

A part is frozen when none of its parameters requires grad. ``lean_frozen(module, recompute=False)`` changes,
in place and undoably (``handle.remove()``, or leaving ``with lean_frozen(...)``):

- frozen ``nn.Conv1d/2d/3d`` keep only their weight (``pychop.memory.frozen_conv``), checked at every call;
- frozen GEGLUs (pychop's ``FeedForward``, diffusers' ``GEGLU``) keep only their input (``pychop.nn.geglu``);
- frozen cross-attention computes the text's keys and values once per video (pychop's ``CrossAttention``
  folds the frames into the query length; diffusers' where text rows are copies:
  ``pychop.integrations.diffusers.lean``);
- with ``recompute=True``, every maximal frozen submodule with submodules (and ``ResConvBlock``'s spatial part)
  is recomputed in the backward from its inputs (``pychop.memory.recompute``); a region whose parameters require
  grad at the call runs plainly, and instance-patched modules (a Mobius conversion) are not wrapped themselves.

Outputs and trainable gradients are the unchanged module's, and so are higher-order gradients (a gradient
penalty, ``create_graph=True``); frozen parameters get no gradient. The changes are attributes of the instances:
a deep copy keeps them, bound to itself, and so does ``torch.save(model)`` / ``torch.load`` (the handle is not
saved: ``remove()`` before saving to save the plain model). Apply after ``convert_to_parallel`` and
remove before reverting it. Design and memory arithmetic: docs/design.md, section 7.
"""


from __future__ import annotations

import sys
import weakref
from typing import Callable, List, Tuple

import torch
import torch.nn as nn

from pychop.memory.frozen_conv import CONVOLUTIONS, is_leanable, lean_conv_forward
from pychop.memory.recompute import recomputed
from pychop.models.video_unet import CrossAttention, FeedForward
from pychop.nn import ParallelSTBlock, ResConvBlock

_MISSING = object()
_LEAN = weakref.WeakSet()  # modules changed by a handle not yet removed


def trains(*modules: nn.Module) -> bool:
    """Whether any parameter of ``modules`` requires grad."""
    return any(p.requires_grad for module in modules for p in module.parameters())


def _diffusers_rules():
    """``pychop.integrations.diffusers.lean`` when diffusers is in use (imported), else None."""
    if "diffusers" not in sys.modules:
        return None
    from pychop.integrations.diffusers import lean
    return lean


def _itself(module: nn.Module) -> Tuple[nn.Module, ...]:
    return (module,)


def _spatial_part(block: ResConvBlock) -> Tuple[nn.Module, ...]:
    return tuple(block.spatial_modules())


class BoundToInstance:
    """``function(module, *bound, *args, **kwargs)``: a method that ``lean_frozen`` sets on one instance.

    Unlike a ``types.MethodType`` of a function that its class does not have, ``torch.save(model)`` writes it and
    ``torch.load`` rebuilds it (``function`` is module-level, found by name), and ``copy.deepcopy`` binds it to
    the copy. ``changed_by`` names what set it, for the messages of other tools that find it."""

    def __init__(self, changed_by: str, function: Callable, module: nn.Module, *bound):
        self.changed_by, self.function, self.module, self.bound = changed_by, function, module, bound

    def __call__(self, *args, **kwargs):
        return self.function(self.module, *self.bound, *args, **kwargs)


@torch.compiler.disable  # torch.compile cannot trace the recomputing backward: one graph break, run eagerly
def recomputed_method(self: nn.Module, name: str, modules_of: Callable[[nn.Module], Tuple[nn.Module, ...]],
                      *args, **kwargs):
    """Method ``name`` of ``self``'s class, recomputed in the backward while ``modules_of(self)`` are frozen."""
    method = getattr(type(self), name).__get__(self)
    if trains(*modules_of(self)):
        return method(*args, **kwargs)
    return recomputed(method, args, kwargs)


def _is_region(module: nn.Module) -> bool:
    """A frozen module worth recomputing as a whole (see the module docstring)."""
    leaves = [m for m in module.modules() if m is not module and not list(m.children())]
    if not leaves or type(module).forward is nn.Module.forward or "forward" in module.__dict__ or trains(module):
        return False  # a leaf, a container (no forward of its own), patched by someone else, or training
    return not all(isinstance(m, CONVOLUTIONS) for m in leaves)


def frozen_regions(root: nn.Module) -> List[Tuple[str, nn.Module, str, Callable]]:
    """(name, owner, method, modules it computes with, as a function of the owner) of every region that
    ``lean_frozen(recompute=True)`` wraps."""
    found = []

    def visit(name: str, module: nn.Module) -> None:
        if _is_region(module):
            found.append((name, module, "forward", _itself))
            return
        if isinstance(module, ResConvBlock) and not trains(*module.spatial_modules()):
            found.append((f"{name}.spatial_residual" if name else "spatial_residual", module, "spatial_residual",
                          _spatial_part))
        if isinstance(module, ParallelSTBlock):
            return  # it reads its branches' parameters and never calls them
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", root)
    return found


class LeanFrozen:
    """The changes ``lean_frozen`` made to ``module``; ``remove()`` undoes them. The qualified names of what it
    changed: ``convolutions``, ``activations`` (GEGLUs), ``cross_attentions`` and, with ``recompute``,
    ``regions``."""

    def __init__(self, module: nn.Module, recompute: bool):
        self.module, self.recompute = module, recompute
        self.convolutions: List[str] = []
        self.activations: List[str] = []
        self.cross_attentions: List[str] = []
        self.regions: List[str] = []
        self._undo: List[Callable[[], None]] = []
        self._changed: List[nn.Module] = []

    def _set(self, module: nn.Module, attribute: str, value) -> None:
        previous = module.__dict__.get(attribute, _MISSING)

        def undo():
            if module.__dict__.get(attribute, _MISSING) is not value:
                return  # replaced since: no longer this handle's to undo
            if previous is _MISSING:
                delattr(module, attribute)
            else:
                setattr(module, attribute, previous)
        self._undo.append(undo)
        setattr(module, attribute, value)
        self._changed.append(module)
        _LEAN.add(module)

    def _set_processor(self, module: nn.Module, processor) -> None:
        original = module.processor

        def undo():
            if module.processor is processor:  # not replaced since (e.g. by set_attn_processor)
                module.set_processor(original)
        self._undo.append(undo)
        module.set_processor(processor)
        self._changed.append(module)
        _LEAN.add(module)

    def _add_forward_pre_hook(self, module: nn.Module, hook: Callable) -> None:
        self._undo.append(module.register_forward_pre_hook(hook).remove)

    def remove(self) -> None:
        """Undoes the changes that are still this handle's: an attribute or processor replaced since (by the user,
        by diffusers' ``set_attn_processor``) stays as it is now."""
        for undo in reversed(self._undo):
            undo()
        for module in self._changed:
            _LEAN.discard(module)
        self._undo, self._changed = [], []

    def __enter__(self) -> "LeanFrozen":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def lean_frozen(module: nn.Module, *, recompute: bool = False) -> LeanFrozen:
    """Makes the frozen parts of ``module`` save only what their input gradient needs, in place (see the module
    docstring); the outputs and the trainable parameters' gradients stay the unchanged module's.

    Args:
        module: any ``nn.Module`` (a ``VideoUNet``, a diffusers UNet, converted by ``convert_to_parallel`` or
            not); a part is frozen when none of its parameters requires grad. Not one already made lean.
        recompute: True: also recompute every maximal frozen region in the backward from its inputs, keeping
            only those (more time, far fewer bytes). Default False.

    Returns a ``LeanFrozen`` handle: ``handle.remove()`` (or leaving ``with lean_frozen(model):``) restores the
    module exactly; its ``convolutions``, ``activations``, ``cross_attentions`` and ``regions`` name what
    changed.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
    touched = [name or type(module).__name__ for name, m in module.named_modules() if m in _LEAN]
    if touched:
        raise ValueError(f"lean_frozen: {touched[0]} is already lean; remove() the handle that made it so first")
    diffusers_rules = _diffusers_rules()
    rows = diffusers_rules.RepeatedRows() if diffusers_rules else None
    handle = LeanFrozen(module, recompute)
    folded = False
    for name, sub in module.named_modules():
        if trains(sub):
            continue
        if is_leanable(sub):
            handle._set(sub, "_conv_forward", BoundToInstance("lean_frozen", lean_conv_forward, sub))
            handle.convolutions.append(name)
        elif isinstance(sub, CrossAttention):
            handle._set(sub, "fold_frames", True)
            handle.cross_attentions.append(name)
        elif isinstance(sub, FeedForward):
            handle._set(sub, "recompute_activation", True)
            handle.activations.append(name)
        elif diffusers_rules and diffusers_rules.is_geglu(sub):
            handle._set(sub, "forward", BoundToInstance("lean_frozen", diffusers_rules.lean_geglu_forward, sub))
            handle.activations.append(name)
        elif diffusers_rules and diffusers_rules.is_foldable_cross_attention(sub):
            handle._set_processor(sub, diffusers_rules.FoldedCrossAttention(sub.processor, rows))
            handle.cross_attentions.append(name)
            folded = True
    if folded:
        handle._add_forward_pre_hook(module, rows.forget)  # each forward of the module reads its text anew
    if recompute:
        for name, owner, method, modules_of in frozen_regions(module):
            handle._set(owner, method, BoundToInstance("lean_frozen(recompute=True)", recomputed_method, owner, method,
                                                       modules_of))
            handle.regions.append(name)
    return handle
