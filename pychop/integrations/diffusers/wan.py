"""ChopGrad on diffusers' ``AutoencoderKLWan`` decoder, without changing diffusers.

``vae.decode(z)`` runs ``vae.decoder`` one latent frame at a time over a list of cached features
(``feat_cache``, one entry per ``WanCausalConv3d``: None, the marker ``"Rep"`` or the last two frames) that
the decoder rewrites as it goes, with ``first_chunk=True`` for frame 0. Here that list is the recurrence's
state: ``step`` copies it, lets the decoder fill the copy (every entry it writes is a new tensor or the
marker; nothing is written into a cached tensor), and returns the copy. The per-frame parts of ``_decode``
(``post_quant_conv``, a 1x1x1 convolution; ``unpatchify``; the clamp to [-1, 1]) run inside the step, so
concatenating the steps' outputs gives ``vae.decode(z).sample``. Spatial tiling is not supported (the
tiles' caches would be separate recurrences); batch slicing changes nothing but memory.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

CacheEntry = Optional[Union[torch.Tensor, str]]


class WanDecoderRecurrence:
    """The decoder of ``vae`` as a pure recurrence over latent frames, for ``pychop.chopgrad``::

        wan = WanDecoderRecurrence(vae)
        loss = stream(wan.step, wan.init_state(), wan.segments(z), loss_fn, window=2)

    ``segments(z)`` splits latents (B, C, T, h, w) into T frames (B, C, 1, h, w); ``step`` decodes one into
    1 (first frame) or 4 video frames.
    """

    def __init__(self, vae: AutoencoderKLWan):
        if not isinstance(vae, AutoencoderKLWan):
            raise TypeError(f"vae must be a diffusers AutoencoderKLWan, got {type(vae).__name__}")
        self.vae = vae
        self.num_caches = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())

    def init_state(self) -> List[CacheEntry]:
        """The empty feature cache (what ``vae.clear_cache()`` sets up)."""
        return [None] * self.num_caches

    @staticmethod
    def segments(z: torch.Tensor) -> List[torch.Tensor]:
        if z.dim() != 5:
            raise ValueError(f"z must be latents (B, C, T, h, w), got {tuple(z.shape)}")
        return list(z.split(1, dim=2))

    def step(self, state: List[CacheEntry], z_t: torch.Tensor):
        """Decode latent frame ``z_t`` (B, C, 1, h, w) with cache ``state``; returns ``(new_cache, frames)``."""
        if len(state) != self.num_caches:
            raise ValueError(f"state must hold {self.num_caches} cache entries (use init_state()), "
                             f"got {len(state)}")
        cache = list(state)
        first_chunk = all(entry is None for entry in cache)
        x = self.vae.post_quant_conv(z_t)
        out = self.vae.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first_chunk)
        if self.vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=self.vae.config.patch_size)
        return cache, torch.clamp(out, min=-1.0, max=1.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The plain recurrence, concatenated: equals ``vae.decode(z).sample`` (no tiling)."""
        state, frames = self.init_state(), []
        for z_t in self.segments(z):
            state, y = self.step(state, z_t)
            frames.append(y)
        return torch.cat(frames, dim=2)
