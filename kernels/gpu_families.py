"""The GPU families the Triton launch tables are written for, and the family of a device.

A family is a compute capability the tables are compiled for (tests/test_kernel_compilation.py) and the shared
memory one program may use there (the opt-in limit per block):

    sm80   A100 (8.0)                       163 KiB   mma.sync
    sm86   RTX 30xx/40xx, L4, L40 (8.6, 8.9)  99 KiB   mma.sync
    sm90   H100, H200 (9.0)                 227 KiB   warpgroup MMA (wgmma)
    sm100  B200, GB200 (10.x)               227 KiB   tcgen05 MMA
    sm120  RTX 50xx, RTX PRO (12.x)          99 KiB   mma.sync

A device gets the family of the highest capability not above its own whose shared memory fits the device's:
an sm_87 (Orin, 163 KiB) gets sm86's tables, a future sm_121 sm120's. A device below every family (sm_75 and
older) has no table: ``device_family`` raises.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

RESERVED_SHARED_MEMORY = 1024  # the CUDA runtime keeps 1 KiB of an SM's shared memory per block


@dataclass(frozen=True)
class GpuFamily:
    name: str
    capability: int  # 10 * major + minor the family's tables are compiled for
    shared_memory: int  # bytes of shared memory one program may use (opt-in per-block limit)


FAMILIES = (
    GpuFamily("sm80", 80, 163 * 1024),
    GpuFamily("sm86", 86, 99 * 1024),
    GpuFamily("sm90", 90, 227 * 1024),
    GpuFamily("sm100", 100, 227 * 1024),
    GpuFamily("sm120", 120, 99 * 1024),
)


def family_of(capability: int, shared_memory: int) -> GpuFamily:
    """The family of a device of compute capability `capability` (10 * major + minor) whose programs may use
    `shared_memory` bytes each: the highest capability not above it among the families that fit."""
    fitting = [f for f in FAMILIES if f.capability <= capability and f.shared_memory <= shared_memory]
    if not fitting:
        raise RuntimeError(f"pychop's Triton kernels have no launch table for compute capability "
                           f"{capability // 10}.{capability % 10} with {shared_memory // 1024} KiB of shared "
                           f"memory per block: they need compute capability 8.0 or later and 99 KiB")
    return max(fitting, key=lambda f: f.capability)


@functools.lru_cache(maxsize=None)
def _family_of_device(index: int) -> GpuFamily:
    properties = torch.cuda.get_device_properties(index)
    return family_of(10 * properties.major + properties.minor,
                     properties.shared_memory_per_multiprocessor - RESERVED_SHARED_MEMORY)


def device_family(device: torch.device) -> GpuFamily:
    """The family of CUDA device `device` (its capability and shared memory per block, from
    torch.cuda.get_device_properties; the per-block opt-in limit is the SM's shared memory less the 1 KiB the
    runtime reserves)."""
    return _family_of_device(device.index if device.index is not None else torch.cuda.current_device())
