"""Synthetic videos for the outcome suites: textured shapes moving over a drifting textured background.

``moving_shapes(batch, frames, size, generator)`` -> (B, C, frames, size, size) float32 in [-1, 1], the same
for the same generator state (no download, no global RNG). Each clip holds ``shapes`` discs and squares, each
with a stripe texture of its own frequency, orientation and pair of colours that moves with it, at constant
velocity, bouncing off the borders, occluding in a fixed order; the background is low-contrast stripes
drifting slowly. A model can predict a frame from the previous ones (motion is smooth) but not from one
frame alone (the velocities), which is what temporal layers and temporal losses are about.
"""

from __future__ import annotations

import math

import torch


def moving_shapes(batch: int, frames: int, size: int, generator: torch.Generator, *, channels: int = 3,
                  shapes: int = 3, speed: float = 0.06) -> torch.Tensor:
    """(batch, channels, frames, size, size) videos in [-1, 1]; ``speed``: the largest per-frame displacement
    per axis, in image widths."""
    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    t = torch.arange(frames, dtype=torch.float32).view(1, 1, frames, 1)
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    gy, gx = grid.view(size, 1), grid.view(1, size)

    def stripes(frequency, angle, phase):
        """A stripe pattern in [0, 1] on coordinates relative to a point: f(dy, dx)."""
        def pattern(dy, dx):
            along = dy * torch.sin(angle) + dx * torch.cos(angle)
            return 0.5 + 0.5 * torch.sin(2 * math.pi * frequency * along + phase)
        return pattern

    # background: two colours mixed by stripes drifting at a fifth of the shapes' speed
    base = rand(batch, channels, 1, 1, 1) * 1.2 - 0.6
    colours = torch.stack([base, base + (rand(batch, channels, 1, 1, 1) - 0.5) * 0.6], dim=1)
    drift = (rand(batch, 2) - 0.5) * 0.4 * speed
    shift = drift[:, :, None] * torch.arange(frames, dtype=torch.float32)  # (B, 2, frames)
    background = stripes(1 + 2 * rand(batch, 1, 1, 1), math.pi * rand(batch, 1, 1, 1),
                         2 * math.pi * rand(batch, 1, 1, 1))
    mix = background(gy - shift[:, 0, :, None, None], gx - shift[:, 1, :, None, None])  # (B, frames, H, W)
    video = colours[:, 0] + (colours[:, 1] - colours[:, 0]) * mix[:, None]

    centre = rand(batch, shapes, 1, 2) + (rand(batch, shapes, 1, 2) - 0.5) * 2 * speed * t
    centre = 1 - ((centre % 2) - 1).abs()  # (B, K, frames, 2), reflected into [0, 1]
    radius = 0.12 + 0.12 * rand(batch, shapes, 1, 1, 1)
    square = rand(batch, shapes, 1, 1, 1) < 0.5
    inside, outside = rand(batch, shapes, channels, 1, 1, 1) * 2 - 1, rand(batch, shapes, channels, 1, 1, 1) * 2 - 1
    texture = stripes(1.5 + 2.5 * rand(batch, shapes, 1, 1, 1), math.pi * rand(batch, shapes, 1, 1, 1),
                      2 * math.pi * rand(batch, shapes, 1, 1, 1))
    dy = gy - centre[..., 0, None, None]  # (B, K, frames, H, W)
    dx = gx - centre[..., 1, None, None]
    distance = torch.where(square, torch.maximum(dy.abs(), dx.abs()), (dy ** 2 + dx ** 2).sqrt())
    masks = torch.sigmoid((radius - distance) * size)  # soft edges, a few pixels wide
    pattern = texture(dy, dx)
    for k in range(shapes):
        fill = outside[:, k] + (inside[:, k] - outside[:, k]) * pattern[:, k, None]
        video = video * (1 - masks[:, k, None]) + fill * masks[:, k, None]
    return video.clamp(-1, 1)
