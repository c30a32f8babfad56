"""ChopGrad on the decoder of diffusers' ``AutoencoderKLMochi``, without changing diffusers.

Mochi's decoder is causal in time: its convolutions see the current and the two previous frames (the first
frame replicated before the start), its GroupNorms normalise each frame on its own, and its up blocks expand
each frame into ``temporal_expansion`` frames. So decoding latent frame by latent frame with the last two
frames entering every convolution carried over gives the one-shot decode exactly. ``vae.decode`` then drops
the first ``temporal_compression_ratio - 1`` frames (``drop_last_temporal_frames``); the first step does too.

diffusers' causal convolution (``pad_mode="replicate"``) pads the whole clip at once and takes no cache;
``step`` runs it with one for the duration of the step (``cached_replicate_conv``: the same padding, in time
from the cache after the first chunk). The state is the decoder's nested dict of caches (None at first).
diffusers' private framewise decoding (``vae._enable_framewise_decoding()``) switches the convolutions to
another padding, which in diffusers 0.42 drops their spatial padding (decoding fails); it is refused.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLMochi
from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d

from pychop.integrations.diffusers.recurrence import DecoderRecurrence, cached_frames, replaced_forwards


def cached_replicate_conv(conv: CogVideoXCausalConv3d, inputs: torch.Tensor,
                          conv_cache: Optional[torch.Tensor] = None):
    """``conv`` (replicate padding) on ``inputs`` (B, C, t, H, W) preceded by the ``time_pad`` cached frames
    (the first frame replicated when there is no cache): returns ``(output, the last time_pad input frames)``,
    the values the one-shot forward gives for these frames."""
    front = conv_cache if conv_cache is not None else inputs[:, :, :1].expand(-1, -1, conv.time_pad, -1, -1)
    padded = torch.cat([front, inputs], dim=2)
    spatial = conv.time_causal_padding[:4] + (0, 0)
    return conv.conv(F.pad(padded, spatial, mode="replicate")), cached_frames(padded, conv.time_pad)


class MochiDecoderRecurrence(DecoderRecurrence):
    """The decoder of an ``AutoencoderKLMochi`` as a recurrence over latent frames: ``step`` decodes one into
    ``temporal_compression_ratio`` video frames (6), the first into 1."""

    vae_classes = (AutoencoderKLMochi,)

    def __init__(self, vae: AutoencoderKLMochi):
        super().__init__(vae)
        self.convs = [m for m in vae.decoder.modules() if isinstance(m, CogVideoXCausalConv3d)]

    def check_decodable(self) -> None:
        super().check_decodable()
        if self.vae.use_framewise_decoding or any(conv.pad_mode != "replicate" for conv in self.convs):
            raise ValueError("AutoencoderKLMochi with framewise decoding (vae._enable_framewise_decoding()) is not "
                             "supported: it changes the convolutions' padding (in diffusers 0.42 it drops their "
                             "spatial padding and decoding fails); the default one-shot decode is exact")

    def decode_chunk(self, state: Any, z_seg: torch.Tensor):
        """Decode latent frames ``z_seg`` (B, C, t, h, w) with cache ``state`` (None for the first); returns
        ``(new_cache, frames)``."""
        if state is not None and not isinstance(state, dict):
            raise ValueError(f"state must be None (init_state()) or the dict of caches a step returned, "
                             f"got {type(state).__name__}")
        if state is None:
            self.check_decodable()
        with replaced_forwards(self.convs, cached_replicate_conv):
            frames, cache = self.vae.decoder(z_seg, conv_cache=state)
        if state is None and self.vae.drop_last_temporal_frames:
            frames = frames[:, :, self.vae.temporal_compression_ratio - 1:]
        return cache, frames
