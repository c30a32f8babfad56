"""A reference Wan-style causal video decoder, written as a recurrence over latent frames.

Latents ``(B, latent_channels, T, h, w)`` decode to video ``(B, out_channels, 1 + 4 (T - 1), 8 h, 8 w)``
with the default three stages (two temporal and three spatial x2 upsamplings): latent frame 0 becomes one
frame, every later latent frame four. Every temporal mixing is a causal 3D convolution (kernel 3 in time:
frame t sees t-2, t-1, t), so the decoder runs frame by frame with a feature cache of the last two input
frames of each causal convolution; that cache is the recurrence's state:

- ``init_state()`` -> a list of ``None`` (one entry per causal convolution; None reads as zero frames).
- ``step(state, z_t)`` -> ``(new_state, frames)``: one latent frame ``(B, C, 1, h, w)`` in, its decoded
  frames out. Pure: the new state is a new list of new tensors (``pychop.chopgrad`` needs that).
- ``forward(z)`` decodes the whole clip at once with zero-padded causal convolutions: an independent
  implementation that ``step`` must match frame for frame.

Temporal upsampling follows Wan: a causal time convolution doubles the channels, which are interleaved into
two frames per input frame; the very first frame is passed through alone, and the time convolution of
later frames starts from zeros (frame 0 is not in its history).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

CACHE_FRAMES = 2


@dataclass(frozen=True)
class CausalDecoderConfig:
    """Widths per stage (first = at the latent resolution); stage i upsamples 2x in space after its blocks
    (all but the last), and 2x in time where ``temporal_upsample[i]``."""
    latent_channels: int = 16
    out_channels: int = 3
    channels: Tuple[int, ...] = (384, 384, 192, 96)
    num_res_blocks: int = 2
    temporal_upsample: Tuple[bool, ...] = (True, True, False)

    @classmethod
    def tiny(cls) -> "CausalDecoderConfig":
        """For tests on a CPU: about 80k parameters."""
        return cls(latent_channels=4, out_channels=3, channels=(16, 8, 8), num_res_blocks=1,
                   temporal_upsample=(True, True))

    @classmethod
    def wan(cls) -> "CausalDecoderConfig":
        """Wan 2.1 decoder widths (base 96, multipliers 1, 2, 4, 4), for GPU benchmarks."""
        return cls()


class _Cache:
    """Reads the old cache entries in order and collects the new ones (None: run without a cache)."""

    def __init__(self, old: Optional[Sequence]):
        self.old = old
        self.new: List = []

    @property
    def streaming(self) -> bool:
        return self.old is not None

    @property
    def first(self) -> bool:
        return self.old is not None and self.old[0] is None

    def take(self):
        return self.old[len(self.new)]

    def take_history(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The next entry, the frames preceding ``x`` (B, C, t, H, W); checked to be None or a tensor of shape
        (B, C, CACHE_FRAMES, H, W) on x's device and of its dtype."""
        index, entry = len(self.new), self.take()
        if entry is None:
            return None
        if not isinstance(entry, torch.Tensor):
            raise ValueError(f"state[{index}] must be None or a tensor, got {type(entry).__name__}")
        expected = (x.shape[0], x.shape[1], CACHE_FRAMES, *x.shape[3:])
        if tuple(entry.shape) != expected:
            raise ValueError(
                f"state[{index}] holds a cache of shape {tuple(entry.shape)}; this convolution needs {expected} for "
                "its input: the state comes from another batch or latent size, or from another model; start from "
                "init_state()")
        if entry.device != x.device or entry.dtype != x.dtype:
            raise ValueError(f"state[{index}] is {entry.dtype} on {entry.device}, the decoder runs {x.dtype} on "
                             f"{x.device}; start from init_state()")
        return entry

    def put(self, entry) -> None:
        self.new.append(entry)


class CausalConv3d(nn.Conv3d):
    """3D convolution, kernel (3, k, k): zero-padded 'same' in space, causal in time (two frames of history:
    the cache when streaming, zeros otherwise)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(in_channels, out_channels, (3, kernel_size, kernel_size),
                         padding=(0, kernel_size // 2, kernel_size // 2))

    def forward(self, x: torch.Tensor, cache: _Cache) -> torch.Tensor:
        history = cache.take_history(x) if cache.streaming else None
        if history is None:
            history = x.new_zeros(x.shape[0], x.shape[1], CACHE_FRAMES, *x.shape[3:])
        x = torch.cat([history, x], dim=2)
        if cache.streaming:
            cache.put(x[:, :, -CACHE_FRAMES:].clone())
        return super().forward(x)


class RMSNorm(nn.Module):
    """Normalizes each position's channel vector to unit RMS, times a learned gain (frame-local: causal)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * (x.shape[1] ** 0.5) * self.gain


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1, self.conv1 = RMSNorm(in_channels), CausalConv3d(in_channels, out_channels)
        self.norm2, self.conv2 = RMSNorm(out_channels), CausalConv3d(out_channels, out_channels)
        self.shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, cache: _Cache) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return h + (x if self.shortcut is None else self.shortcut(x))


class Upsample(nn.Module):
    """Optional 2x in time (causal time convolution to 2C channels, interleaved into frame pairs; the first
    frame of the clip passes alone), then 2x nearest in space and a 3x3 convolution to ``out_channels``."""

    def __init__(self, channels: int, out_channels: int, temporal: bool):
        super().__init__()
        self.time_conv = CausalConv3d(channels, 2 * channels, kernel_size=1) if temporal else None
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def _double_frames(self, x: torch.Tensor, cache: _Cache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        pairs = self.time_conv(x, cache).view(b, 2, c, t, h, w)
        return pairs.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)

    def forward(self, x: torch.Tensor, cache: _Cache) -> torch.Tensor:
        if self.time_conv is not None:
            if not cache.streaming:
                if x.shape[2] > 1:
                    x = torch.cat([x[:, :, :1], self._double_frames(x[:, :, 1:], cache)], dim=2)
            elif cache.first:
                cache.take()
                cache.put(None)  # frame 0 skips the time convolution; its history stays empty (zeros)
            else:
                x = self._double_frames(x, cache)
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        frames = self.conv(F.interpolate(frames, scale_factor=2.0, mode="nearest"))
        return frames.view(b, t, -1, 2 * h, 2 * w).permute(0, 2, 1, 3, 4)


class CausalVideoDecoder(nn.Module):
    """A Wan-style causal video decoder as a recurrence (see the module docstring): ``step(state, z_t)`` decodes
    one latent frame (B, C, 1, h, w) given the cache ``state`` (``init_state()`` to start), ``forward(z)`` a
    whole clip (B, C, T, h, w) -> (B, out_channels, 1 + 4 (T - 1), 8 h, 8 w) with the default stages.

    Args:
        config: a ``CausalDecoderConfig``; the default has Wan 2.1's decoder widths (for GPUs),
            ``CausalDecoderConfig.tiny()`` about 80k parameters (for CPUs and tests).
    """

    def __init__(self, config: CausalDecoderConfig = CausalDecoderConfig()):
        super().__init__()
        if len(config.temporal_upsample) != len(config.channels) - 1:
            raise ValueError("config.temporal_upsample needs one flag per upsampling (len(channels) - 1), got "
                             f"{len(config.temporal_upsample)} for {len(config.channels)} stages")
        self.config = config
        widths = config.channels
        self.conv_in = CausalConv3d(config.latent_channels, widths[0])
        self.mid = nn.ModuleList([ResBlock(widths[0], widths[0]) for _ in range(2)])
        self.stages = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        in_width = widths[0]
        for i, width in enumerate(widths):
            blocks = [ResBlock(in_width if j == 0 else width, width) for j in range(config.num_res_blocks + 1)]
            self.stages.append(nn.ModuleList(blocks))
            if i + 1 < len(widths):
                self.upsamples.append(Upsample(width, width, config.temporal_upsample[i]))
            in_width = width
        self.norm_out = RMSNorm(widths[-1])
        self.conv_out = CausalConv3d(widths[-1], config.out_channels)
        self.num_caches = sum(isinstance(m, CausalConv3d) for m in self.modules())

    def _run(self, z: torch.Tensor, cache: _Cache) -> torch.Tensor:
        x = self.conv_in(z, cache)
        for block in self.mid:
            x = block(x, cache)
        for i, blocks in enumerate(self.stages):
            for block in blocks:
                x = block(x, cache)
            if i < len(self.upsamples):
                x = self.upsamples[i](x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)

    def init_state(self) -> List[Optional[torch.Tensor]]:
        """The empty cache: one None per causal convolution."""
        return [None] * self.num_caches

    def step(self, state: Sequence[Optional[torch.Tensor]], z_t: torch.Tensor):
        """Decode one latent frame ``z_t`` (B, C, 1, h, w) given the cache ``state``; returns
        ``(new_state, frames)``, frames (B, out, 1 or 4, 8h, 8w) (1 for the clip's first frame)."""
        if len(state) != self.num_caches:
            raise ValueError(f"state must hold {self.num_caches} cache entries (use init_state()), "
                             f"got {len(state)}")
        if z_t.dim() != 5 or z_t.shape[2] != 1:
            raise ValueError(f"z_t must be one latent frame (B, C, 1, h, w), got {tuple(z_t.shape)}")
        cache = _Cache(state)
        frames = self._run(z_t, cache)
        return cache.new, frames

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a whole clip ``z`` (B, C, T, h, w) at once (zero-padded causal convolutions)."""
        if z.dim() != 5:
            raise ValueError(f"z must be (B, C, T, h, w), got {tuple(z.shape)}")
        return self._run(z, _Cache(None))
