"""Measuring activation memory on any device: bytes saved for backward and still alive."""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Set

import torch
import torch.nn as nn


def storage_key(tensor: torch.Tensor) -> int:
    """An identity of the storage under ``tensor``, the same for every view of it while it is alive (on any
    device, meta included, where data pointers are all zero)."""
    return tensor.untyped_storage()._cdata


def is_parameter(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an ``nn.Parameter`` or a view of one (``weight.t()``, as a linear layer saves)."""
    return isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)


def module_storages(*modules: nn.Module) -> Set[int]:
    """The storage keys of every parameter and buffer of ``modules``."""
    return {storage_key(t) for module in modules for t in (*module.parameters(), *module.buffers())}


def is_activation(tensor: torch.Tensor, excluded: Set[int]) -> bool:
    """Whether a tensor saved for backward counts as an activation: not a parameter, not a leaf that requires
    grad (an input being differentiated), nor a view of either, not on a storage in ``excluded`` (the
    parameters and buffers of given modules), and not empty."""
    base = tensor if tensor._base is None else tensor._base  # a view made without grad has no grad_fn
    if is_parameter(tensor) or (base.requires_grad and base.grad_fn is None):
        return False
    return tensor.untyped_storage().nbytes() > 0 and storage_key(tensor) not in excluded


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedActivationMeter:
    """Counts the bytes of activations that autograd saves for backward, while they are alive, and their peak:
    the activation memory of a training step, device-independent.

    Use ``peak = SavedActivationMeter(*modules).measure(fn)``. What counts is unique storages: a storage is
    counted once, at its full size, from when the first saved tensor on it is saved until the last one is let go
    (after a backward, or when the graph is dropped), however many views of it are saved and whatever their
    sizes: the memory autograd keeps alive. Never counted: parameters and views of them (frozen or not), the
    parameters and buffers of ``modules`` (so buffers count unless their module is given), and leaves that
    require grad (inputs being differentiated). Tensors saved under saved-tensor hooks of their own (a
    checkpoint, ``ParallelSTBlock``'s ``recompute_projection``) are out of sight of the meter's hooks.

    Args:
        modules: modules whose parameters and buffers are never counted (parameters are never counted anyway).

    ``measure(fn)`` runs ``fn()`` and returns the peak in bytes; ``peak`` and ``live`` hold the peak and the
    bytes still saved.
    """

    def __init__(self, *modules: nn.Module):
        self.excluded = module_storages(*modules)
        self.live = 0
        self.peak = 0
        self._savers: Dict[int, int] = {}  # storage key -> saved tensors alive on it

    def _released(self, key: int, nbytes: int) -> None:
        self._savers[key] -= 1
        if not self._savers[key]:
            del self._savers[key]
            self.live -= nbytes

    def _pack(self, tensor: torch.Tensor):
        if not is_activation(tensor, self.excluded):
            return tensor
        key, nbytes = storage_key(tensor), tensor.untyped_storage().nbytes()
        if key not in self._savers:
            self._savers[key] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self._savers[key] += 1
        saved = _Saved(tensor.detach())  # holding `tensor` itself would tie a reference cycle via grad_fn
        weakref.finalize(saved, self._released, key, nbytes)
        return saved

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def measure(self, fn: Callable[[], object]) -> int:
        """Runs ``fn()`` and returns the peak live saved bytes during it."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            fn()
        return self.peak
