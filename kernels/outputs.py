"""Allocation of kernel outputs, with optional poisoning for tests.

With the environment variable ``PYCHOP_POISON_OUTPUTS=1`` every output a kernel launcher allocates is filled
with NaN (or the most negative integer) instead of being left uninitialised, so an element a kernel forgets
to write shows up in a test instead of passing by luck. Every launcher in pychop allocates through here.
"""

import os

import torch

POISON_ENV = "PYCHOP_POISON_OUTPUTS"


def poisoning_enabled() -> bool:
    return os.environ.get(POISON_ENV, "0") == "1"


def new_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor, or a NaN-filled one when poisoning is enabled."""
    if not poisoning_enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype, device=device)
