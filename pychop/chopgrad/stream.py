"""``stream``: truncated backpropagation through a recurrence, segment by segment, in constant memory."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from pychop.chopgrad.replay import SegmentReplay, cuda_devices
from pychop.chopgrad.state import (
    Step,
    call_step,
    check_callables,
    check_segments,
    check_window,
    detach_state,
    tensor_leaves,
)
from pychop.chopgrad.window import recompute_sweep, retain_sweep

STRATEGIES = ("recompute", "retain")


def _synchronises(step: Any) -> bool:
    """Whether ``step`` reduces gradients over ranks in its backward and offers ``no_sync()`` to defer that
    (a ``DistributedDataParallel`` module, or the step of a diffusers recurrence of a DDP-wrapped VAE)."""
    return callable(getattr(step, "no_sync", None))


def _grad_checked(loss_fn: Callable[[Any, int], torch.Tensor]) -> Callable[[Any, int], torch.Tensor]:
    """``loss_fn``, refusing a loss that cannot be backpropagated unless it is a zero (a segment without a loss):
    plain autograd raises for such a loss; skipping it would leave ``.grad`` untouched without a word."""
    def checked(y: Any, index: int) -> torch.Tensor:
        loss = loss_fn(y, index)
        if isinstance(loss, torch.Tensor) and not loss.requires_grad and bool((loss != 0).any()):
            raise RuntimeError(
                f"loss_fn(y_seg, {index}) returned a loss that does not require grad (value {loss.detach().sum()}"
                f"), so nothing could be backpropagated from it. Compute it from y_seg with autograd on (not under "
                "torch.no_grad(), not from .detach() or .item()), check that the step has parameters or inputs "
                "that require grad, and return a zero for a segment that has no loss")
        return loss
    return checked


def stream(step: Step, state: Any, segments: Sequence[torch.Tensor],
           loss_fn: Callable[[Any, int], torch.Tensor], *, window: int = 1, strategy: str = "recompute",
           return_outputs: bool = False, backward: Optional[Callable[[torch.Tensor], Any]] = None
           ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[Any]]]:
    """Run ``state, y_i = step(state, segments[i])`` for every segment and backpropagate each
    ``loss_fn(y_i, i)`` through segments ``i-window+1 .. i`` only (see the package docstring).

    Args:
        step: a pure function (or module) ``step(state, x_seg) -> (new_state, y_seg)``: one segment of the
            recurrence, e.g. a causal decoder's ``step``. It must not write into the state or its input in place.
        state: the initial state: any nesting of lists, tuples and dicts with tensor leaves (None, strings and
            numbers pass through), e.g. ``decoder.init_state()``.
        segments: the inputs, one tensor per segment (e.g. ``latents.split(1, dim=2)``); they may differ in shape.
        loss_fn: ``loss_fn(y_i, i) -> scalar tensor``, segment i's loss on its output.
        window: segments each loss backpropagates through, an int >= 1 (default 1); ``window >= len(segments)``
            is exact full backpropagation.
        strategy: ``"recompute"`` (default) or ``"retain"``, how the window's graph is had (below).
        return_outputs: True: also return the detached outputs ``[y_0, ...]``. Default False.
        backward: ``backward(loss)``, the training loop's backward for one segment's loss (below); default
            ``torch.Tensor.backward``.

    Gradients accumulate into ``.grad`` of the leaf tensors the step uses (its parameters), of segments and of
    initial-state tensors that are leaves requiring grad; for non-leaf ones (say latents produced by a
    diffusion model) the gradient is passed on upstream with one backward call at the end. Returns the
    detached sum of the losses, and with ``return_outputs`` also the list of detached ``y_i``.

    ``strategy="recompute"`` keeps only the detached states entering the last ``window`` segments and rebuilds
    the window for every loss; ``"retain"`` keeps the last ``window`` segment graphs alive instead (one
    forward per segment, ``window`` backwards). If ``step`` is a ``DistributedDataParallel`` module (whose
    forward is a step), or another step with its ``no_sync()`` (``decoder_recurrence`` of a DDP-wrapped VAE),
    every call but the last segment's runs under ``no_sync``, so the last backward averages the accumulated
    gradients over ranks; there ``"retain"`` with ``window > 1`` runs as ``"recompute"`` (its chained
    backwards cannot be the single backward DDP's sync needs; the gradients are the same), and the last segment
    must use every parameter (or pass ``find_unused_parameters=True``).
    Under FSDP2, pass the ``fully_shard``-ed module whose forward is a step: each backward reduce-scatters its
    gradient into the sharded ``.grad`` (averaged over ranks, as DDP), so only its shard persists between
    segments.

    Pass the training loop's own ``backward`` so that its loss handling applies to every segment:
    ``accelerator.backward`` (divides by the gradient accumulation steps, scales under fp16), ``lambda loss:
    scaler.scale(loss).backward()`` for a ``torch.amp.GradScaler``. With ``"recompute"`` it is called on each
    segment's loss; with ``"retain"`` on the loss taken from leaf copies of the segment's outputs, after which
    ``stream`` passes the gradient on those copies through the kept graphs (so a ``backward`` that scales its loss
    scales every gradient). Every loss must require grad, or be a zero for a segment without one (anything else
    raises: ``.grad`` would stay untouched silently). Recipes: docs/chopgrad-training.md.

    ``stream`` is a training step: called with gradients disabled (``torch.no_grad()``,
    ``torch.inference_mode()``) it raises rather than fill ``.grad`` behind the caller's back; to decode
    without gradients, run the step in a loop. Segments may differ in shape; ``window`` counts segments.
    The step must not write into the state or its input in place (checked, except for writes through
    ``.data``, which version counters do not see).
    """
    if not torch.is_grad_enabled():
        raise RuntimeError(
            "stream was called with gradients disabled (inside torch.no_grad() or torch.inference_mode()); it "
            "backpropagates every segment's loss and fills .grad, which the next optimizer.step() would use. "
            "Call it with gradients enabled, or, to decode only, run the step in a loop under no_grad")
    window = check_window(window)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    check_callables(step, loss_fn)
    if backward is None:
        backward = torch.Tensor.backward
    elif not callable(backward):
        raise TypeError(f"backward must be callable as backward(loss) (e.g. accelerator.backward, or "
                        f"lambda loss: scaler.scale(loss).backward()), got {type(backward).__name__}")
    segments = check_segments(segments)
    n = len(segments)
    loss_fn = _grad_checked(loss_fn)

    # Leaf proxies: the sweeps backpropagate many times, so they must never reach an upstream graph; the
    # gradient collected on the proxies goes upstream once at the end.
    proxies = [seg.detach().requires_grad_(seg.requires_grad) for seg in segments]
    state_proxy = detach_state(state, keep_requires_grad=True)
    ddp = _synchronises(step)

    def synced_call(carried, x, j):
        sync = contextlib.nullcontext() if not ddp or j == n - 1 else step.no_sync()
        with sync:
            return call_step(step, carried, x, j)

    # A recomputed segment draws the random numbers its first run drew (dropout masks, noise).
    call = SegmentReplay(synced_call, cuda_devices(segments + tensor_leaves(state)), keep=window)

    if strategy == "recompute" or (ddp and strategy == "retain" and n > 1 and window > 1):
        # Under DDP the last loss needs one backward after the one synced forward; retain's chained backwards
        # cannot give that, so DDP runs recompute (same gradients, see tests).
        total, outputs = recompute_sweep(call, state_proxy, proxies, loss_fn, window, backward, return_outputs)
    else:
        total, outputs = retain_sweep(call, state_proxy, proxies, loss_fn, window, backward, return_outputs)

    originals = [seg for seg in segments if seg.requires_grad] + \
        [leaf for leaf in tensor_leaves(state) if leaf.requires_grad]
    grads = [p.grad for p in proxies if p.requires_grad] + \
        [leaf.grad for leaf in tensor_leaves(state_proxy) if leaf.requires_grad]
    pairs = [(t, g) for t, g in zip(originals, grads) if g is not None]
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
    return (total, outputs) if return_outputs else total
