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
from typing import Any, Callable, Dict, Iterable, List, Tuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils import _pytree as pytree


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
        self._cache_shapes: Dict[Tuple[int, ...], Dict[str, Tuple[int, ...]]] = {}  # latent (h, w) -> entry -> shape

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

    def decode_chunk(self, state: Any, z_seg: torch.Tensor) -> Tuple[Any, torch.Tensor]:
        """The family's step: decode chunk ``z_seg`` with cache ``state``; returns ``(new_cache, frames)``."""
        raise NotImplementedError

    def step(self, state: Any, z_seg: torch.Tensor) -> Tuple[Any, torch.Tensor]:
        """Decode chunk ``z_seg`` (B, C, t, h, w) with cache ``state``; returns ``(new_state, frames)``.

        A state must be one this recurrence's step returned (or ``init_state()``): its caches must have z_seg's
        batch size and, once the recurrence has decoded latents of z_seg's height and width, the shapes its own
        caches have there; both are checked before the decoder runs, and a mismatch is refused naming the
        cache entry (a state of another batch, latent size or model)."""
        self.check_state(state, z_seg)
        if torch.is_grad_enabled():
            self.check_synchronised()
        new_state, frames = self.decode_chunk(state, z_seg)
        known = self._cache_shapes.setdefault(tuple(z_seg.shape[3:]), {})
        for where, leaf in _cache_tensors(new_state):
            known[where] = _cache_shape(leaf)
        return new_state, frames

    def check_synchronised(self) -> None:
        """Raise when the decoder trains in a group of several processes but this step runs outside
        ``DistributedDataParallel``: each rank would keep its own gradients, silently."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        if getattr(DistributedDataParallel, "_active_ddp_module", None) is not None:
            return  # inside a DDP forward: a DDP-wrapped VAE, or the caller's DDP module around the step
        if any(p.requires_grad for p in self.vae.decoder.parameters()):
            raise RuntimeError(
                f"the decoder of this {type(self.vae).__name__} has parameters that require grad and "
                f"{dist.get_world_size()} processes train together, but this step runs outside "
                "DistributedDataParallel: each rank would keep its own gradients. Pass the DDP-wrapped VAE to "
                "decoder_recurrence (accelerator.prepare(vae)'s result, not accelerator.unwrap_model(vae)), or run "
                "rec.step inside a DDP module of your own, or freeze the decoder")

    def check_state(self, state: Any, z_seg: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the first cache in ``state`` that cannot be one of this decoder's caches for
        ``z_seg`` (see ``step``)."""
        known = self._cache_shapes.get(tuple(z_seg.shape[3:]))
        for where, leaf in _cache_tensors(state):
            if leaf.shape[0] != z_seg.shape[0]:
                raise ValueError(f"state{where} holds a cache of batch {leaf.shape[0]}, but z_seg has batch "
                                 f"{z_seg.shape[0]}: the state comes from another batch; start from init_state()")
            if known is None:
                continue
            if where not in known:
                raise ValueError(f"state{where} is not a cache of this decoder ({type(self.vae).__name__}): the "
                                 "state comes from another model; start from init_state()")
            if _cache_shape(leaf) != known[where]:
                raise ValueError(
                    f"state{where} has shape {tuple(leaf.shape)} where this decoder's cache has (B, "
                    f"{', '.join(map(str, known[where]))}) without its frames, for latents of {z_seg.shape[3]}x"
                    f"{z_seg.shape[4]}: the state comes from another model or latent size; start from init_state()")

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


class DistributedStep:
    """The ``step`` of a recurrence whose VAE is wrapped in ``DistributedDataParallel`` (``ddp``): each call runs
    through the wrapper's forward, the VAE's forward being ``step`` for its duration, so that the backward
    averages the decoder's gradients over ranks as DDP does. ``no_sync()`` is the wrapper's: ``stream`` runs
    every segment but the last under it, so one reduction follows the last backward."""

    def __init__(self, step: Callable[[Any, torch.Tensor], Tuple[Any, torch.Tensor]],
                 ddp: DistributedDataParallel):
        self.local_step, self.ddp = step, ddp

    def __call__(self, state: Any, z_seg: torch.Tensor) -> Tuple[Any, torch.Tensor]:
        with replaced_forwards([self.ddp.module], lambda _vae, s, z: self.local_step(s, z)):
            return self.ddp(state, z_seg)

    def no_sync(self):
        return self.ddp.no_sync()


def _cache_tensors(state: Any) -> List[Tuple[str, torch.Tensor]]:
    """(where, tensor) of every tensor in a state: ``where`` is its path, e.g. ``[3]`` or ``['up_block_0']``."""
    return [(pytree.keystr(path), leaf) for path, leaf in pytree.tree_flatten_with_path(state)[0]
            if isinstance(leaf, torch.Tensor)]


def _cache_shape(cache: torch.Tensor) -> Tuple[int, ...]:
    """A cache's shape without its batch and, for (B, C, T, H, W) caches, its number of frames."""
    return tuple(size for d, size in enumerate(cache.shape) if d != 0 and not (cache.dim() == 5 and d == 2))


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
