"""``decoder_recurrence(vae)``: the decoder of a diffusers video VAE as a ChopGrad recurrence, for the VAEs whose
decode is one, and a refusal that says why for the others.

A decode is an exact recurrence over chunks of latent frames when every layer of the decoder is causal in time
(convolutions that see only the current and earlier frames, through a cache) and normalises within a chunk;
a normalisation over all frames, a convolution that reads later frames, noise drawn once per call for all
frames, or overlapping tiles blended together make each frame depend on the whole clip.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLMochi,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
)
from torch.nn.parallel import DistributedDataParallel

from pychop.integrations.diffusers.cogvideox import CogVideoXDecoderRecurrence
from pychop.integrations.diffusers.ltx import LTXVideoDecoderRecurrence, ltx_refusal
from pychop.integrations.diffusers.mochi import MochiDecoderRecurrence
from pychop.integrations.diffusers.recurrence import DecoderRecurrence, DistributedStep
from pychop.integrations.diffusers.wan import WanDecoderRecurrence

RECURRENCES = {AutoencoderKLWan: WanDecoderRecurrence, AutoencoderKLQwenImage: WanDecoderRecurrence,
               AutoencoderKLCogVideoX: CogVideoXDecoderRecurrence, AutoencoderKLMochi: MochiDecoderRecurrence,
               AutoencoderKLLTXVideo: LTXVideoDecoderRecurrence}

HUNYUAN_REFUSAL = (
    "AutoencoderKLHunyuanVideo cannot be decoded as an exact recurrence: its decoder's GroupNorm layers normalise "
    "over every frame of the clip at once (so each frame depends on later frames), and its framewise decoding "
    "blends overlapping temporal tiles")


def decoder_recurrence(vae: Any) -> DecoderRecurrence:
    """The decoder of ``vae`` as an object with ``init_state()``, ``step(state, z_seg) -> (state, frames)``,
    ``segments(z)`` and ``decode(z)`` (equal to ``vae.decode(z).sample``), for ``pychop.chopgrad``::

        rec = decoder_recurrence(vae)
        loss = stream(rec.step, rec.init_state(), rec.segments(z), loss_fn, window=2)

    Supported: ``AutoencoderKLWan``, ``AutoencoderKLQwenImage``, ``AutoencoderKLCogVideoX``,
    ``AutoencoderKLMochi``, and ``AutoencoderKLLTXVideo`` with a causal decoder (``decoder_causal=True``,
    no noise injection, no timestep conditioning). Raises ``TypeError`` naming the class and the reason for
    any other VAE (``AutoencoderKLHunyuanVideo``, LTX's released non-causal decoders).

    A VAE wrapped in ``DistributedDataParallel`` (what ``accelerator.prepare(vae)`` returns in a multi-process
    run) gives a recurrence whose ``step`` runs through the wrapper (``DistributedStep``): ``stream`` then
    averages the decoder's gradients over ranks, as DDP does (the wrapper must be able to finish its
    reduction: freeze the parameters the decoder does not use, such as the encoder's, or build it with
    ``find_unused_parameters=True``). The step of an unwrapped VAE whose decoder trains in a multi-process
    group, outside any DDP forward, raises rather than leave each rank its own gradients.

    Args:
        vae: a diffusers video VAE of a supported class, or one wrapped in ``DistributedDataParallel``; spatial
            tiling off (``vae.enable_tiling()`` blends overlapping tiles, which no recurrence reproduces).
    """
    if isinstance(vae, DistributedDataParallel):
        recurrence = decoder_recurrence(vae.module)
        recurrence.step = DistributedStep(recurrence.step, vae)
        return recurrence
    if isinstance(vae, AutoencoderKLHunyuanVideo):
        raise TypeError(HUNYUAN_REFUSAL)
    if isinstance(vae, AutoencoderKLLTXVideo) and ltx_refusal(vae):
        raise TypeError(ltx_refusal(vae))
    for cls, recurrence in RECURRENCES.items():
        if isinstance(vae, cls):
            return recurrence(vae)
    supported = ", ".join(cls.__name__ for cls in RECURRENCES)
    raise TypeError(f"{type(vae).__name__} is not a supported diffusers video VAE: decoder_recurrence takes "
                    f"{supported} (a VAE whose decoder is causal in time, with a cache carried across chunks)")
