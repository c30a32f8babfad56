"""pychop: fused kernels for training video diffusion models within GPU memory.

- ``pychop.parallel_st_attention`` (and ``temporal_attention``, ``spatial_attention``): Mobius-style parallel
  spatial-temporal attention in one op, with ChopGrad's gradient window inside attention.
- ``pychop.chopgrad``: truncated backpropagation through causal-cache video decoders.
- ``pychop.nn``, ``pychop.models``, ``pychop.integrations``: blocks, reference models and diffusers adapters.
- ``pychop.memory``: ``lean_frozen``, less memory for the frozen layers of a model being fine-tuned.
- ``python -m pychop.check``: every attention backend on this machine against float64, its speed, what auto takes.

Submodules are imported on first use, so ``import pychop`` stays light.
"""

import importlib

from pychop.ops import BACKENDS, BackendUnavailable, parallel_st_attention, spatial_attention, temporal_attention
from pychop.ops import available as available_backends

__version__ = "0.1.0"

_SUBMODULES = ("chopgrad", "nn", "models", "integrations", "kernels", "ops", "memory")

__all__ = ["parallel_st_attention", "spatial_attention", "temporal_attention", "BACKENDS",
           "BackendUnavailable", "available_backends", *_SUBMODULES]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"pychop.{name}")
    raise AttributeError(f"module 'pychop' has no attribute {name!r}")
