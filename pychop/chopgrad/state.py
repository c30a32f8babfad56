"""Recurrence state as a pytree, and the checked call of one step.

A state is any nesting of lists, tuples and dicts (``torch.utils._pytree``). Its tensor leaves are carried
from step to step; every other leaf (None, marker strings such as diffusers' ``"Rep"``, numbers) is opaque to
pychop and handed to the step as it is. A step may return a state of a different structure (a cache entry
that was None becomes a tensor after the first segment).
"""

from __future__ import annotations

from typing import Any, Callable, List, Sequence, Tuple

import torch
from torch.utils import _pytree as pytree

Step = Callable[[Any, torch.Tensor], Tuple[Any, Any]]


def step_name(step: Step) -> str:
    """A readable name for a step in error messages."""
    return getattr(step, "__qualname__", None) or type(step).__name__


def tensor_leaves(state: Any) -> List[torch.Tensor]:
    """The tensor leaves of ``state``, in pytree order."""
    return [leaf for leaf in pytree.tree_leaves(state) if isinstance(leaf, torch.Tensor)]


def detach_state(state: Any, *, keep_requires_grad: bool = False) -> Any:
    """A copy of ``state`` (new containers) whose tensor leaves are detached from any graph.

    With ``keep_requires_grad`` each floating-point leaf becomes a fresh autograd leaf that requires grad
    exactly when the original did (a proxy whose ``.grad`` collects the gradient meant for the original).
    """
    def detach(leaf):
        if not isinstance(leaf, torch.Tensor):
            return leaf
        out = leaf.detach()
        if keep_requires_grad and leaf.requires_grad:
            out.requires_grad_(True)
        return out
    return pytree.tree_map(detach, state)


def grad_leaf_state(state: Any) -> Any:
    """A detached copy of ``state`` whose floating-point tensor leaves are new leaves that require grad."""
    def leaf_with_grad(leaf):
        if not isinstance(leaf, torch.Tensor):
            return leaf
        out = leaf.detach()
        if out.is_floating_point() or out.is_complex():
            out.requires_grad_(True)
        return out
    return pytree.tree_map(leaf_with_grad, state)


def call_step(step: Step, state: Any, x_seg: torch.Tensor, index: int) -> Tuple[Any, Any]:
    """``step(state, x_seg)``, checked: the step gets fresh containers (so reassigning list entries is harmless),
    must return a ``(new_state, y_seg)`` pair, and must not modify a tensor of ``state`` or ``x_seg`` in place
    (detected with the tensors' version counters). Writes through ``.data`` (``t.data.copy_(...)``,
    ``t.data += ...``) do not bump the version counter and escape this check: they silently change what a
    recomputed segment sees."""
    state = pytree.tree_map(lambda leaf: leaf, state)  # fresh containers, same leaves
    watched = pytree.tree_flatten_with_path(state)[0]
    watched = [(pytree.keystr(path), leaf, leaf._version) for path, leaf in watched
               if isinstance(leaf, torch.Tensor)]
    x_version = x_seg._version
    result = step(state, x_seg)
    for where, leaf, version in watched:
        if leaf._version != version:
            raise RuntimeError(
                f"step {step_name(step)!r} modified the state tensor state{where} in place at segment {index}; "
                "a step must be pure: build new tensors for the new state (e.g. torch.cat, x.clone()) instead "
                "of writing into the old ones")
    if x_seg._version != x_version:
        raise RuntimeError(f"step {step_name(step)!r} modified its input segment {index} in place; a step must "
                           "not write into its inputs")
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"step {step_name(step)!r} must return a (new_state, y_seg) pair, "
                        f"got {type(result).__name__}")
    return result


def check_callables(step: Any, loss_fn: Any) -> None:
    """A step callable as ``step(state, x_seg)`` and a loss callable as ``loss_fn(y_seg, index)``."""
    if not callable(step):
        raise TypeError(f"step must be callable as step(state, x_seg), got {type(step).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(y_seg, index), got {type(loss_fn).__name__}")


def check_window(window: Any) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1 (the number of segments a loss backpropagates "
                         f"through), got {window!r}")
    return window


def check_segments(segments: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The segments as a list: at least one, all tensors of one dtype, device and number of dimensions. Their
    shapes may differ (a decoder may take a longer first chunk); the step decides what it accepts."""
    if isinstance(segments, torch.Tensor):
        raise TypeError("segments must be a sequence of tensors (one per step), not one tensor; "
                        "split it first, e.g. list(z.split(1, dim=2))")
    segments = list(segments)
    if not segments:
        raise ValueError("segments must hold at least one tensor")
    first = segments[0]
    for index, seg in enumerate(segments):
        if not isinstance(seg, torch.Tensor):
            raise TypeError(f"segments[{index}] must be a tensor, got {type(seg).__name__}")
        if seg.dim() != first.dim() or seg.dtype != first.dtype or seg.device != first.device:
            raise ValueError(
                f"segments must share one dtype, device and number of dimensions (their lengths may differ): "
                f"segments[0] is {tuple(first.shape)} {first.dtype} on {first.device}, segments[{index}] is "
                f"{tuple(seg.shape)} {seg.dtype} on {seg.device}")
    return segments
