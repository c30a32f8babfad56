"""The two ways to backpropagate each segment's loss through its last ``window`` segments.

Both run the recurrence forward exactly once in value (every forward value is the plain recurrence's) and
call ``backward(loss)`` (the caller's: ``loss.backward()``, or one that scales the loss first, as accelerate and
a GradScaler do) once per segment whose loss requires grad. ``call(state, x, j)`` runs step ``j``
(checked, and under DDP's ``no_sync`` where needed); ``state`` is the initial state, whose tensor leaves may
require grad: a gradient reaches them only from losses whose window starts at segment 0.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils import _pytree as pytree

from pychop.chopgrad.state import detach_state, grad_leaf_state, tensor_leaves

Call = Callable[[Any, torch.Tensor, int], Tuple[Any, Any]]
LossFn = Callable[[Any, int], torch.Tensor]


def _checked_loss(loss: Any, index: int) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn(y_seg, {index}) must return a scalar tensor, got "
                        f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
    return loss.reshape(())


def recompute_sweep(call: Call, state: Any, segments: Sequence[torch.Tensor], loss_fn: LossFn, window: int,
                    backward: Callable[[torch.Tensor], None], keep_outputs: bool
                    ) -> Tuple[torch.Tensor, Optional[List[Any]]]:
    """Recompute strategy: keep the detached states entering the last ``window`` segments; for loss i,
    rebuild steps i-window+1..i from the oldest of them with grad enabled, backpropagate, discard.

    Memory: ``window`` boundary states and one window of activations. Cost per segment: ``min(window, i+1)``
    step forwards and one backward through them.
    """
    boundaries = deque([state], maxlen=window)  # states entering segments i-len+1 .. i
    total, outputs = None, ([] if keep_outputs else None)
    for i in range(len(segments)):
        start = i - len(boundaries) + 1
        with torch.enable_grad():
            carried = boundaries[0]
            for j in range(start, i + 1):
                carried, y = call(carried, segments[j], j)
            loss = _checked_loss(loss_fn(y, i), i)
            if loss.requires_grad:
                backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
        if keep_outputs:
            outputs.append(detach_state(y))
        boundaries.append(detach_state(carried))
        del carried, y, loss
    return total, outputs


def _hand_back(links) -> None:
    """Pass the gradient on each link's entering state back to the previous link's leaving state, newest
    to oldest; the oldest link's entering gradient stays where it is (a constant, or the initial state)."""
    for m in range(len(links) - 1, 0, -1):
        entering = tensor_leaves(links[m][0])
        pairs = [(out, leaf.grad) for out, leaf in zip(tensor_leaves(links[m - 1][1]), entering)
                 if leaf.grad is not None and out.requires_grad]
        for leaf in entering:
            leaf.grad = None
        if not pairs:
            return
        torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs], retain_graph=True)


def _loss_on_copies(loss_fn: LossFn, y: Any, index: int, backward: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """``loss_fn(y, index)`` taken on leaf copies of ``y``'s tensors and backpropagated by ``backward`` (which
    frees the loss's own graph only); the gradients on the copies then go into ``y``'s graph, which stays."""
    copies = pytree.tree_map(lambda t: t.detach().requires_grad_(True)
                             if isinstance(t, torch.Tensor) and t.requires_grad else t, y)
    loss = _checked_loss(loss_fn(copies, index), index)
    if loss.requires_grad:
        backward(loss)
        pairs = [(out, copy.grad) for out, copy in zip(tensor_leaves(y), tensor_leaves(copies))
                 if out.requires_grad and copy.grad is not None]
        if pairs:
            torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs], retain_graph=True)
    return loss


def retain_sweep(call: Call, state: Any, segments: Sequence[torch.Tensor], loss_fn: LossFn, window: int,
                 backward: Callable[[torch.Tensor], None], keep_outputs: bool
                 ) -> Tuple[torch.Tensor, Optional[List[Any]]]:
    """Retain strategy: run each segment once, from a detached copy of the state entering it whose leaves
    require grad, and keep the last ``window`` segment graphs alive. Loss i is backpropagated through segment
    i, then its gradient on the entering state is handed to segment i-1's graph, and so on back to segment
    i-window+1; the gradient reaching that segment's entering state is dropped (it is a constant there). The
    loss is taken on copies of segment i's outputs, so that ``backward(loss)`` frees none of the kept graphs.

    Memory: ``window`` segment graphs. Cost per segment: one step forward and ``min(window, i+1)`` backwards.
    """
    links = deque()  # (state entering segment j, state leaving segment j), graphs kept alive
    total, outputs = None, ([] if keep_outputs else None)
    leaving = None
    for i in range(len(segments)):
        entering = state if i == 0 else grad_leaf_state(leaving)
        leaving = None
        if len(links) == window:
            links.popleft()  # before the forward, so that at most `window` graphs are alive at once
        with torch.enable_grad():
            leaving, y = call(entering, segments[i], i)
            links.append((entering, leaving))
            loss = _loss_on_copies(loss_fn, y, i, backward)
            if loss.requires_grad:
                _hand_back(links)
        total = loss.detach() if total is None else total + loss.detach()
        if keep_outputs:
            outputs.append(detach_state(y))
        del y, loss, entering
    return total, outputs
