"""pychop inside diffusers models (needs ``pip install 'pychop[diffusers]'``); diffusers itself is unchanged.

- ``patch_temporal_attention(model)`` (``motion``): runs the temporal self-attention of motion modules and
  temporal transformers through ``pychop.temporal_attention``; ``.remove()`` undoes it.
- ``convert_to_parallel(unet)`` (``mobius``): rewires the spatial transformer + temporal transformer pairs of
  a ``UNetMotionModel``, ``UNet3DConditionModel`` or ``UNetSpatioTemporalConditionModel``, or the spatial +
  temporal block pairs of a ``LatteTransformer3DModel`` (``latte``), into the parallel Mobius form for
  fine-tuning; ``.revert()`` undoes it. Models it does not understand are refused untouched (``dispatch``).
- ``lean``: diffusers' GEGLU and cross-attention for ``pychop.memory.lean_frozen``.
- ``decoder_recurrence(vae)`` (``vae``): the decoder of a video VAE as a ChopGrad recurrence, its causal cache
  as the state: ``WanDecoderRecurrence`` (``AutoencoderKLWan``, ``AutoencoderKLQwenImage``),
  ``CogVideoXDecoderRecurrence``, ``MochiDecoderRecurrence``, ``LTXVideoDecoderRecurrence`` (causal LTX
  decoders only); the others are refused with the reason.
"""

try:
    import diffusers  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("pychop.integrations.diffusers needs diffusers: pip install 'pychop[diffusers]'") from error

from pychop.integrations.diffusers.cogvideox import CogVideoXDecoderRecurrence
from pychop.integrations.diffusers.ltx import LTXVideoDecoderRecurrence
from pychop.integrations.diffusers.mobius import convert_to_parallel
from pychop.integrations.diffusers.mochi import MochiDecoderRecurrence
from pychop.integrations.diffusers.motion import patch_temporal_attention
from pychop.integrations.diffusers.recurrence import DecoderRecurrence
from pychop.integrations.diffusers.vae import decoder_recurrence
from pychop.integrations.diffusers.wan import WanDecoderRecurrence

__all__ = ["convert_to_parallel", "patch_temporal_attention", "decoder_recurrence", "DecoderRecurrence",
           "WanDecoderRecurrence", "CogVideoXDecoderRecurrence", "MochiDecoderRecurrence", "LTXVideoDecoderRecurrence"]
