"""pychop: fused kernels for training video diffusion models within GPU memory.

- ``pychop.parallel_st_attention`` (and ``temporal_attention``, ``spatial_attention``): Mobius-style parallel
  spatial-temporal attention in one op, with ChopGrad's gradient window inside attention.
- ``pychop.chopgrad``: truncated backpropagation through causal-cache video decoders.
- ``pychop.nn``, ``pychop.models``, ``pychop.integrations``: blocks, reference models and diffusers adapters.
- ``pychop.memory``: ``lean_frozen``, less memory for the frozen layers of a model being fine-tuned.
- ``pychop.distributed``: ``shard_frames``, a model's frames sharded over a process group (long videos).
- ``python -m pychop.check``: every attention backend on this machine against float64, its speed, what auto takes.

Submodules are imported on first use, so ``import pychop`` stays light.
"""

from importlib import import_module as _import_module

from pychop.ops import BACKENDS, BackendUnavailable, parallel_st_attention, spatial_attention, temporal_attention
from pychop.ops import available as available_backends

__version__ = "0.1.0"

_SUBMODULES = ("chopgrad", "nn", "models", "integrations", "kernels", "ops", "memory", "distributed")

__all__ = ["parallel_st_attention", "spatial_attention", "temporal_attention", "BACKENDS",
           "BackendUnavailable", "available_backends", *_SUBMODULES]


def __getattr__(name):
    if name in _SUBMODULES:
        return _import_module(f"pychop.{name}")
    raise AttributeError(f"module 'pychop' has no attribute {name!r}")


def __dir__():
    """The public names only (``__all__`` and ``__version__``): not the submodules that imports load as a
    side effect, nor this module's helpers."""
    return sorted([*__all__, "__version__"])
