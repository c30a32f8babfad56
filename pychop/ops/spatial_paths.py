"""How a fused backend runs the spatial branch: ``spatial_path=`` of ``parallel_st_attention`` and
``spatial_attention``.

    "sdpa"    the branch through the fused kernel of ``scaled_dot_product_attention`` (``pychop.ops.sdpa_spatial``)
              on zero-copy (B*T, H, S, D) views of the inputs; the temporal branch through the backend's own kernel,
              which writes its half of a stacked output or the output that o_s is then added to
    "kernel"  the backend's own kernels for both branches (the spatial kernel adds o_s into the temporal output)
    "auto"    (default) "sdpa" where an SDPA kernel takes the inputs and the rule below prefers it, else "kernel";
              the environment variable PYCHOP_SPATIAL_PATH replaces "auto" (an explicit argument always wins)

The rule, per device, capability, dtype, head dim D and tokens per frame S:

- CPU: "sdpa" whenever ATen's CPU flash kernel takes the inputs (every dtype the fused backends take). Measured
  with the attention suite on a 2-core AMD EPYC (AVX2), float32, one thread, forward+backward: the cpp kernels'
  spatial branch is slower than SDPA's at every CPU shape of the suite (most at S = 1024), their temporal one
  faster at three of the four and on par at the fourth, and the composition no slower than the torch backend at
  any (docs/design.md, section 8, has the figures and their commands).
- GPU, float16 and bfloat16: from the floors model (benchmarks/floors.py at an H200's ceilings, until measured
  rows replace it): "sdpa" from SDPA_FROM_TOKENS tokens per frame (summed: 512, stacked: 1024). Below, the branch
  is memory-bound and the SDPA path's extra passes (o_s combined with o_t in a pass of its own; stacked, o_s and its
  gradient copied dense for SDPA's backward) outweigh the two matrix products per key block its backward saves
  (5 against the Triton kernels' 7, or 8 summed). D enters through which SDPA kernel takes it: D a multiple of 8
  up to 256 (cuDNN's backward up to 128 or 256, FlashAttention's not for D in (192, 224] on capabilities 8.6, 8.9
  and 12.x), every row 16-byte aligned; cuDNN first on capabilities 9.x and 10.x, as torch itself orders them.
- GPU, float32: "sdpa" wherever the memory-efficient kernel takes the inputs: the floors model has no float32
  ceilings, and without tensor cores the branch is compute-bound from a few dozen tokens, where SDPA's 7 products
  beat the kernels' 9.

``benchmarks.floors.sdpa_from_tokens`` computes the thresholds; tests/test_dispatch.py holds this table to it.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from pychop.ops import sdpa_spatial
from pychop.ops.validation import SPATIAL_PATHS

ENV_VAR = "PYCHOP_SPATIAL_PATH"

# (stacked, 2-byte dtype) -> the fewest tokens per frame from which a GPU runs the spatial branch through SDPA.
SDPA_FROM_TOKENS = {(False, True): 512, (True, True): 1024, (False, False): 0, (True, False): 0}


def requested(spatial_path: str) -> str:
    """A ``spatial_path=`` argument, ``"auto"`` replaced by PYCHOP_SPATIAL_PATH where that is set."""
    if spatial_path == "auto":
        spatial_path = os.environ.get(ENV_VAR, "auto") or "auto"
        if spatial_path not in SPATIAL_PATHS:
            raise ValueError(f"{ENV_VAR} must be one of {SPATIAL_PATHS}, got {spatial_path!r}")
    return spatial_path


def prefers_sdpa(device: torch.device, dtype: torch.dtype, tokens: int, stacked: bool) -> bool:
    """The rule of ``"auto"`` (see the module docstring), given that an SDPA kernel takes the inputs."""
    if device.type != "cuda":
        return True
    return tokens >= SDPA_FROM_TOKENS[(stacked, dtype.itemsize == 2)]


def choose(spatial_path: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, stacked: bool) -> Optional[str]:
    """The SDPA kernel the spatial branch of (B, T, S, H, D) q, k, v runs through, or None for the backend's own.
    ``"sdpa"`` where no SDPA kernel takes the inputs raises ValueError."""
    spatial_path = requested(spatial_path)
    if spatial_path == "kernel":
        return None
    kernel = sdpa_spatial.sdpa_kernel_for(q, k, v)
    if spatial_path == "sdpa":
        if kernel is None:
            raise ValueError(
                f"spatial_path='sdpa': no fused kernel of scaled_dot_product_attention takes these inputs ({q.dtype}, "
                f"head dim {q.shape[-1]}, strides {q.stride()} on {q.device}; on a GPU rows must start 16-byte "
                f"aligned and D be a multiple of 8); use spatial_path='kernel' or 'auto'")
        return kernel
    if kernel is None or not prefers_sdpa(q.device, q.dtype, q.shape[2], stacked):
        return None
    return kernel
