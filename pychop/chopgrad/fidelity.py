"""``fidelity``: how close ``stream``'s truncated gradients come to full backpropagation's, segment by segment.

Run it on your own decoder, latents and loss before choosing a window: the cosine and norm ratio of the
parameter gradient and of the latent gradient that each window gives, against full backpropagation through
time, for the whole clip and for every segment.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

from pychop.chopgrad.replay import RunState, cuda_devices
from pychop.chopgrad.scan import _grad_leaves
from pychop.chopgrad.state import (
    Step,
    call_step,
    check_callables,
    check_segments,
    check_window,
    detach_state,
    tensor_leaves,
)
from pychop.chopgrad.stream import STRATEGIES, stream
from pychop.chopgrad.window import _checked_loss

Grads = List[Optional[torch.Tensor]]


def _agreement(grads: Grads, full: Grads) -> Dict[str, Optional[float]]:
    """Cosine, norm ratio and relative error of the concatenation of ``grads`` against that of ``full`` (None
    entries read as zeros), accumulated in float64 tensor by tensor. A cosine needs both norms non-zero, a ratio
    or relative error a non-zero full norm; otherwise the entry is None."""
    dot = own = ref = diff = 0.0
    for g, f in zip(grads, full):
        g, f = (torch.zeros((), dtype=torch.float64) if t is None else t.detach().double() for t in (g, f))
        own += float((g * g).sum())
        ref += float((f * f).sum())
        dot += float((g * f).sum())
        diff += float(((g - f) ** 2).sum())
    own, ref = own ** 0.5, ref ** 0.5
    return {"cosine": dot / (own * ref) if own > 0 and ref > 0 else None,
            "norm_ratio": own / ref if ref > 0 else None,
            "rel_error": diff ** 0.5 / ref if ref > 0 else None}


def _summed(per_loss: Sequence[Grads]) -> Grads:
    """Tensor by tensor, the sum over losses of their gradients (None where no loss reached a tensor)."""
    sums: Grads = [None] * len(per_loss[0])
    for grads in per_loss:
        for k, g in enumerate(grads):
            if g is not None:
                sums[k] = g if sums[k] is None else sums[k] + g
    return sums


def _take_grads(tensors: Sequence[torch.Tensor]) -> Grads:
    """The ``.grad`` of each tensor (None where none), and the fields cleared for the next loss."""
    grads = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    return grads


def _latent_leaves(segments: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Detached copies of the segments, leaves that require grad where their dtype can have a gradient."""
    return [seg.detach().requires_grad_(seg.is_floating_point() or seg.is_complex()) for seg in segments]


def _check_params(params: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    params = list(params)
    for index, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or not p.requires_grad:
            raise ValueError(f"params[{index}] must be a tensor that requires grad (a parameter being trained), got "
                             f"{type(p).__name__ if not isinstance(p, torch.Tensor) else 'a tensor without grad'}")
    return params


def fidelity(step: Step, state: Any, segments: Sequence[torch.Tensor], loss_fn: Callable[[Any, int], torch.Tensor],
             windows: Sequence[int] = (1, 2, 4), *, params: Optional[Iterable[torch.Tensor]] = None,
             strategy: str = "recompute") -> List[Dict[str, Any]]:
    """Compare ``stream``'s gradients at each window in ``windows`` with full backpropagation through time:
    the first thing to run, on your own decoder, latents and loss, before choosing a window.

    ``step``, ``state``, ``segments`` and ``loss_fn`` are what you would pass to ``stream``: the recurrence
    ``state, y_i = step(state, segments[i])`` and the per-segment loss ``loss_fn(y_i, i)`` (a scalar tensor).
    Full backpropagation differentiates the sum of the losses through the whole recurrence; window ``k`` runs
    ``stream(..., window=k, strategy=strategy)``. Both start from the same random-number state, so a step or
    loss that draws random numbers (dropout, noise) draws the same ones in every run.

    Keywords:

    - ``windows``: the windows to compare (ints >= 1; a window of ``len(segments)`` or more is full
      backpropagation, so its rows read cosine 1, norm ratio 1, relative error 0).
    - ``params``: the tensors whose gradients count as the parameter gradient, each requiring grad (e.g.
      ``decoder.parameters()`` of a decoder being trained; ``[]`` for a frozen decoder, to compare the latent
      gradient alone). Default: every leaf tensor requiring grad that the full run's graph reaches, other
      than the segments (the step's trainable parameters).
    - ``strategy``: ``stream``'s strategy, ``"recompute"`` or ``"retain"`` (the gradients are the same).

    Returns one dict per window and segment, windows in the order given, for each window first the whole clip
    (``"segment": None``) then segments ``0 .. n-1``. Keys: ``window``, ``segment``, and for ``params`` and
    ``latent`` each of ``{name}_cosine``, ``{name}_norm_ratio`` (truncated norm / full norm) and
    ``{name}_rel_error`` (||truncated - full|| / ||full||). In a segment's row, ``params_*`` compare the
    parameter gradient of that segment's loss alone and ``latent_*`` the gradient on that segment's input (the
    latent frames it decodes) from the summed loss; the whole-clip row compares the summed parameter gradient
    and every segment's input gradient together. An entry is None where the full gradient is zero (and, for a
    cosine, where the truncated one is). Cosines below 1 say the truncated direction differs; norm ratios
    below 1 say how much gradient the window drops (a learning rate tuned with full backpropagation moves
    that much less).

    Cost: one full backpropagation (the whole clip's graph in memory, plus ``n`` backward passes, one per
    loss) and one ``stream`` per window; it holds one copy of the parameter gradient per segment. Nothing of
    the caller's changes: ``.grad`` of the parameters is restored, the segments and the state are read
    through detached copies (no gradient reaches them or anything upstream), and the global random-number
    state is left as it was. Run it in one process, on the module itself (not a DDP or FSDP wrapper).
    """
    if not torch.is_grad_enabled():
        raise RuntimeError("fidelity was called with gradients disabled (inside torch.no_grad() or "
                           "torch.inference_mode()); it backpropagates, so call it with gradients enabled")
    if isinstance(windows, int) or not windows:
        raise ValueError(f"windows must be a non-empty sequence of ints >= 1, got {windows!r}")
    windows = [check_window(window) for window in windows]
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    check_callables(step, loss_fn)
    segments = check_segments(segments)
    params = None if params is None else _check_params(params)
    n = len(segments)
    state = detach_state(state)
    start = RunState(cuda_devices(segments + tensor_leaves(state)))

    with start.restored():
        params, full_params, full_latent = _full_gradients(step, state, segments, loss_fn, params)
    caller_grads = _take_grads(params)
    rows = []
    try:
        for window in windows:
            with start.restored():
                per_loss, latent = _truncated_gradients(step, state, segments, loss_fn, params, window, strategy)
            comparisons = [(None, _summed(per_loss), _summed(full_params), latent, full_latent)]
            comparisons += [(i, per_loss[i], full_params[i], [latent[i]], [full_latent[i]]) for i in range(n)]
            for segment, mine, theirs, mine_latent, theirs_latent in comparisons:
                row = {"window": window, "segment": segment}
                for name, agreement in (("params", _agreement(mine, theirs)),
                                        ("latent", _agreement(mine_latent, theirs_latent))):
                    row.update({f"{name}_{key}": value for key, value in agreement.items()})
                rows.append(row)
    finally:
        for p, g in zip(params, caller_grads):
            p.grad = g
    return rows


def _truncated_gradients(step: Step, state: Any, segments: Sequence[torch.Tensor],
                         loss_fn: Callable[[Any, int], torch.Tensor], params: List[torch.Tensor], window: int,
                         strategy: str):
    """``stream`` at ``window``: each loss's parameter gradient and each segment's input gradient."""
    latents = _latent_leaves(segments)
    per_loss: List[Grads] = []

    def loss_of_segment(y, i):
        # stream finishes loss i-1's backward before it asks for loss i: .grad holds loss i-1's alone
        if i > 0:
            per_loss.append(_take_grads(params))
        return loss_fn(y, i)

    stream(step, state, latents, loss_of_segment, window=window, strategy=strategy)
    per_loss.append(_take_grads(params))
    return per_loss, [x.grad for x in latents]


def _full_gradients(step: Step, state: Any, segments: Sequence[torch.Tensor],
                    loss_fn: Callable[[Any, int], torch.Tensor], params: Optional[List[torch.Tensor]]):
    """Full backpropagation: the whole clip's graph, then one backward per loss. Returns the parameters (found
    in the graph when ``params`` is None), each loss's parameter gradient, and each segment's input gradient
    from the summed loss."""
    latents = _latent_leaves(segments)
    with torch.enable_grad():
        carried, losses = state, []
        for i, x in enumerate(latents):
            carried, y = call_step(step, carried, x, i)
            losses.append(_checked_loss(loss_fn(y, i), i))
        if params is None:
            found: Dict[int, torch.Tensor] = {}
            _grad_leaves([loss for loss in losses if loss.requires_grad], found)
            latent_ids = {id(x) for x in latents}
            params = [t for key, t in found.items() if key not in latent_ids]
        differentiable = [x for x in latents if x.requires_grad]
        full_params: List[Grads] = []
        full_latent: Grads = [None] * len(latents)
        for loss in losses:
            if not loss.requires_grad:
                full_params.append([None] * len(params))
                continue
            grads = torch.autograd.grad(loss, params + differentiable, retain_graph=True, allow_unused=True)
            full_params.append(list(grads[:len(params)]))
            by_latent = iter(grads[len(params):])
            for j, x in enumerate(latents):
                g = next(by_latent) if x.requires_grad else None
                if g is not None:
                    full_latent[j] = g if full_latent[j] is None else full_latent[j] + g
    return params, full_params, full_latent
