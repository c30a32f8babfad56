"""Recomputing a frozen region in the backward instead of keeping what it saves.

``recomputed(fn, args, kwargs)`` is ``fn(*args, **kwargs)`` run without a graph: the only tensors kept for
backward are its tensor inputs (saved as an autograd Function saves them, so saved-tensor hooks and meters
see them, and a storage kept anyway costs nothing more). The backward runs ``fn`` again on them, from the
random-number and autocast state of the forward (``pychop.chopgrad.replay.RunState``), and passes the output
gradients back through that graph to the inputs, then drops it: memory of one region at a time.

Gradients reach the tensor inputs only (found in ``args`` and ``kwargs`` at any depth of lists, tuples, dicts
and diffusers outputs), never a parameter: ``fn`` must compute with frozen parameters alone, which is what
``lean_frozen`` checks before every call. Outputs may be nested the same way. ``torch.compile`` does not trace
this backward: the call is a graph break, run as in eager mode. Unlike ``torch.utils.checkpoint``'s reentrant
form, the backward works under ``torch.autograd.grad`` too, and under ``create_graph=True`` it builds its
gradients with a graph (the region runs again on the saved inputs themselves), so higher-order gradients
(a gradient penalty) are exact.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch.utils import _pytree as pytree

from pychop.chopgrad.replay import RunState, cuda_devices


class _Region(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, layout: Dict, *tensors):
        ctx.run = run
        ctx.first_run = RunState(cuda_devices(tensors))
        leaves, layout["spec"] = pytree.tree_flatten(run(tensors))
        layout["others"] = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        layout["is_tensor"] = [isinstance(leaf, torch.Tensor) for leaf in leaves]
        ctx.save_for_backward(*tensors)
        return tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))

    @staticmethod
    def backward(ctx, *grads):
        # Under create_graph (a double backward) the region runs again on the saved inputs themselves, whose
        # graphs reach the original ones, and its gradients are built with a graph: higher orders are exact.
        higher_order = torch.is_grad_enabled()
        inputs = [t if higher_order else t.detach().requires_grad_(wanted)
                  for t, wanted in zip(ctx.saved_tensors, ctx.needs_input_grad[2:])]
        with torch.enable_grad(), ctx.first_run.restored():
            outputs = [leaf for leaf in pytree.tree_leaves(ctx.run(inputs)) if isinstance(leaf, torch.Tensor)]
        roots = [(out, grad) for out, grad in zip(outputs, grads) if out.requires_grad and grad is not None]
        wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[2:]) if need]
        found = iter(torch.autograd.grad([out for out, _ in roots], wanted, [grad for _, grad in roots],
                                         allow_unused=True, create_graph=higher_order)
                     if roots and wanted else [None] * len(wanted))
        return (None, None, *[next(found) if need else None for need in ctx.needs_input_grad[2:]])


def recomputed(fn: Callable, args: tuple, kwargs: dict):
    """``fn(*args, **kwargs)``, keeping only its tensor inputs for backward (see the module docstring). Without
    a tensor input that requires grad (or with grad disabled) it is the plain call."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    if not torch.is_grad_enabled() or not any(leaves[i].requires_grad for i in positions):
        return fn(*args, **kwargs)
    template = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]  # holds no tensor

    def run(tensors: List[torch.Tensor]):
        filled = list(template)
        for i, tensor in zip(positions, tensors):
            filled[i] = tensor
        call_args, call_kwargs = pytree.tree_unflatten(filled, spec)
        return fn(*call_args, **call_kwargs)

    layout: Dict = {}
    outputs = iter(_Region.apply(run, layout, *[leaves[i] for i in positions]))
    filled = [next(outputs) if is_tensor else other for is_tensor, other in zip(layout["is_tensor"], layout["others"])]
    return pytree.tree_unflatten(filled, layout["spec"])
