"""Parallel spatial-temporal attention and its two branches, on the (B, T, S, H, D) layout.

    out[b,t,s,h] = sum_{s'} softmax_{s'}(scale q_s[b,t,s,h] . k_s[b,t,s',h]) v_s[b,t,s',h]         (spatial)
                 + sum_{t' in N(t)} softmax_{t'}(scale q_t[b,t,s,h] . k_t[b,t',s,h]) v_t[b,t',s,h]  (temporal)

``N(t)`` is every frame; ``t' <= t`` when ``temporal_causal``; ``t - temporal_window < t' <= t`` with a window
(a window implies causal). With ``temporal_grad_window = k`` the forward is unchanged and, in the backward, the
temporal keys and values of frames ``t' <= t - k`` are constants for query frame ``t``: no gradient reaches
them from that query, as if they were detached. The queries always receive their full gradient.

The ``"torch"`` backend below defines these semantics in plain PyTorch. Fused backends (Triton, CUDA, C++)
implement a two-function kernel interface on the same layout, and one autograd Function drives them all:

    forward(q_s, k_s, v_s, q_t, k_t, v_t, *, scale, temporal_causal, temporal_window, stacked, out=None)
        -> out in the input dtype: (B, T, S, H, D), or (B, T, S, 2, H, D) when stacked (written into `out` when
           given: any strides, the last 1), lse_s (B, T, H, S) float32 or None, lse_t (B, T, H, S) float32 or None
    backward(dout, q_s, k_s, v_s, q_t, k_t, v_t, out, lse_s, lse_t,
             *, scale, temporal_causal, temporal_window, temporal_grad_window, stacked)
        -> (dq_s, dk_s, dv_s, dq_t, dk_t, dv_t)

The three tensors of a branch that is not computed are None, as are its statistics and gradients. ``lse`` is
the natural-log logsumexp of a branch's scaled scores per query row; the backward recomputes probabilities
from it and stores nothing quadratic. ``stacked`` (both branches only) writes the two branches apart,
``out[:, :, :, 0] = o_s`` and ``out[:, :, :, 1] = o_t``, instead of their sum; ``dout`` then has that shape
too, one gradient per branch. Options reach the kernels normalised: ``temporal_causal`` is True whenever a
window is set, and a grad window that covers every frame the window lets in is None.

The spatial branch of a fused backend runs through these kernels or, by default where that is faster, through
``scaled_dot_product_attention``'s fused kernel on zero-copy views (``pychop.ops.spatial_paths`` has the rule,
``pychop.ops.sdpa_spatial`` the calls), beside the backend's temporal kernel. What the backward keeps: the six
inputs (views stay views), each branch's float32 row statistics (B, T, H, S), and one output-sized tensor: the
output on the kernel path and for ``combine="stack"`` on either path (o_s is its first half), o_s on the SDPA path
with the branches summed (the returned sum is then a tensor of its own). SDPA's GPU kernels also keep their
random-number state (a few bytes). Nothing quadratic.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch

from pychop import autocast_state
from pychop.kernels.outputs import new_output
from pychop.ops import backends, sdpa_spatial, spatial_paths
from pychop.ops.double_backward import sdpa
from pychop.ops.validation import (
    check_attention_inputs,
    check_combine,
    check_deterministic,
    check_flag,
    check_kernel_dtype,
    check_scale,
    check_spatial_path,
    check_window,
)

# ----------------------------------------------------------------------------------------------------------
# The torch backend: the reference semantics.
# ----------------------------------------------------------------------------------------------------------

def temporal_mask(num_frames: int, causal: bool, window: Optional[int], device) -> Optional[torch.Tensor]:
    """Bool (T, T) mask, True where query frame t (row) may attend key frame t' (column); None for all."""
    if not causal and window is None:
        return None
    t = torch.arange(num_frames, device=device)
    lag = t[:, None] - t[None, :]  # t - t'
    allowed = lag >= 0
    if window is not None:
        allowed &= lag < window
    return allowed


def propagate_query_nan(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` with NaN in every row (b, t, s, h) whose query holds a NaN or an inf, as the fused backends return
    (docs/numerics.md): SDPA's CPU flash kernel takes a row of NaN scores, or of scores all -inf, for a fully
    masked one and returns zeros there. One pass over ``out``; autograd keeps only the (B, T, S, H, 1) mask."""
    return out.masked_fill(~q.isfinite().all(-1, keepdim=True), float("nan"))


def spatial_attention_torch(q, k, v, scale: float) -> torch.Tensor:
    """Attention over the S tokens of each frame: scaled_dot_product_attention on (B*T, H, S, D).

    Four dimensions, so that SDPA can take its flash or memory-efficient kernels (on five it falls back to
    its math path, which stores the S x S probabilities). For views of a packed projection the flatten is a
    view too.
    """
    batch, frames = q.shape[:2]
    q4, k4, v4 = (x.transpose(2, 3).flatten(0, 1) for x in (q, k, v))
    out = sdpa(q4, k4, v4, scale=scale)
    return propagate_query_nan(q, out.unflatten(0, (batch, frames)).transpose(2, 3))


def temporal_attention_torch(q, k, v, scale: float, causal: bool, window: Optional[int],
                             grad_window: Optional[int]) -> torch.Tensor:
    """Attention over the T frames of each token: scaled_dot_product_attention on (B*S, H, T, D).

    The grad window is expressed by attending to 2T keys, ``[k, k.detach()]``: a key frame in the grad
    window of the query is taken from the first half, one outside it from the second. The softmax runs over
    the same scores, so the forward is unchanged, and the detached half passes no gradient.
    """
    batch, num_frames, tokens = q.shape[:3]
    q4, k4, v4 = (x.permute(0, 2, 3, 1, 4).flatten(0, 1) for x in (q, k, v))
    mask = temporal_mask(num_frames, causal, window, q.device)
    if grad_window is not None:
        t = torch.arange(num_frames, device=q.device)
        live = t[None, :] > t[:, None] - grad_window  # t' > t - k
        allowed = torch.ones_like(live) if mask is None else mask
        mask = torch.cat([allowed & live, allowed & ~live], dim=1)
        k4 = torch.cat([k4, k4.detach()], dim=-2)
        v4 = torch.cat([v4, v4.detach()], dim=-2)
    out = sdpa(q4, k4, v4, attn_mask=mask, scale=scale)
    return propagate_query_nan(q, out.unflatten(0, (batch, tokens)).permute(0, 3, 1, 2, 4))


# ----------------------------------------------------------------------------------------------------------
# Fused backends: one autograd Function over the kernel interface, with the spatial branch through pychop's
# kernels or through SDPA's (pychop.ops.sdpa_spatial). Under torch.compile it calls the kernels through two custom
# operators, which the compiler keeps whole in its graph (output shapes from their fake functions, never tracing
# into a kernel), and SDPA's kernels as the ATen operators they are: a compiled model has no graph break at the
# attention. In eager mode it calls the same functions directly, without the dispatcher's ~15 us per call.
# ----------------------------------------------------------------------------------------------------------

Tensor = torch.Tensor


def _absent(like: Tensor) -> Tensor:
    """What the kernel functions return for a branch not computed: custom operators cannot return None."""
    return like.new_empty(0)


def device_guard(x: Tensor):
    """Makes x's device current: Triton and the extension launch on the current device."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _input_kind(q_s: Optional[Tensor], q_t: Optional[Tensor], temporal_causal: bool, stacked: bool) -> tuple:
    """What a kernel's compile and launch depend on, beyond the backend: a launch failure is recorded for it."""
    first = q_s if q_s is not None else q_t
    return (str(first.device), first.dtype, first.shape[1], first.shape[-1], q_s is not None, q_t is not None,
            temporal_causal, stacked)


def _reference(q_s, k_s, v_s, q_t, k_t, v_t, scale, temporal_causal, temporal_window, temporal_grad_window,
               stacked) -> Tensor:
    """The torch backend's output of the branches given (summed, or stacked)."""
    branches = []
    if q_s is not None:
        branches.append(spatial_attention_torch(q_s, k_s, v_s, scale))
    if q_t is not None:
        branches.append(temporal_attention_torch(q_t, k_t, v_t, scale, temporal_causal, temporal_window,
                                                 temporal_grad_window))
    return torch.stack(branches, dim=3) if stacked else sum(branches[1:], branches[0])


def _unread_stats(q: Optional[Tensor]) -> Optional[Tensor]:
    """Row statistics of the shape the kernel interface returns, for a forward no kernel ran."""
    if q is None:
        return None
    B, T, S, H, _ = q.shape
    return new_output((B, T, H, S), dtype=torch.float32, device=q.device)


def _first_that_launches(backend: str, fallback: bool, first: Tensor, kind: tuple, launch, past_every_kernel):
    """launch(name) for `backend` or, with `fallback`, for the first of backends.fallbacks(...) whose kernels
    launch (a launch failure is recorded, and warned about, once); past_every_kernel() when only the torch backend
    is left."""
    names = backends.fallbacks(backend, first.device, kind) if fallback else [backend]
    for index, name in enumerate(names):
        if name == "torch":
            return past_every_kernel()
        try:
            with device_guard(first):
                return launch(name)
        except Exception as error:
            reason = backends.launch_failure(error)
            if not fallback or reason is None:
                raise
            backends.record_failure(name, kind, reason, replacement=names[index + 1])
    raise AssertionError("unreachable: the torch backend ends every fallback list")


def _kernels_forward(backend: str, fallback: bool, q_s, k_s, v_s, q_t, k_t, v_t, scale: float,
                     temporal_causal: bool, temporal_window: Optional[int], stacked: bool,
                     out: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The forward kernels of `backend` (with `fallback`, of the first of backends.fallbacks that launches):
    (out, lse_s, lse_t), None for a branch not computed. `out`: where to write, when given. Past every fused
    backend, the torch backend computes out, and the statistics are placeholders no backward reads (its
    backward finds the same fallback and recomputes)."""
    first = q_s if q_s is not None else q_t

    def launch(name):
        return backends.load(name, first.device).forward(
            q_s, k_s, v_s, q_t, k_t, v_t, scale=scale, temporal_causal=temporal_causal,
            temporal_window=temporal_window, stacked=stacked, out=out)

    def reference():
        result = _reference(q_s, k_s, v_s, q_t, k_t, v_t, scale, temporal_causal, temporal_window, None, stacked)
        return result if out is None else out.copy_(result), _unread_stats(q_s), _unread_stats(q_t)

    return _first_that_launches(backend, fallback, first, _input_kind(q_s, q_t, temporal_causal, stacked), launch,
                                reference)


def _recomputed_gradients(dout, q_s, k_s, v_s, q_t, k_t, v_t, scale, temporal_causal, temporal_window,
                          temporal_grad_window, stacked) -> List[Optional[Tensor]]:
    """The six gradients through the torch backend, its forward recomputed from the inputs."""
    inputs = [None if x is None else x.detach().requires_grad_() for x in (q_s, k_s, v_s, q_t, k_t, v_t)]
    with torch.enable_grad():
        out = _reference(*inputs, scale, temporal_causal, temporal_window, temporal_grad_window, stacked)
        present = [x for x in inputs if x is not None]
        grads = iter(torch.autograd.grad(out, present, dout))
    return [None if x is None else next(grads) for x in inputs]


def _kernels_backward(backend: str, fallback: bool, dout, q_s, k_s, v_s, q_t, k_t, v_t, out, lse_s, lse_t,
                      scale: float, temporal_causal: bool, temporal_window: Optional[int],
                      temporal_grad_window: Optional[int], stacked: bool) -> List[Optional[Tensor]]:
    """The backward kernels of `backend` (with `fallback`, of the first of backends.fallbacks that launches;
    the kernel interface's statistics are the same for every backend): the six gradients, None for a branch not
    computed."""
    first = q_s if q_s is not None else q_t

    def launch(name):
        check_deterministic(name, spatial=q_s is not None)
        return list(backends.load(name, first.device).backward(
            dout, q_s, k_s, v_s, q_t, k_t, v_t, out, lse_s, lse_t, scale=scale, temporal_causal=temporal_causal,
            temporal_window=temporal_window, temporal_grad_window=temporal_grad_window, stacked=stacked))

    def recomputed():
        return _recomputed_gradients(dout, q_s, k_s, v_s, q_t, k_t, v_t, scale, temporal_causal, temporal_window,
                                     temporal_grad_window, stacked)

    return _first_that_launches(backend, fallback, first, _input_kind(q_s, q_t, temporal_causal, stacked), launch,
                                recomputed)


def fused_attention_forward(backend: str, fallback: bool, q_s: Optional[Tensor], k_s: Optional[Tensor],
                            v_s: Optional[Tensor], q_t: Optional[Tensor], k_t: Optional[Tensor],
                            v_t: Optional[Tensor], scale: float, temporal_causal: bool,
                            temporal_window: Optional[int], stacked: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The forward kernels of a fused backend: (out, lse_s, lse_t), an empty lse for a branch not computed."""
    out, lse_s, lse_t = _kernels_forward(backend, fallback, q_s, k_s, v_s, q_t, k_t, v_t, scale, temporal_causal,
                                         temporal_window, stacked)
    return out, _absent(out) if lse_s is None else lse_s, _absent(out) if lse_t is None else lse_t


def fused_attention_backward(backend: str, fallback: bool, dout: Tensor, q_s: Optional[Tensor],
                             k_s: Optional[Tensor], v_s: Optional[Tensor], q_t: Optional[Tensor],
                             k_t: Optional[Tensor], v_t: Optional[Tensor], out: Tensor, lse_s: Tensor, lse_t: Tensor,
                             scale: float, temporal_causal: bool, temporal_window: Optional[int],
                             temporal_grad_window: Optional[int], stacked: bool) -> List[Tensor]:
    """The backward kernels of a fused backend: [dq_s, dk_s, dv_s, dq_t, dk_t, dv_t], empty for a branch not
    computed. ``dout`` has a last-dimension stride of 1."""
    grads = _kernels_backward(backend, fallback, dout, q_s, k_s, v_s, q_t, k_t, v_t, out,
                              None if q_s is None else lse_s, None if q_t is None else lse_t, scale, temporal_causal,
                              temporal_window, temporal_grad_window, stacked)
    return [_absent(out) if grad is None else grad for grad in grads]


fused_attention_forward_op = torch.library.custom_op("pychop::fused_attention_forward", mutates_args=())(
    fused_attention_forward)
fused_attention_backward_op = torch.library.custom_op("pychop::fused_attention_backward", mutates_args=())(
    fused_attention_backward)


@fused_attention_forward_op.register_fake
def _forward_shapes(backend, fallback, q_s, k_s, v_s, q_t, k_t, v_t, scale, temporal_causal, temporal_window,
                    stacked):
    first = q_s if q_s is not None else q_t
    B, T, S, H, D = first.shape
    out = first.new_empty((B, T, S, 2, H, D) if stacked else (B, T, S, H, D))
    def stats(q):
        return _absent(out) if q is None else first.new_empty((B, T, H, S), dtype=torch.float32)
    return out, stats(q_s), stats(q_t)


@fused_attention_backward_op.register_fake
def _backward_shapes(backend, fallback, dout, q_s, k_s, v_s, q_t, k_t, v_t, out, *options):
    return [_absent(out) if x is None else x.new_empty(x.shape) for x in (q_s, k_s, v_s, q_t, k_t, v_t)]


def _temporal_beside_sdpa(backend: str, fallback: bool, o_s: Tensor, q_t, k_t, v_t, scale: float,
                          temporal_causal: bool, temporal_window: Optional[int],
                          stacked: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The temporal kernel of `backend` beside the spatial output o_s (B, T, S, H, D) of SDPA: (out, what the
    backward reads as o_s, lse_t). Stacked, the kernel writes its half of the output and o_s is copied into the
    other, which the backward reads; summed, the kernel writes the output, o_s is added to it and kept.
    Compiled, the temporal op allocates its own output and the two are stacked or added."""
    if torch.compiler.is_compiling():
        o_t, _, lse_t = fused_attention_forward_op(backend, fallback, None, None, None, q_t, k_t, v_t, scale,
                                                   temporal_causal, temporal_window, False)
        out = torch.stack((o_s, o_t), dim=3) if stacked else o_t + o_s
        return out, out if stacked else o_s, lse_t
    B, T, S, H, D = q_t.shape
    out = new_output((B, T, S, 2, H, D) if stacked else (B, T, S, H, D), dtype=q_t.dtype, device=q_t.device)
    _, _, lse_t = _kernels_forward(backend, fallback, None, None, None, q_t, k_t, v_t, scale, temporal_causal,
                                   temporal_window, False, out=out[:, :, :, 1] if stacked else out)
    if stacked:
        out[:, :, :, 0].copy_(o_s)
        return out, out, lse_t
    return out.add_(o_s), o_s, lse_t


class FusedAttentionFunction(torch.autograd.Function):
    """Drives a fused backend's kernels, the spatial branch through them or through SDPA's kernel `sdpa_kernel`.

    Saved for backward: the inputs, the row statistics of each branch, and one output-sized tensor: the output
    itself on the kernel path and for ``combine="stack"`` (o_s is its first half), o_s (SDPA's output) when the
    branches are summed on the SDPA path; SDPA's kernels also keep their random-number state (a few bytes)."""

    @staticmethod
    def forward(ctx, backend: str, fallback: bool, sdpa_kernel: Optional[str], scale: float, temporal_causal: bool,
                temporal_window: Optional[int], temporal_grad_window: Optional[int], stacked: bool,
                q_s, k_s, v_s, q_t, k_t, v_t):
        ctx.backend, ctx.fallback, ctx.sdpa_kernel = backend, fallback, sdpa_kernel
        ctx.options = (scale, temporal_causal, temporal_window, temporal_grad_window, stacked)
        if sdpa_kernel is None or q_s is None:
            run = fused_attention_forward_op if torch.compiler.is_compiling() else fused_attention_forward
            out, lse_s, lse_t = run(backend, fallback, q_s, k_s, v_s, q_t, k_t, v_t, scale, temporal_causal,
                                    temporal_window, stacked)
            ctx.save_for_backward(q_s, k_s, v_s, q_t, k_t, v_t, out, lse_s, None, None, lse_t)
            return out
        o_s, (lse_s, seed, offset) = sdpa_spatial.forward(sdpa_kernel, q_s, k_s, v_s, scale)
        out, kept, lse_t = o_s, o_s, None
        if q_t is not None:
            out, kept, lse_t = _temporal_beside_sdpa(backend, fallback, o_s, q_t, k_t, v_t, scale, temporal_causal,
                                                     temporal_window, stacked)
        ctx.save_for_backward(q_s, k_s, v_s, q_t, k_t, v_t, kept, lse_s, seed, offset, lse_t)
        return out

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled():  # the kernels' gradients carry no graph of their own
            raise RuntimeError(
                f"backend {ctx.backend!r} is differentiable once: a backward with create_graph=True (double "
                f"backward, e.g. a gradient penalty) through it would miss the second-order terms; use "
                f"backend='torch' there")
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        q_s, k_s, v_s, q_t, k_t, v_t, kept, lse_s, seed, offset, lse_t = ctx.saved_tensors
        inputs = (q_s, k_s, v_s, q_t, k_t, v_t)
        run = fused_attention_backward_op if torch.compiler.is_compiling() else fused_attention_backward
        if ctx.sdpa_kernel is None or q_s is None:
            grads = run(ctx.backend, ctx.fallback, dout, *inputs, kept, lse_s, lse_t, *ctx.options)
        else:
            scale, stacked = ctx.options[0], ctx.options[-1]
            o_s, dout_s, dout_t = (kept[:, :, :, 0], dout[:, :, :, 0], dout[:, :, :, 1]) if stacked else (kept, dout,
                                                                                                          dout)
            grads = [*sdpa_spatial.backward(ctx.sdpa_kernel, dout_s, q_s, k_s, v_s, o_s, (lse_s, seed, offset), scale),
                     None, None, None]
            if q_t is not None:
                grads[3:] = run(ctx.backend, ctx.fallback, dout_t, None, None, None, q_t, k_t, v_t, o_s,
                                _absent(o_s), lse_t, *ctx.options[:-1], False)[3:]
        return (None,) * 8 + tuple(None if x is None else grad for x, grad in zip(inputs, grads))


# ----------------------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------------------

def _attention(spatial: Optional[dict], temporal: Optional[dict], *, scale, causal, window, grad_window,
               backend, spatial_path="auto", stacked=False):
    """Validates, normalises the options and dispatches; flags and windows arrive checked by the public functions."""
    tensors = {**(spatial or {}), **(temporal or {})}
    check_attention_inputs(tensors)
    first = next(iter(tensors.values()))
    num_frames, head_dim = first.shape[1], first.shape[-1]
    scale = check_scale(scale, head_dim)
    check_spatial_path(spatial_path)
    causal = causal or window is not None
    # A query attends to lags t - t' below `reach`; a grad window at least that wide detaches nothing.
    reach = window if window is not None else num_frames
    if grad_window is not None and grad_window >= reach:
        grad_window = None

    if first.dtype == torch.float64 and backend == "auto":
        backend = "torch"  # the only backend that runs float64
    wanted = backends.requested(backend)
    name = backends.resolve(wanted, first.device)
    inputs = [*(spatial.values() if spatial is not None else [None] * 3),
              *(temporal.values() if temporal is not None else [None] * 3)]
    if name == "torch":
        if spatial is not None and spatial_path == "kernel":
            raise ValueError("spatial_path='kernel' needs a fused backend (triton, cuda or cpp); the torch backend "
                             "runs the spatial branch through scaled_dot_product_attention")
        return _reference(*inputs, scale, causal, window, grad_window, stacked)

    check_kernel_dtype(next(iter(tensors)), first.dtype, name)
    dtype = autocast_state.compute_dtype(first)  # autocast's where it is on, as for scaled_dot_product_attention
    if dtype != first.dtype:
        inputs = [None if x is None else x.to(dtype) for x in inputs]
    sdpa_kernel = None if spatial is None else spatial_paths.choose(spatial_path, *inputs[:3], stacked=stacked)
    # One tensor given as several inputs (q = k = v) goes in as views of it: torch.compile refuses a tensor
    # passed twice to an autograd Function; autograd sums the views' gradients into it.
    inputs = [x if x is None or not any(x is y for y in inputs[:i]) else x.view_as(x) for i, x in enumerate(inputs)]
    return FusedAttentionFunction.apply(name, wanted == "auto", sdpa_kernel, scale, causal, window, grad_window,
                                        stacked, *inputs)


def parallel_st_attention(q_s, k_s, v_s, q_t, k_t, v_t, *, scale=None, temporal_causal=False,
                          temporal_window=None, temporal_grad_window=None, combine="sum", backend="auto",
                          spatial_path="auto", frame_group=None):
    """Spatial attention plus temporal attention, summed: the fused Mobius attention.

    ``out[b,t,s,h]`` is softmax attention over the S tokens of frame t (the spatial branch, ``q_s, k_s, v_s``)
    plus softmax attention over the frames t' of token s (the temporal branch, ``q_t, k_t, v_t``); the
    module docstring of ``pychop.ops.attention`` gives the formula. Differentiable (once, on the fused
    backends: a backward with ``create_graph=True`` through them raises; use ``backend="torch"`` for that).

    Args:
        q_s, k_s, v_s, q_t, k_t, v_t: tensors of shape (B, T, S, H, D): batch, frames, tokens per frame, heads,
            head dim. One dtype (float16, bfloat16 or float32; float64 on the torch backend), one device, a
            last-dimension stride of 1 (views of a packed (B, T, S, 6, H, D) projection work without copies);
            D <= 256, any S, T >= 1. Under ``torch.autocast`` they are cast to its dtype, as
            ``scaled_dot_product_attention`` casts them.
        scale: the factor on the scores, a Python or numpy number or a 0-d tensor that does not require grad;
            None (default): ``D ** -0.5``.
        temporal_causal: bool; True: frame t attends to frames t' <= t only. Default False: every frame.
        temporal_window: None (default) or an int w >= 1: frame t attends to frames t - w < t' <= t (implies
            causal).
        temporal_grad_window: None (default) or an int k >= 1, ChopGrad inside attention: the forward is
            unchanged, and in the backward the temporal keys and values of frames t' <= t - k are constants for
            query frame t. The queries always get their full gradient.
        combine: ``"sum"`` (default): returns ``o_s + o_t``, (B, T, S, H, D). ``"stack"``: returns the branches
            apart, (B, T, S, 2, H, D), ``[:, :, :, 0]`` spatial and ``[:, :, :, 1]`` temporal, whose
            ``.flatten(3)`` is the (B, T, S, 2C) input of one GEMM for both output projections
            (``o_s W_s + o_t W_t = [o_s, o_t] [W_s; W_t]``).
        backend: ``"auto"`` (default: the fastest available for the tensors' device; the environment variable
            ``PYCHOP_BACKEND`` replaces it), ``"torch"`` (plain PyTorch, the reference semantics), ``"triton"``,
            ``"cuda"`` or ``"cpp"``. One that cannot run raises ``pychop.BackendUnavailable`` with the reason;
            ``pychop.available_backends(device)`` lists them.
        spatial_path: how a fused backend runs the spatial branch: ``"auto"`` (default: by device, dtype, D and
            S, see ``pychop.ops.spatial_paths``; the environment variable ``PYCHOP_SPATIAL_PATH`` replaces it),
            ``"sdpa"`` (through ``scaled_dot_product_attention``'s fused kernel on zero-copy views, the temporal
            branch through the backend's kernel) or ``"kernel"`` (the backend's own kernels for both; the torch
            backend, always on SDPA, refuses it).
        frame_group: None (default: one process), or a ``torch.distributed`` process group (or a
            ``pychop.ops.frame_shards.FrameShards``) over which the frames are sharded: the inputs are this
            rank's contiguous block of frames, so is the output, and the temporal options refer to global frame
            indices (``pychop.ops.frame_parallel``; docs/distributed.md).

    Returns the output in the inputs' dtype (autocast's under autocast). A NaN in a query row gives a NaN output
    row. Bad input raises ``ValueError`` or ``TypeError`` naming the argument and what was expected.
    """
    causal = check_flag("temporal_causal", temporal_causal)
    window = check_window("temporal_window", temporal_window)
    grad_window = check_window("temporal_grad_window", temporal_grad_window)
    stacked = check_combine(combine)
    spatial, temporal = dict(q_s=q_s, k_s=k_s, v_s=v_s), dict(q_t=q_t, k_t=k_t, v_t=v_t)
    if frame_group is not None:
        return _frame_parallel(spatial, temporal, frame_group, scale, causal, window, grad_window, backend,
                               spatial_path=spatial_path, stacked=stacked)
    return _attention(spatial, temporal, scale=scale, causal=causal, window=window, grad_window=grad_window,
                      backend=backend, spatial_path=spatial_path, stacked=stacked)


def temporal_attention(q, k, v, *, scale=None, causal=False, window=None, grad_window=None, backend="auto",
                       frame_group=None):
    """The temporal branch alone: each token attends over the frames, ``out[b,t,s,h] = sum_{t' in N(t)}
    softmax_{t'}(scale q[b,t,s,h] . k[b,t',s,h]) v[b,t',s,h]``.

    Args:
        q, k, v: (B, T, S, H, D), as the inputs of ``parallel_st_attention`` (dtypes, device, stride, D <= 256).
        scale: None (default: ``D ** -0.5``), a number or a 0-d tensor that does not require grad.
        causal: bool; True: frame t attends to frames t' <= t. Default False: every frame.
        window: None (default) or an int w >= 1: frame t attends to t - w < t' <= t (implies causal).
        grad_window: None (default) or an int k >= 1: in the backward, the keys and values of frames
            t' <= t - k are constants for query frame t; the forward is unchanged.
        backend: ``"auto"`` (default), ``"torch"``, ``"triton"``, ``"cuda"`` or ``"cpp"``, as for
            ``parallel_st_attention``.
        frame_group: None (default) or the process group (or ``FrameShards``) the frames are sharded over, as
            for ``parallel_st_attention``: the inputs and the output are this rank's frames, the options refer to
            global frame indices.

    Returns (B, T, S, H, D) in the inputs' dtype.
    """
    causal, window = check_flag("causal", causal), check_window("window", window)
    grad_window = check_window("grad_window", grad_window)
    if frame_group is not None:
        return _frame_parallel(None, dict(q=q, k=k, v=v), frame_group, scale, causal, window, grad_window, backend)
    return _attention(None, dict(q=q, k=k, v=v), scale=scale, causal=causal, window=window, grad_window=grad_window,
                      backend=backend)


def spatial_attention(q, k, v, *, scale=None, backend="auto", spatial_path="auto", frame_group=None):
    """The spatial branch alone: the S tokens of each frame attend to each other, ``out[b,t,s,h] = sum_{s'}
    softmax_{s'}(scale q[b,t,s,h] . k[b,t,s',h]) v[b,t,s',h]``.

    Args:
        q, k, v: (B, T, S, H, D), as the inputs of ``parallel_st_attention`` (dtypes, device, stride, D <= 256).
        scale: None (default: ``D ** -0.5``), a number or a 0-d tensor that does not require grad.
        backend: ``"auto"`` (default), ``"torch"``, ``"triton"``, ``"cuda"`` or ``"cpp"``, as for
            ``parallel_st_attention``.
        spatial_path: ``"auto"`` (default), ``"sdpa"`` or ``"kernel"``, as for ``parallel_st_attention``.
        frame_group: None (default) or the process group (or ``FrameShards``) the frames are sharded over, as
            for ``parallel_st_attention``: checked, then this rank's frames are computed alone (a frame's tokens
            never leave it).

    Returns (B, T, S, H, D) in the inputs' dtype.
    """
    if frame_group is not None:
        from pychop.ops.frame_parallel import check_frame_group
        check_frame_group(frame_group)
    return _attention(dict(q=q, k=k, v=v), None, scale=scale, causal=False, window=None, grad_window=None,
                      backend=backend, spatial_path=spatial_path)


def _frame_parallel(spatial, temporal, frame_group, scale, causal, window, grad_window, backend, *,
                    spatial_path="auto", stacked=False):
    """Routes a call with a ``frame_group`` to ``pychop.ops.frame_parallel`` (imported here: it imports this
    module)."""
    from pychop.ops.frame_parallel import frame_parallel_attention
    return frame_parallel_attention(spatial, temporal, frame_group=frame_group, scale=scale, backend=backend,
                                    spatial_path=spatial_path,
                                    temporal_options=dict(causal=causal, window=window, grad_window=grad_window),
                                    combine="stack" if stacked else "sum")
