"""ChopGrad on the decoder of diffusers' ``AutoencoderKLCogVideoX``, without changing diffusers.

``vae.decode(z)`` cuts the latents into chunks of ``vae.num_latent_frames_batch_size`` frames (2), the first
one longer by the remainder (``T % 2``: 3 frames for odd T), and runs ``vae.decoder(chunk, conv_cache=cache)``
on each, which returns the chunk's frames and a new nested dict of caches (the last frames entering every
causal convolution). That dict is the recurrence's state (None at first). The chunks must be diffusers' own:
the decoder's GroupNorm layers normalise over all frames of a chunk, so other cuts decode other videos.

The caches of the 1x1x1 convolutions inside the spatial norms hold a copy of their whole input (a latent
upsampled to the layer's resolution) that no later chunk reads; ``step`` leaves them out of the state (None),
which changes no value and keeps the state, and so ChopGrad's boundary states, small.
"""

from __future__ import annotations

from typing import Any, List

import torch
from diffusers import AutoencoderKLCogVideoX
from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d

from pychop.integrations.diffusers.recurrence import DecoderRecurrence, replaced_forwards


def _forward_without_cache(conv: CogVideoXCausalConv3d, inputs: torch.Tensor, conv_cache: Any = None):
    output, _ = type(conv).forward(conv, inputs, conv_cache=conv_cache)
    return output, None


class CogVideoXDecoderRecurrence(DecoderRecurrence):
    """The decoder of an ``AutoencoderKLCogVideoX`` as a recurrence over diffusers' decode chunks.

    ``segment_lengths(T)`` are those chunks (T = 13: 3, 2, 2, 2, 2, 2); ``step`` decodes one into its
    frames (3 latent frames: 9 video frames; 2: 8).
    """

    vae_classes = (AutoencoderKLCogVideoX,)

    def __init__(self, vae: AutoencoderKLCogVideoX):
        super().__init__(vae)
        self.pointwise_convs = [m for m in vae.decoder.modules()
                                if isinstance(m, CogVideoXCausalConv3d) and m.time_kernel_size == 1]

    def segment_lengths(self, num_frames: int) -> List[int]:
        size = self.vae.num_latent_frames_batch_size
        if num_frames < size:
            return [num_frames]
        return [size + num_frames % size] + [size] * (num_frames // size - 1)

    def decode_chunk(self, state: Any, z_seg: torch.Tensor):
        """Decode chunk ``z_seg`` (B, C, t, h, w) with cache ``state`` (None for the first); returns
        ``(new_cache, frames)``."""
        if state is not None and not isinstance(state, dict):
            raise ValueError(f"state must be None (init_state()) or the dict of caches a step returned, "
                             f"got {type(state).__name__}")
        x = z_seg if self.vae.post_quant_conv is None else self.vae.post_quant_conv(z_seg)
        with replaced_forwards(self.pointwise_convs, _forward_without_cache):
            frames, cache = self.vae.decoder(x, conv_cache=state)
        return cache, frames
