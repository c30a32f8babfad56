"""Residual convolution block of a video UNet with a spatial and a temporal part, in serial or parallel form.

Frames travel as (B*T, C, H, W), as in diffusers' video UNets. ``ResConvBlock(x, temb, num_frames)``:

    spatial:   x_skip = skip(x);  r = conv2(silu(norm2(conv1(silu(norm1(x))) + time_proj(silu(temb)))))
    serial:    y = x_skip + r;  out = y + temporal(y)            (the temporal conv reads the spatial output)
    parallel:  out = x_skip + r + temporal(x_skip)               (both read the block input)

``temporal`` is ``TemporalConv``: GroupNorm, SiLU and a (3, 1, 1) convolution over frames on (B, C, T, H, W),
returning a residual update. The spatial parameters (``norm1``, ``conv1``, ``time_proj``, ``norm2``,
``conv2``, ``skip``) and the temporal ones (``temporal``) are separate modules of the same shapes in both
forms, so a state dict moves between the forms and either side can be frozen.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pychop.ops.frame_mixing import frame_group_norm, frame_halo

CONV_MODES = ("serial", "parallel")


class TemporalConv(nn.Module):
    """GroupNorm, SiLU, Conv3d with kernel (3, 1, 1) across frames: (B*T, C, H, W) -> update of that shape.

    ``frame_group`` (None, or a process group / ``FrameShards`` set by ``pychop.distributed.shard_frames``): x
    holds this rank's frames of videos sharded over it; the GroupNorm statistics span every rank's frames
    (``frame_group_norm``) and the convolution reads one frame of each neighbouring rank (``frame_halo``)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.conv = nn.Conv3d(channels, channels, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        self.frame_group = None

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        frames, channels, height, width = x.shape
        video = x.view(frames // num_frames, num_frames, channels, height, width).permute(0, 2, 1, 3, 4)
        if self.frame_group is None:
            update = self.conv(F.silu(self.norm(video)))
        else:
            group, norm = self.frame_group, self.norm
            normed = frame_group_norm(video, norm.num_groups, norm.weight, norm.bias, norm.eps, frame_group=group)
            update = F.conv3d(frame_halo(F.silu(normed), 2, 1, frame_group=group), self.conv.weight, self.conv.bias)
        return update.permute(0, 2, 1, 3, 4).reshape(frames, channels, height, width)


class ResConvBlock(nn.Module):
    """Residual block of two 3x3 frame convolutions with a timestep embedding, plus a temporal convolution."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, groups: int = 32,
                 mode: str = "serial"):
        super().__init__()
        if mode not in CONV_MODES:
            raise ValueError(f"mode must be one of {CONV_MODES}, got {mode!r}")
        self.mode = mode
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.temporal = TemporalConv(out_channels, groups)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: (B*T, C_in, H, W); temb: (B*T, temb_channels) -> (B*T, C_out, H, W)."""
        if x.dim() != 4 or x.shape[0] % num_frames:
            raise ValueError(f"x must be frames (B*T, C, H, W) with B*T divisible by num_frames={num_frames}, "
                             f"got {tuple(x.shape)}")
        h = self.spatial_residual(x, temb)
        skip = self.skip(x)
        if self.mode == "serial":
            y = skip + h
            return y + self.temporal(y, num_frames)
        return skip + h + self.temporal(skip, num_frames)

    def spatial_residual(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """r of the module docstring: the spatial update, from ``norm1``, ``conv1``, ``time_proj``, ``norm2``
        and ``conv2`` alone (``pychop.memory.lean_frozen`` recomputes it when they are frozen)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]
        return self.conv2(F.silu(self.norm2(h)))

    def spatial_modules(self):
        """The modules ``spatial_residual`` computes with."""
        return [self.norm1, self.conv1, self.time_proj, self.norm2, self.conv2]
