"""ChopGrad on the decoders of diffusers' ``AutoencoderKLWan`` and ``AutoencoderKLQwenImage`` (Qwen-Image's VAE
has the Wan 2.1 layout), without changing diffusers.

``vae.decode(z)`` runs ``vae.decoder`` one latent frame at a time over a list of cached features
(``feat_cache``, one entry per causal convolution: None, the marker ``"Rep"`` or the last two frames) that
the decoder rewrites as it goes (Wan passes ``first_chunk=True`` for frame 0). Here that list is the
recurrence's state: ``step`` copies it, lets the decoder fill the copy (every entry it writes is a new tensor or
the marker; nothing is written into a cached tensor), and returns the copy. The per-frame parts of ``_decode``
(``post_quant_conv``, a 1x1x1 convolution; Wan 2.2's ``unpatchify``; the clamp to [-1, 1]) run inside the step,
so concatenating the steps' outputs gives ``vae.decode(z).sample``.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch
from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

from pychop.integrations.diffusers.recurrence import DecoderRecurrence

CacheEntry = Optional[Union[torch.Tensor, str]]


class WanDecoderRecurrence(DecoderRecurrence):
    """The decoder of an ``AutoencoderKLWan`` or ``AutoencoderKLQwenImage`` as a recurrence over latent frames.

    Segments are single latent frames (B, C, 1, h, w); ``step`` decodes one into 1 (the first frame) or 4
    video frames. The state is the list of ``num_caches`` cache entries, all None at first.
    """

    vae_classes = (AutoencoderKLWan, AutoencoderKLQwenImage)

    def __init__(self, vae: Union[AutoencoderKLWan, AutoencoderKLQwenImage]):
        super().__init__(vae)
        self.is_wan = isinstance(vae, AutoencoderKLWan)
        conv = WanCausalConv3d if self.is_wan else QwenImageCausalConv3d
        self.num_caches = sum(isinstance(m, conv) for m in vae.decoder.modules())
        self.patch_size = vae.config.get("patch_size")

    def init_state(self) -> List[CacheEntry]:
        """The empty feature cache (what ``vae.clear_cache()`` sets up)."""
        return [None] * self.num_caches

    def decode_chunk(self, state: List[CacheEntry], z_t: torch.Tensor):
        """Decode latent frame ``z_t`` (B, C, 1, h, w) with cache ``state``; returns ``(new_cache, frames)``."""
        if not isinstance(state, (list, tuple)) or len(state) != self.num_caches:
            raise ValueError(f"state must be a list of {self.num_caches} cache entries (use init_state()), "
                             f"got {type(state).__name__} of {len(state) if isinstance(state, (list, tuple)) else '-'}")
        cache = list(state)
        first_chunk = {"first_chunk": all(entry is None for entry in cache)} if self.is_wan else {}
        x = self.vae.post_quant_conv(z_t)
        out = self.vae.decoder(x, feat_cache=cache, feat_idx=[0], **first_chunk)
        if self.patch_size is not None:
            out = unpatchify(out, patch_size=self.patch_size)
        return cache, torch.clamp(out, min=-1.0, max=1.0)
