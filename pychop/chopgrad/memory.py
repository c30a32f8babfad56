"""Measuring activation memory on any device: bytes saved for backward and still alive."""

from __future__ import annotations

import weakref
from typing import Callable

import torch


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedActivationMeter:
    """Counts the bytes of activations (non-parameter tensors) that autograd saves for backward, while
    they are alive, and their peak: the activation memory of a training step, device-independent.

    Use ``peak = SavedActivationMeter().measure(fn)``. A saved tensor counts from when its graph node saves
    it until the node lets it go (after a backward, or when the graph is dropped). Tensors that are leaves
    requiring grad (parameters, inputs) are not activations and are not counted. Views are counted at their
    own size, so the figure is the bytes autograd asked to keep, not the allocator's.
    """

    def __init__(self):
        self.live = 0
        self.peak = 0

    def _released(self, nbytes: int) -> None:
        self.live -= nbytes

    def _pack(self, tensor: torch.Tensor):
        if tensor.requires_grad and tensor.grad_fn is None:
            return tensor
        nbytes = tensor.numel() * tensor.element_size()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        saved = _Saved(tensor.detach())  # holding `tensor` itself would tie a reference cycle via grad_fn
        weakref.finalize(saved, self._released, nbytes)
        return saved

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def measure(self, fn: Callable[[], object]) -> int:
        """Runs ``fn()`` and returns the peak live saved bytes during it."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            fn()
        return self.peak
