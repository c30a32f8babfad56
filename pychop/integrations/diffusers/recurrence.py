"""What every diffusers video-VAE decoder recurrence shares: the interface, the split of latents into
segments, the plain decode, and a way to run a decoder layer with a carried cache for the duration of a step.

A decoder recurrence turns ``vae.decode`` into ``state, frames_i = step(state, z_i)`` over chunks ``z_i`` of
latent frames, with the decoder's causal cache as the state (see ``pychop.chopgrad``). Each family (``wan``,
``cogvideox``, ``mochi``, ``ltx``) says how its decoder is called on one chunk, what its empty cache is and
how it chunks the latents; ``pychop.integrations.diffusers.decoder_recurrence`` picks the family.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterable, List, Tuple

import torch


class DecoderRecurrence:
    """The decoder of a diffusers video VAE as a pure recurrence over chunks of latent frames::

        rec = decoder_recurrence(vae)
        loss = stream(rec.step, rec.init_state(), rec.segments(z), loss_fn, window=2)

    ``segments(z)`` splits latents ``(B, C, T, h, w)`` along T into the chunks ``vae.decode`` decodes one at
    a time (``segment_lengths(T)`` frames each); ``step(state, z_seg) -> (state, frames)`` decodes one chunk
    into its video frames ``(B, 3, F, H, W)``; ``decode(z)``, the steps' frames concatenated, equals
    ``vae.decode(z).sample``. The state is the decoder's own cache (None entries and marker strings pass
    through ``pychop.chopgrad`` untouched); ``step`` never writes into a cached tensor. Spatial tiling
    (``vae.enable_tiling()``) is refused: its overlapping tiles are separate recurrences blended together.
    """

    vae_classes: Tuple[type, ...] = ()

    def __init__(self, vae: Any):
        if not isinstance(vae, self.vae_classes):
            names = " or ".join(cls.__name__ for cls in self.vae_classes)
            raise TypeError(f"vae must be a diffusers {names}, got {type(vae).__name__}")
        self.vae = vae

    @property
    def latent_channels(self) -> int:
        config = self.vae.config
        return config.get("latent_channels", config.get("z_dim"))

    def init_state(self) -> Any:
        """The empty cache: the state entering the first chunk."""
        return None

    def segment_lengths(self, num_frames: int) -> List[int]:
        """Latent frames per chunk, for latents of ``num_frames`` frames (one each unless the family chunks)."""
        return [1] * num_frames

    def step(self, state: Any, z_seg: torch.Tensor) -> Tuple[Any, torch.Tensor]:
        raise NotImplementedError

    def segments(self, z: torch.Tensor) -> List[torch.Tensor]:
        """``z`` (B, C, T, h, w) split along T into the chunks ``vae.decode`` decodes one at a time."""
        if not isinstance(z, torch.Tensor) or z.dim() != 5 or z.shape[1] != self.latent_channels or z.shape[2] < 1:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be latents (B, {self.latent_channels}, T, h, w) with T >= 1 for "
                             f"{type(self.vae).__name__}, got {got}")
        self.check_decodable()
        return list(z.split(self.segment_lengths(z.shape[2]), dim=2))

    def check_decodable(self) -> None:
        """Raise if the VAE is set to decode in a way that is not this recurrence."""
        if getattr(self.vae, "use_tiling", False):
            raise ValueError(f"{type(self.vae).__name__} has spatial tiling on (vae.use_tiling): its overlapping "
                             "tiles are decoded as separate recurrences and blended, which one recurrence does not "
                             "reproduce; call vae.disable_tiling() first")

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The plain recurrence, concatenated along frames: equals ``vae.decode(z).sample``."""
        state, frames = self.init_state(), []
        for z_seg in self.segments(z):
            state, y = self.step(state, z_seg)
            frames.append(y)
        return torch.cat(frames, dim=2)


def cached_frames(padded: torch.Tensor, count: int) -> Any:
    """The last ``count`` frames of ``padded`` (B, C, T, H, W) as a new tensor (not a view that would keep the
    whole input alive inside the state), or None when ``count`` is 0."""
    if count == 0:
        return None
    return padded[:, :, padded.shape[2] - count:].clone()


@contextlib.contextmanager
def replaced_forwards(modules: Iterable[torch.nn.Module], forward: Callable[..., Any]):
    """For the duration of the block, each module's ``forward`` is ``forward(module, *args, **kwargs)``;
    afterwards the modules are exactly as before (an instance-level forward, as accelerate's hooks set, is
    restored). Used to run a diffusers layer with a carried cache that its own forward does not take."""
    modules = list(modules)
    previous = [module.__dict__.get("forward") for module in modules]
    for module in modules:
        module.forward = functools.partial(forward, module)
    try:
        yield
    finally:
        for module, before in zip(modules, previous):
            if before is None:
                del module.forward
            else:
                module.forward = before
