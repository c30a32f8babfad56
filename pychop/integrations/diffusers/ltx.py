"""ChopGrad on the decoder of diffusers' ``AutoencoderKLLTXVideo`` when that decoder is causal, without changing
diffusers; ``ltx_refusal`` says why the others are not recurrences.

The released LTX-Video decoders are not causal (``decoder_causal=False``): every temporal convolution pads
both ends and reads the next frame, so no frame is final before the clip ends. With ``decoder_causal=True``
each temporal convolution sees the current and the two previous frames (the first frame replicated before
the start), the norms act per position, and each upsampler expands every frame into ``stride[0]`` frames
and drops the first ``stride[0] - 1`` of the clip. Decoding latent frame by latent frame then gives the
one-shot decode exactly when every convolution is fed the last frames entering it in the previous step and
the upsamplers drop frames in the first step only. diffusers' layers take no cache, so ``step`` runs the
convolutions and upsamplers with ``cached_causal_conv`` and ``upsample`` for its duration; the state is the
list of the frames cached for each causal convolution (None at first).
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from diffusers import AutoencoderKLLTXVideo
from diffusers.models.autoencoders.autoencoder_kl_ltx import LTXVideoCausalConv3d, LTXVideoUpsampler3d
from einops import rearrange

from pychop.integrations.diffusers.recurrence import DecoderRecurrence, cached_frames, replaced_forwards

DEPTH_TO_SPACE = "b (c st sh sw) t h w -> b c (t st) (h sh) (w sw)"


def ltx_refusal(vae: AutoencoderKLLTXVideo) -> Optional[str]:
    """Why ``vae``'s decode is not a recurrence ``decoder_recurrence`` supports, or None when it is."""
    decoder = vae.decoder
    if any(isinstance(m, LTXVideoCausalConv3d) and not m.is_causal for m in decoder.modules()):
        return ("AutoencoderKLLTXVideo cannot be decoded as an exact recurrence: its decoder's temporal "
                "convolutions are not causal (decoder_causal=False, as in the released LTX-Video checkpoints), so "
                "each frame reads the next one")
    if any(getattr(m, "per_channel_scale1", None) is not None for m in decoder.modules()):
        return ("AutoencoderKLLTXVideo with decoder_inject_noise cannot be decoded as an exact recurrence: its "
                "decoder draws one spatial noise per decode call and adds it to every frame")
    if decoder.time_embedder is not None:
        return ("AutoencoderKLLTXVideo with timestep_conditioning is not supported: vae.decode(z, temb) takes a "
                "timestep that decoder_recurrence does not carry")
    return None


class LTXVideoDecoderRecurrence(DecoderRecurrence):
    """The causal decoder of an ``AutoencoderKLLTXVideo`` as a recurrence over latent frames: ``step``
    decodes one into ``temporal_compression_ratio`` video frames (8), the first into 1."""

    vae_classes = (AutoencoderKLLTXVideo,)

    def __init__(self, vae: AutoencoderKLLTXVideo):
        super().__init__(vae)
        reason = ltx_refusal(vae)
        if reason:
            raise TypeError(reason)
        self.convs = [m for m in vae.decoder.modules() if isinstance(m, LTXVideoCausalConv3d)]
        self.upsamplers = [m for m in vae.decoder.modules() if isinstance(m, LTXVideoUpsampler3d)]

    def check_decodable(self) -> None:
        super().check_decodable()
        if self.vae.use_framewise_decoding:
            raise ValueError("AutoencoderKLLTXVideo with framewise decoding (vae.use_framewise_decoding) blends "
                             "overlapping temporal tiles, which no recurrence reproduces; turn it off")

    def init_state(self) -> None:
        return None

    def decode_chunk(self, state: Optional[List[Any]], z_seg: torch.Tensor):
        """Decode latent frames ``z_seg`` (B, C, t, h, w) with cache ``state`` (None for the first); returns
        ``(new_cache, frames)``."""
        first = state is None
        if not first and (not isinstance(state, (list, tuple)) or len(state) != len(self.convs)):
            raise ValueError(f"state must be None (init_state()) or the list of {len(self.convs)} caches a step "
                             f"returned, got {type(state).__name__}")
        if first:
            self.check_decodable()
        entering = [None] * len(self.convs) if first else list(state)
        leaving: List[Any] = [None] * len(self.convs)
        index = {id(conv): k for k, conv in enumerate(self.convs)}

        def cached_causal_conv(conv, hidden_states):
            """The causal convolution on ``hidden_states`` preceded by the frames cached for it (the first
            frame replicated in the first step); caches the last ``kernel - 1`` frames it read."""
            k = index[id(conv)]
            pad = conv.kernel_size[0] - 1
            front = hidden_states[:, :, :1].expand(-1, -1, pad, -1, -1) if first else entering[k]
            padded = torch.cat([front, hidden_states], dim=2) if pad else hidden_states
            leaving[k] = cached_frames(padded, pad)
            return conv.conv(padded)

        def upsample(upsampler, hidden_states):
            """Depth to space in time and space (as diffusers' upsampler); the first ``stride[0] - 1`` frames
            of the clip are dropped in the first step only."""
            st, sh, sw = upsampler.stride
            out = rearrange(upsampler.conv(hidden_states), DEPTH_TO_SPACE, st=st, sh=sh, sw=sw)
            if upsampler.residual:
                residual = rearrange(hidden_states, DEPTH_TO_SPACE, st=st, sh=sh, sw=sw)
                out = out + residual.repeat(1, st * sh * sw // upsampler.upscale_factor, 1, 1, 1)
            return out[:, :, st - 1:] if first else out

        with replaced_forwards(self.convs, cached_causal_conv), replaced_forwards(self.upsamplers, upsample):
            frames = self.vae.decoder(z_seg)
        return leaving, frames
