"""A reference text-to-video 3D UNet (Stable-Diffusion-1.5 layout with temporal layers), serial or Mobius-parallel.

``VideoUNet(config, st_mode="serial" | "parallel", backend="auto")`` maps noisy latents ``sample``
(B, T, C_in, H, W), a timestep per video ``timestep`` (B,) and text embeddings ``text`` (B, L, text_dim) to
(B, T, C_out, H, W). Frames travel as (B*T, C, H, W), as in diffusers' video UNets.

- Timestep embedding: sinusoidal features, Linear, SiLU, Linear; added inside every residual block.
- Down stages: per layer a ``ResConvBlock`` and, where ``config.attention[i]``, a ``VideoTransformer``; a
  stride-2 convolution between stages. A middle block (res, transformer, res). Up stages mirror the down
  stages with skip connections and nearest-neighbour upsampling.
- ``VideoTransformer``: GroupNorm, ``proj_in`` to tokens (B, T, S, C), the spatial-temporal self-attention
  block (``SerialSTBlock`` or ``ParallelSTBlock``), text cross-attention, a GEGLU feed-forward, ``proj_out``
  and the residual.

``st_mode`` sets the form of every spatial-temporal attention block and every residual block's temporal
convolution; both forms have identical parameters, so a state dict moves between them. ``freeze_spatial()``
freezes every parameter except the temporal ones (the ``temporal`` submodules of those blocks): the Mobius
fine-tuning set-up, where the text-to-image weights stay fixed and only the temporal layers train.

``TINY`` is a configuration for CPU tests; ``SD15_VIDEO`` is about a Stable-Diffusion-1.5 UNet with temporal
layers (channels 320/640/1280/1280, 8 heads, text width 768) at 16 frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pychop.nn import ResConvBlock, geglu, make_st_block
from pychop.nn.st_blocks import ST_MODES


@dataclass(frozen=True)
class VideoUNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    attention: Tuple[bool, ...] = (True, True, True, False)  # a transformer in each layer of the stage
    layers_per_block: int = 2
    heads: int = 8
    text_dim: int = 768
    norm_groups: int = 32
    # Example input size, used by benchmarks and tests: frames, latent height and width, text length.
    num_frames: int = 16
    latent_size: Tuple[int, int] = (32, 32)
    text_length: int = 77

    def __post_init__(self):
        if len(self.attention) != len(self.block_channels):
            raise ValueError(f"attention must have one entry per stage ({len(self.block_channels)}), "
                             f"got {len(self.attention)}")
        for c in self.block_channels:
            if c % self.heads or c % self.norm_groups:
                raise ValueError(f"every entry of block_channels must be divisible by heads={self.heads} and "
                                 f"norm_groups={self.norm_groups}, got {c}")


TINY = VideoUNetConfig(block_channels=(16, 32), attention=(True, True), layers_per_block=1, heads=2, text_dim=24,
                       norm_groups=4, num_frames=3, latent_size=(8, 8), text_length=5)
SD15_VIDEO = VideoUNetConfig()


def timestep_features(timestep: torch.Tensor, channels: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (B, channels) of timesteps (B,): cos then sin of geometrically spaced frequencies."""
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timestep.device) / half)
    angles = timestep.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class CrossAttention(nn.Module):
    """Frame tokens (B*T, S, C) attend to their video's text (B, L, text_dim): LayerNorm, q from the tokens, k
    and v from the text, SDPA, output projection, residual.

    As diffusers runs it, the text is repeated per frame and every frame attends to its own copy. With
    ``fold_frames`` (set by ``pychop.memory.lean_frozen``) the T frames of a video are one query sequence of
    T*S tokens attending to one copy: the same function (softmax runs over the keys, per query), with the keys
    and values computed and saved for backward once per video instead of once per frame."""

    def __init__(self, dim: int, text_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.fold_frames = False
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(text_dim, dim, bias=False)
        self.to_v = nn.Linear(text_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, text: torch.Tensor, num_frames: int) -> torch.Tensor:
        frames, length, dim = tokens.shape
        if self.fold_frames:
            queries = tokens.view(frames // num_frames, num_frames * length, dim)
        else:
            queries, text = tokens, text.repeat_interleave(num_frames, dim=0)
        n, q_length = queries.shape[:2]
        q = self.to_q(self.norm(queries)).view(n, q_length, self.heads, -1).transpose(1, 2)
        k, v = (proj(text).view(n, text.shape[1], self.heads, -1).transpose(1, 2) for proj in (self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(frames, length, dim)
        return tokens + self.to_out(out)


class FeedForward(nn.Module):
    """LayerNorm, GEGLU to 4C, Linear back to C, residual. With ``recompute_activation`` (set by
    ``pychop.memory.lean_frozen``) the GEGLU keeps only its input for backward (``pychop.nn.geglu``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.recompute_activation = False
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, 8 * dim)
        self.proj_out = nn.Linear(4 * dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        projected = self.proj_in(self.norm(tokens))
        if self.recompute_activation:
            return tokens + self.proj_out(geglu(projected))
        hidden, gate = projected.chunk(2, dim=-1)
        return tokens + self.proj_out(hidden * F.gelu(gate))


class VideoTransformer(nn.Module):
    """GroupNorm, proj_in, ST self-attention, text cross-attention, feed-forward, proj_out, residual."""

    def __init__(self, channels: int, heads: int, text_dim: int, groups: int, st_mode: str, backend: str):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.st_block = make_st_block(st_mode, channels, heads, backend=backend)
        self.cross_attention = CrossAttention(channels, text_dim, heads)
        self.feed_forward = FeedForward(channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, text: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: frames (B*T, C, H, W); text: (B, L, text_dim), one per video."""
        frames, channels, height, width = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(frames, height * width, channels)
        tokens = self.proj_in(tokens)
        tokens = self.st_block(tokens.view(frames // num_frames, num_frames, height * width, channels))
        tokens = tokens.view(frames, height * width, channels)
        tokens = self.feed_forward(self.cross_attention(tokens, text, num_frames))
        out = self.proj_out(tokens).view(frames, height, width, channels).permute(0, 3, 1, 2).contiguous()
        return x + out


class Stage(nn.Module):
    """Layers of (ResConvBlock, optional VideoTransformer); up stages take a skip connection per layer."""

    def __init__(self, channel_pairs, cfg: VideoUNetConfig, temb_channels: int, attention: bool, st_mode: str,
                 backend: str):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResConvBlock(c_in, c_out, temb_channels, groups=cfg.norm_groups, mode=st_mode)
            for c_in, c_out in channel_pairs)
        self.transformers = nn.ModuleList(
            VideoTransformer(c_out, cfg.heads, cfg.text_dim, cfg.norm_groups, st_mode, backend)
            for _, c_out in channel_pairs) if attention else None

    def layer(self, i, x, temb, text, num_frames):
        x = self.resnets[i](x, temb, num_frames)
        if self.transformers is not None:
            x = self.transformers[i](x, text, num_frames)
        return x


class VideoUNet(nn.Module):
    """Text-to-video 3D UNet (see the module docstring): ``model(sample, timestep, text)`` maps noisy latents
    (B, T, C_in, H, W), a timestep per video (B,) and text embeddings (B, L, text_dim) to (B, T, C_out, H, W).

    Args:
        config: a ``VideoUNetConfig``: ``TINY`` (default; CPU tests), ``SD15_VIDEO`` (a Stable-Diffusion-1.5
            UNet with temporal layers at 16 frames) or your own.
        st_mode: ``"serial"`` (default: spatial then temporal attention, the diffusers form) or
            ``"parallel"`` (Mobius: ``ParallelSTBlock``s, and the residual blocks' temporal convolutions beside
            their spatial part). Both have identical parameters: a state dict loads across them.
        backend: the attention backend of the parallel blocks, as for ``pychop.parallel_st_attention``
            (default ``"auto"``); the serial form always uses ``scaled_dot_product_attention``.

    ``freeze_spatial()`` leaves only the temporal layers to train; ``example_inputs(batch)`` makes random inputs
    of the config's example size.
    """

    def __init__(self, config: VideoUNetConfig = TINY, st_mode: str = "serial", backend: str = "auto"):
        super().__init__()
        if st_mode not in ST_MODES:
            raise ValueError(f"st_mode must be one of {ST_MODES}, got {st_mode!r}")
        self.config, self.st_mode = config, st_mode
        chans = config.block_channels
        temb_channels = 4 * chans[0]
        self.time_embedding = nn.Sequential(nn.Linear(chans[0], temb_channels), nn.SiLU(),
                                            nn.Linear(temb_channels, temb_channels))
        self.conv_in = nn.Conv2d(config.in_channels, chans[0], 3, padding=1)

        self.down = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skip_channels = [chans[0]]
        c_prev = chans[0]
        for i, c in enumerate(chans):
            pairs = [(c_prev if j == 0 else c, c) for j in range(config.layers_per_block)]
            self.down.append(Stage(pairs, config, temb_channels, config.attention[i], st_mode, backend))
            skip_channels += [c] * config.layers_per_block
            c_prev = c
            last = i == len(chans) - 1
            self.downsamplers.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
            if not last:
                skip_channels.append(c)

        self.mid = Stage([(chans[-1], chans[-1]), (chans[-1], chans[-1])], config, temb_channels, False, st_mode,
                         backend)
        self.mid_transformer = VideoTransformer(chans[-1], config.heads, config.text_dim, config.norm_groups,
                                                st_mode, backend)

        self.up = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for i, c in reversed(list(enumerate(chans))):
            pairs = []
            for _ in range(config.layers_per_block + 1):
                pairs.append((c_prev + skip_channels.pop(), c))
                c_prev = c
            self.up.append(Stage(pairs, config, temb_channels, config.attention[i], st_mode, backend))
            self.upsamplers.append(nn.Identity() if i == 0 else nn.Conv2d(c, c, 3, padding=1))

        self.norm_out = nn.GroupNorm(config.norm_groups, chans[0])
        self.conv_out = nn.Conv2d(chans[0], config.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        self._check_inputs(sample, timestep, text)
        B, T, C, H, W = sample.shape
        temb = self.time_embedding(timestep_features(timestep, self.config.block_channels[0]).to(sample.dtype))
        temb = temb.repeat_interleave(T, dim=0)

        x = self.conv_in(sample.reshape(B * T, C, H, W))
        skips = [x]
        for stage, downsample in zip(self.down, self.downsamplers):
            for i in range(len(stage.resnets)):
                x = stage.layer(i, x, temb, text, T)
                skips.append(x)
            if not isinstance(downsample, nn.Identity):
                x = downsample(x)
                skips.append(x)

        x = self.mid.resnets[0](x, temb, T)
        x = self.mid_transformer(x, text, T)
        x = self.mid.resnets[1](x, temb, T)

        for stage, upsample in zip(self.up, self.upsamplers):
            for i in range(len(stage.resnets)):
                x = stage.layer(i, torch.cat([x, skips.pop()], dim=1), temb, text, T)
            if not isinstance(upsample, nn.Identity):
                x = upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))

        x = self.conv_out(F.silu(self.norm_out(x)))
        return x.view(B, T, *x.shape[1:])

    def _check_inputs(self, sample, timestep, text):
        cfg = self.config
        if sample.dim() != 5 or sample.shape[2] != cfg.in_channels:
            raise ValueError(f"sample must have shape (B, T, {cfg.in_channels}, H, W), got {tuple(sample.shape)}")
        factor = 2 ** (len(cfg.block_channels) - 1)
        if sample.shape[3] % factor or sample.shape[4] % factor:
            raise ValueError(f"sample's H and W must be divisible by {factor}, got {tuple(sample.shape[3:])}")
        if timestep.shape != (sample.shape[0],):
            raise ValueError(f"timestep must have shape (B,) = ({sample.shape[0]},), got {tuple(timestep.shape)}")
        if text.dim() != 3 or text.shape[0] != sample.shape[0] or text.shape[2] != cfg.text_dim:
            raise ValueError(f"text must have shape (B={sample.shape[0]}, L, {cfg.text_dim}), got {tuple(text.shape)}")

    def temporal_modules(self):
        """The temporal submodules: each attention block's and each residual block's ``temporal``."""
        return [m.temporal for m in self.modules() if isinstance(getattr(m, "temporal", None), nn.Module)]

    def freeze_spatial(self) -> "VideoUNet":
        """Freezes every parameter but the temporal ones (Mobius fine-tuning); returns self."""
        self.requires_grad_(False)
        for module in self.temporal_modules():
            module.requires_grad_(True)
        return self

    def example_inputs(self, batch: int = 1, device=None, dtype=None):
        """Random (sample, timestep, text) at the config's example size."""
        cfg = self.config
        sample = torch.randn(batch, cfg.num_frames, cfg.in_channels, *cfg.latent_size, device=device, dtype=dtype)
        timestep = torch.randint(0, 1000, (batch,), device=device)
        text = torch.randn(batch, cfg.text_length, cfg.text_dim, device=device, dtype=dtype)
        return sample, timestep, text
