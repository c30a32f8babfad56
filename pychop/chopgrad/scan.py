"""``scan``: the whole recurrence as one differentiable op whose backward recomputes window by window."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
from torch.utils import _pytree as pytree

from pychop.chopgrad.replay import SegmentReplay, cuda_devices
from pychop.chopgrad.state import (
    Step,
    call_step,
    check_segments,
    check_window,
    detach_state,
    grad_leaf_state,
    tensor_leaves,
)
from pychop.chopgrad.window import recompute_sweep


def _grad_leaves(roots: Sequence[torch.Tensor], found: Dict[int, torch.Tensor]) -> None:
    """Add to ``found`` every leaf tensor requiring grad that the graphs of ``roots`` reach (AccumulateGrad)."""
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            found.setdefault(id(variable), variable)
        stack.extend(next_node for next_node, _ in node.next_functions)


def _reverse_sweep(call, state, boundaries, segments, cotangent_loss, targets, sums) -> None:
    """A window covering every segment: exact backpropagation through time in one reverse pass. Segment i
    is recomputed from its stored entering state, backpropagated with its output gradient plus the gradient
    carried back from segment i+1, and discarded; the gradient on its entering state goes to segment i-1."""
    carried = None  # gradients on the tensor leaves of the state leaving segment i
    for i in reversed(range(len(segments))):
        entering = state if i == 0 else grad_leaf_state(boundaries[i])
        with torch.enable_grad():
            leaving, y = call(entering, segments[i], i)
            roots, root_grads = [], []
            loss = cotangent_loss(y, i)
            if loss.requires_grad:
                roots.append(loss)
                root_grads.append(None)
            for out, grad in zip(tensor_leaves(leaving), carried or []):
                if grad is not None and out.requires_grad:
                    roots.append(out)
                    root_grads.append(grad)
            entering_leaves = tensor_leaves(entering) if i > 0 else []
            wanted = [leaf for leaf in entering_leaves if leaf.requires_grad]
            grads = torch.autograd.grad(roots, targets + wanted, root_grads, allow_unused=True) if roots \
                else [None] * (len(targets) + len(wanted))
        for k, g in enumerate(grads[:len(targets)]):
            if g is not None:
                sums[k] = g if sums[k] is None else sums[k] + g
        by_leaf = dict(zip(map(id, wanted), grads[len(targets):]))
        carried = [by_leaf.get(id(leaf)) for leaf in entering_leaves]
        del leaving, y, loss, roots, grads


class _Scan(torch.autograd.Function):
    """Inputs: the flat state leaves, the segments, then every leaf the step reaches (its parameters); the
    forward's outputs were computed by ``scan`` (which needed them to find those leaves) and come in ``plan``.
    Saved for backward: the initial state and the segments; when the window covers every segment, also the
    detached state entering each segment (boundaries), for one reverse sweep. Never activations. (The RNG
    and autocast state each segment started from are kept, outside autograd, by the plan's SegmentReplay.)"""

    @staticmethod
    def forward(ctx, plan, *flat):
        ctx.plan = plan
        ctx.save_for_backward(*flat[:plan["n_inputs"]])
        return tuple(plan.pop("outputs"))

    @staticmethod
    def backward(ctx, *grad_outputs):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "scan's backward is differentiable once: it was called with create_graph=True (a double backward, "
                "e.g. a gradient penalty), whose second-order terms through the recomputed windows it does not "
                "build. For higher-order gradients, run the steps in a plain loop under "
                "torch.utils.checkpoint(..., use_reentrant=False)")
        plan = ctx.plan
        saved = ctx.saved_tensors
        n_state = plan["n_state"]
        state_leaves = [leaf.detach().requires_grad_(need) for leaf, need in
                        zip(saved[:n_state], ctx.needs_input_grad[1:1 + n_state])]
        segments = [seg.detach().requires_grad_(need) for seg, need in
                    zip(saved[n_state:], ctx.needs_input_grad[1 + n_state:1 + plan["n_inputs"]])]
        params = plan["params"]
        state = plan["rebuild_state"](state_leaves)
        targets = [t for t in state_leaves + segments if t.requires_grad] + params
        sums: List[Any] = [None] * len(targets)

        def backward(loss):
            grads = torch.autograd.grad(loss, targets, allow_unused=True)
            for k, g in enumerate(grads):
                if g is not None:
                    sums[k] = g if sums[k] is None else sums[k] + g

        def cotangent_loss(y, i):
            if grad_outputs[i] is None or not y.requires_grad:
                return y.new_zeros(())
            return (y * grad_outputs[i]).sum()

        call = plan["call"]
        if plan["boundaries"] is not None:
            _reverse_sweep(call, state, plan["boundaries"], segments, cotangent_loss, targets, sums)
        else:
            recompute_sweep(call, state, segments, cotangent_loss, plan["window"], backward, keep_outputs=False)
        grads = iter(sums)
        flat_inputs = state_leaves + segments
        input_grads = [next(grads) if t.requires_grad else None for t in flat_inputs]
        param_grads = list(grads)
        return (None, *input_grads, *param_grads)


def scan(step: Step, state: Any, segments: Sequence[torch.Tensor], *, window: int = 1) -> List[Any]:
    """Run the recurrence and return ``[y_0, ..., y_{n-1}]``, differentiable with respect to the segments,
    the initial state's tensors and every leaf tensor the step uses (parameters, captured tensors).

    Args:
        step: a pure function (or module) ``step(state, x_seg) -> (new_state, y_seg)``, as for ``stream``.
        state: the initial state (nested lists, tuples and dicts with tensor leaves), as for ``stream``.
        segments: the inputs, one tensor per segment.
        window: segments the gradient arriving at each output flows back through, an int >= 1 (default 1).

    The gradient arriving at ``y_i`` flows back through segments ``i-window+1 .. i`` only. The forward runs
    each step once (with grad enabled, to find the leaves the step reaches, then frees that graph at once)
    and keeps no activations; the backward recomputes each window from the initial state and discards it
    (``min(window, i+1)`` step forwards for output i). With ``window >= len(segments)`` (exact BPTT) the
    forward keeps every segment's entering state instead and the backward is one reverse sweep: one
    recomputed forward and one backward per segment, as in activation checkpointing.

    The caller's backward (``accelerator.backward``, a GradScaler's scaled loss) reaches it through the output
    gradients, so it needs no ``backward=``. Its backward is differentiable once: under ``create_graph=True``
    it raises. A step that synchronises over ranks (``no_sync()``: a DDP module) is refused; use ``stream``.
    """
    window = check_window(window)
    if callable(getattr(step, "no_sync", None)):
        raise ValueError(
            "scan cannot run a step that synchronises gradients over ranks (a DistributedDataParallel module, or "
            "the step of a decoder_recurrence of a DDP-wrapped VAE): its forward and its backward's recomputation "
            "would each ask for a reduction; use stream, which reduces once, after the last segment")
    segments = check_segments(segments)
    flat_state, spec = pytree.tree_flatten(state)
    tensor_positions = [k for k, leaf in enumerate(flat_state) if isinstance(leaf, torch.Tensor)]
    state_leaves = [flat_state[k] for k in tensor_positions]

    def rebuild_state(leaves):
        flat = list(flat_state)
        for k, leaf in zip(tensor_positions, leaves):
            flat[k] = leaf
        return pytree.tree_unflatten(flat, spec)

    # The backward recomputes each segment from the random-number and autocast state of its forward run.
    call = SegmentReplay(lambda s, x, j: call_step(step, s, x, j), cuda_devices(segments + state_leaves))
    found: Dict[int, torch.Tensor] = {}
    outputs = []
    carried = detach_state(state)
    full = window >= len(segments)
    boundaries = [] if full else None
    for i, seg in enumerate(segments):
        if full:
            boundaries.append(carried)
        carried, y = call(carried, seg.detach(), i)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"scan needs a step whose output y_seg is a tensor; segment {i} gave "
                            f"{type(y).__name__} (use stream for structured outputs)")
        _grad_leaves([y] + tensor_leaves(carried), found)
        carried = detach_state(carried)
        outputs.append(y.detach())
        del y
    params = list(found.values())
    if not torch.is_grad_enabled() or not (params or any(t.requires_grad for t in state_leaves + segments)):
        return outputs
    plan = {"call": call, "window": window, "n_state": len(state_leaves),
            "n_inputs": len(state_leaves) + len(segments), "params": params, "rebuild_state": rebuild_state,
            "outputs": outputs, "boundaries": boundaries}
    return list(_Scan.apply(plan, *state_leaves, *segments, *params))
