"""Comparison harness: run an attention op forward and backward, hold it against the float64 reference.

Tolerances follow FlashAttention's rule: a backend's error against the float64 reference may be at most
ERROR_FACTOR times the error of the plain PyTorch path (the "torch" backend) in the same dtype, plus a small
floor relative to the reference's magnitude (so that a near-exact baseline does not demand the impossible).
The torch backend itself is held against the float64 reference with the per-dtype table TOLERANCE.

Error model. Every error is relative to the reference's largest magnitude, or absolute where that is below 1
(``relative_error``): a gradient that is zero in exact arithmetic is held to FLOOR in absolute terms. The float64
reference's own error (~1e-15) is negligible; the torch path's error is that of float32 GEMMs, exp and the
softmax normalisation; a fused kernel's differs from it by accumulation order and its exp2/log2 rewriting. One
difference is not covered, on purpose: the torch path saves
the probabilities P and reuses them, so where the softmax saturates (p exactly 0 or 1, dominating_key_inputs)
its gradients cancel exactly (ds = p (dp - sum p dp) = 0; its k gradient there is ~1e-65). A fused backward
recomputes p = exp(s - lse) and matches that only if it recomputes every score bit for bit as its forward did:
a score off by a few ulps at |s| ~ 100 moves p by ~1e-5, ten times FLOOR. The rule demands that consistency
rather than widen the bound for its absence; in Triton's interpreter tl.dot provides it on every CPU
(kernels/interpreter_compat.py), on a GPU the gpu-marked cases check it.
"""

from __future__ import annotations

import pytest
import torch

import pychop
from pychop.check import ERROR_FACTOR, FLOOR
from tests.reference import parallel_loops, spatial_loops, temporal_loops

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.gpu))

# Largest error of the torch backend against float64, relative to the reference's largest magnitude.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# ERROR_FACTOR and FLOOR (float32: accurate to float32, not close) are pychop.check's: one rule for the tests and
# for the check users run.

GRAD_NAMES = {6: ("q_s", "k_s", "v_s", "q_t", "k_t", "v_t"), 3: ("q", "k", "v")}

# Every temporal option, in neutral names (see op_call): none, causal, windows (1: each frame alone, so a zero
# query gradient), causal grad windows 1 and 2, a window with a grad window, and a grad window without
# causality (keys of frames t' <= t - 2 are constants, later ones are not).
TEMPORAL_OPTIONS = [
    {},
    {"causal": True},
    {"window": 2},
    {"window": 1},
    {"causal": True, "grad_window": 1},
    {"causal": True, "grad_window": 2},
    {"window": 3, "grad_window": 2},
    {"grad_window": 2},
]


def options_id(options: dict) -> str:
    """A short test id for a dict of temporal options."""
    return "-".join(f"{key}{'' if value is True else value}" for key, value in options.items()) or "none"


DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def dtype_id(dtype: torch.dtype) -> str:
    """A test id for a dtype; no id is part of another, so that ``-k "not fp16"`` keeps bf16."""
    return DTYPE_IDS[dtype]


def runnable_backends(device="cpu", *, interpreted=True):
    """The backends that can run on `device`. On a CPU, Triton runs in its interpreter: fine for kernel tests at
    small sizes, far too slow for whole models, which pass ``interpreted=False``."""
    device = torch.device(device)
    names = [name for name, reason in pychop.available_backends(device).items() if reason is None]
    if not interpreted and device.type == "cpu":
        names = [name for name in names if name != "triton"]
    return names


def input_count(op: str) -> int:
    """How many (B, T, S, H, D) inputs op `op` takes (see op_call)."""
    return 3 if op in ("temporal", "spatial") else 6


def op_call(op: str, inputs, *, backend, scale=None, causal=False, window=None, grad_window=None,
            spatial_path="auto", frame_group=None):
    """Calls pychop's op `op` with neutral option names: "parallel" (branches summed), "stacked" (the parallel
    op with ``combine="stack"``), "temporal" or "spatial"; `spatial_path` goes to the ops with a spatial branch,
    ``frame_group`` as the ops take it."""
    if op in ("parallel", "stacked"):
        return pychop.parallel_st_attention(*inputs, scale=scale, temporal_causal=causal, temporal_window=window,
                                            temporal_grad_window=grad_window, backend=backend,
                                            combine="stack" if op == "stacked" else "sum", spatial_path=spatial_path,
                                            frame_group=frame_group)
    if op == "temporal":
        return pychop.temporal_attention(*inputs, scale=scale, causal=causal, window=window,
                                         grad_window=grad_window, backend=backend, frame_group=frame_group)
    assert not (causal or window or grad_window), "spatial attention takes no temporal options"
    return pychop.spatial_attention(*inputs, scale=scale, backend=backend, spatial_path=spatial_path,
                                    frame_group=frame_group)


def reference_call(op: str, inputs, *, scale=None, causal=False, window=None, grad_window=None):
    """The float64 loop-level reference of `op` on float64 inputs."""
    scale = inputs[0].shape[-1] ** -0.5 if scale is None else scale
    if op == "parallel":
        return parallel_loops(*inputs, scale, causal, window, grad_window)
    if op == "stacked":
        return torch.stack([spatial_loops(*inputs[:3], scale),
                            temporal_loops(*inputs[3:], scale, causal, window, grad_window)], dim=3)
    if op == "temporal":
        return temporal_loops(*inputs, scale, causal, window, grad_window)
    return spatial_loops(*inputs, scale)


def make_inputs(shape, dtype, device, count=6, *, packed=False):
    """`count` fresh standard-normal (B, T, S, H, D) tensors. With `packed`, strided views of one
    (B, T, S, count, H, D) projection, as a fused QKV linear layer produces them."""
    B, T, S, H, D = shape
    if packed:
        qkv = torch.randn(B, T, S, count, H, D, dtype=dtype, device=device, requires_grad=True)
        return [qkv[:, :, :, i] for i in range(count)]
    return [torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for _ in range(count)]


def nan_padded_inputs(shape, dtype, device, count, width):
    """`count` standard-normal (B, T, S, H, D) inputs, each the view [..., :D] of a (B, T, S, H, width) tensor
    whose other columns hold NaN: a kernel that reads past column D of a row gets NaN."""
    inputs = []
    for _ in range(count):
        base = torch.full(shape[:-1] + (width,), float("nan"), dtype=dtype, device=device)
        base[..., :shape[-1]] = torch.randn(shape, dtype=dtype, device=device)
        inputs.append(base[..., :shape[-1]].requires_grad_())
    return inputs


def mixed_layout_inputs(shape, dtype, device, count):
    """`count` standard-normal (B, T, S, H, D) inputs (last stride 1), no two with the same strides: contiguous,
    a view of a packed (B, T, S, 2, H, D) projection, and views of (B, T, H, S, D), (B, S, H, T, D),
    (T, B, S, H, D) and (B, H, T, S, D) tensors. A kernel that reads one tensor with another's strides (all
    inputs of a fused projection share theirs) gets the wrong rows."""
    B, T, S, H, D = shape

    def fresh(*size):
        return torch.randn(*size, dtype=dtype, device=device)

    layouts = [
        lambda: fresh(B, T, S, H, D),
        lambda: fresh(B, T, S, 2, H, D)[:, :, :, 1],
        lambda: fresh(B, T, H, S, D).transpose(2, 3),
        lambda: fresh(B, S, H, T, D).permute(0, 3, 1, 2, 4),
        lambda: fresh(T, B, S, H, D).transpose(0, 1),
        lambda: fresh(B, H, T, S, D).permute(0, 2, 3, 1, 4),
    ]
    inputs = [layouts[i % len(layouts)]().requires_grad_() for i in range(count)]
    assert len({x.stride() for x in inputs}) == count and all(x.shape == shape for x in inputs)
    return inputs


def dominating_key_inputs(op, shape, dtype, device):
    """(q, k, v) for `op` "spatial" or "temporal" whose scores fall by about 200 (past float32's exponent range
    for exp) from each query's one dominating key to all its others: the softmax must subtract the maximum
    over all keys, not a per-block or partial one. The dominating key sits at token 0, 13 and S - 1 of frames
    0, 1, 2 (spatial; 13 is in lanes 8..15 of 16-wide reductions) or, for token s, at frame s % T (temporal)."""
    B, T, S, H, D = shape
    direction = torch.zeros(D)
    direction[0] = 20.0
    q = torch.randn(shape) + direction
    k = torch.randn(shape) - direction
    if op == "spatial":
        for t in range(T):
            k[:, t, (0, 13, S - 1)[t % 3]] += 2 * direction
    else:
        for s in range(S):
            k[:, s % T, s] += 2 * direction
    return [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, torch.randn(shape))]


def temporal_dominated_inputs(shape, dtype, device):
    """The six inputs of the parallel op with v_t 64 times larger than the others: o_t outweighs o_s so much
    that rounding a summed 16-bit output o_s + o_t errs by about as much as o_s itself. A backward that takes
    delta_s = rowsum(dO * o_s) from that output passes the error into dq_s and dk_s (the torch path, branch by
    branch, never rounds the sum)."""
    inputs = make_inputs(shape, dtype, device)
    with torch.no_grad():
        inputs[5].mul_(64)
    return inputs


def check_kernel_statistics(kernels, device):
    """The kernel interface's forward(): out, and each branch's natural-log logsumexp of the scaled scores,
    (B, T, H, S) float32, against float64 (causal, window 2); an absent branch gets None."""
    B, T, S, H, D = 2, 4, 9, 2, 16
    q_s, k_s, v_s, q_t, k_t, v_t = make_inputs((B, T, S, H, D), torch.float32, device)
    scale = 0.3
    with torch.no_grad():
        out, lse_s, lse_t = kernels.forward(q_s, k_s, v_s, q_t, k_t, v_t, scale=scale, temporal_causal=True,
                                            temporal_window=2, stacked=False)
        spatial_scores = torch.einsum("btshd,btzhd->bthsz", q_s.double(), k_s.double()) * scale
        temporal_scores = torch.einsum("btshd,bushd->bthsu", q_t.double(), k_t.double()) * scale
        lag = torch.arange(T)[:, None] - torch.arange(T)[None, :]
        allowed = ((lag >= 0) & (lag < 2)).to(temporal_scores.device)
        temporal_scores = temporal_scores.masked_fill(~allowed[None, :, None, None, :], float("-inf"))
    assert lse_s.shape == lse_t.shape == (B, T, H, S) and lse_s.dtype == lse_t.dtype == torch.float32
    torch.testing.assert_close(lse_s.double(), spatial_scores.logsumexp(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_t.double(), temporal_scores.logsumexp(-1), rtol=1e-5, atol=1e-5)
    expected = pychop.parallel_st_attention(q_s, k_s, v_s, q_t, k_t, v_t, scale=scale, temporal_window=2,
                                            backend="torch")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        _, only_s, none_t = kernels.forward(q_s, k_s, v_s, None, None, None, scale=scale, temporal_causal=False,
                                            temporal_window=None, stacked=False)
    assert none_t is None and only_s.shape == (B, T, H, S)


def forward_backward(fn, inputs, dout=None):
    """Runs fn(*inputs) and its backward against `dout` (fresh random when None): (out, dout, grads)."""
    out = fn(*inputs)
    if dout is None:
        dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout, allow_unused=True)
    return out.detach(), dout, grads


def relative_error(actual, reference):
    """Largest absolute error over the reference's largest magnitude, or over 1 where that is smaller: a
    gradient that is exactly zero in float64 (a query attending to one key) is held to an absolute bound."""
    scale = reference.abs().max().clamp_min(1.0)
    return ((actual.double() - reference).abs().max() / scale).item()


def assert_finite(tensor, what):
    bad = (~torch.isfinite(tensor)).sum().item()
    assert bad == 0, f"{what}: {bad} non-finite elements (outputs are NaN-poisoned: unwritten elements show)"


def check_against_reference(op, backend, shape, dtype, device, seed, *, packed=False, inputs=None, floor=None,
                            spatial_path="auto", **options):
    """Forward and every input gradient of `backend` (its spatial branch on `spatial_path`) against float64,
    within the rule of this module. `inputs` (leaf tensors of `shape`, `dtype`, requiring grad) replaces
    make_inputs' fresh ones; `floor` replaces FLOOR[dtype]."""
    count = input_count(op)
    if inputs is None:
        inputs = make_inputs(shape, dtype, device, count, packed=packed)
    out, dout, grads = forward_backward(
        lambda *x: op_call(op, x, backend=backend, spatial_path=spatial_path, **options), inputs)
    base_out, _, base_grads = forward_backward(lambda *x: op_call(op, x, backend="torch", **options),
                                               inputs, dout)
    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    ref_out, _, ref_grads = forward_backward(lambda *x: reference_call(op, x, **options), inputs64,
                                             dout.double())
    context = (f"{op} backend={backend} spatial_path={spatial_path} shape={shape} dtype={dtype} options={options} "
               f"packed={packed} seed={seed}")
    names = ("out",) + GRAD_NAMES[count]
    for name, actual, baseline, reference in zip(names, (out, *grads), (base_out, *base_grads),
                                                 (ref_out, *ref_grads)):
        if reference is None:  # the loop reference left this input out of the graph: its gradient is zero
            reference = torch.zeros(inputs[0].shape, dtype=torch.float64, device=device)
        assert actual is not None, f"{name} has no gradient: {context}"
        assert_finite(actual, f"{name} of {context}")
        error = relative_error(actual, reference)
        base_error = relative_error(baseline, reference) if baseline is not None else 0.0
        bound = ERROR_FACTOR * base_error + (FLOOR[dtype] if floor is None else floor)
        assert error <= bound, (f"{name}: relative error {error:.3g} > {bound:.3g} = {ERROR_FACTOR} x torch-path "
                                f"error {base_error:.3g} + {FLOOR[dtype] if floor is None else floor:g}; {context}")


def float32_torch_errors(backend, shape, dtype, device="cuda", spatial_path="auto", **options):
    """The parallel op of `backend` (its spatial branch on `spatial_path`) against the torch backend in float32 on
    upcast inputs, the reference where the float64 loop reference would need tens of GiB: for the output and each
    of the six input gradients, a dict of its relative error, the torch path's own error in `dtype` and the bound
    of check_against_reference's rule."""
    inputs = make_inputs(shape, dtype, device)
    out, dout, grads = forward_backward(
        lambda *x: op_call("parallel", x, backend=backend, spatial_path=spatial_path, **options), inputs)
    base_out, _, base_grads = forward_backward(lambda *x: op_call("parallel", x, backend="torch", **options),
                                               inputs, dout)
    inputs32 = [x.detach().float().requires_grad_() for x in inputs]
    ref_out, _, ref_grads = forward_backward(lambda *x: op_call("parallel", x, backend="torch", **options),
                                             inputs32, dout.float())
    def error_of(x, reference):  # relative to the reference's own largest magnitude (gradients here are << 1)
        return ((x.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()

    errors = []
    for name, actual, baseline, reference in zip(("out",) + GRAD_NAMES[6], (out, *grads), (base_out, *base_grads),
                                                 (ref_out, *ref_grads)):
        reference = reference.double()
        error = error_of(actual, reference) if bool(torch.isfinite(actual).all()) else float("inf")
        base_error = error_of(baseline, reference)
        errors.append(dict(name=name, error=error, torch_error=base_error,
                           bound=ERROR_FACTOR * base_error + FLOOR[dtype]))
    return errors


def check_against_float32_torch(backend, shape, dtype, **options):
    """float32_torch_errors on the GPU, each within its bound."""
    for e in float32_torch_errors(backend, shape, dtype, **options):
        assert e["error"] <= e["bound"], (f"{backend} {e['name']}: {e['error']:.3g} > {e['bound']:.3g} at {shape} "
                                          f"{dtype} {options}")
