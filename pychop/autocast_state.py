"""Autocast for pychop's own functions: the dtype it computes a tensor's matrix products in, and capturing its
state to run code under it again, for computations redone later (in a backward) that must compute what the
forward computed, as ``torch.utils.checkpoint`` does."""

from __future__ import annotations

import contextlib
from typing import Iterator, Tuple

import torch

DEVICE_TYPES = ("cpu", "cuda")

AutocastState = Tuple[Tuple[str, bool, torch.dtype], ...]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast runs matrix products of ``x`` in: its dtype for x's device type when autocast is on
    there (float64 is never cast), else x's own."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return x.dtype


def current() -> AutocastState:
    """(device type, enabled, dtype) of autocast for the CPU and CUDA, now."""
    return tuple((device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
                 for device in DEVICE_TYPES)


@contextlib.contextmanager
def restored(state: AutocastState) -> Iterator[None]:
    """Runs its body under the autocast state ``state`` (from ``current``), whatever the state around it."""
    with contextlib.ExitStack() as contexts:
        for device, enabled, dtype in state:
            contexts.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield
