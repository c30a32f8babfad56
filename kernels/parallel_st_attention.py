"""The Triton backend's kernel interface (``pychop.ops.attention``) on the (B, T, S, H, D) layout:

    forward(q_s, k_s, v_s, q_t, k_t, v_t, *, scale, temporal_causal, temporal_window, stacked, out=None)
        -> out (B, T, S, H, D) or stacked (B, T, S, 2, H, D), lse_s and lse_t (B, T, H, S) float32 or None
    backward(dout, q_s, k_s, v_s, q_t, k_t, v_t, out, lse_s, lse_t,
             *, scale, temporal_causal, temporal_window, temporal_grad_window, stacked)
        -> (dq_s, dk_s, dv_s, dq_t, dk_t, dv_t)

Each branch has its own kernels (``spatial_attention``: programs over a frame's tokens; ``temporal_attention``:
programs over a block of tokens across its frames), reading their inputs where they lie. Forward: the temporal
kernel writes o_t, then the spatial kernel adds o_s in one read-modify-write of the output (stacked: each writes
its own half). Backward: the temporal kernels first, since the spatial backward of a summed output takes
delta_s = rowsum(dO * out) - delta_t, with delta_t = rowsum(P_t dP_t) from the temporal query kernel.
"""

from __future__ import annotations

from .outputs import new_output
from .spatial_attention import spatial_backward, spatial_forward
from .temporal_attention import temporal_backward, temporal_forward


def _halves(x, stacked):
    """(spatial, temporal) views of an output or output gradient: its two halves stacked, itself twice summed."""
    return (x[:, :, :, 0], x[:, :, :, 1]) if stacked else (x, x)


def forward(q_s, k_s, v_s, q_t, k_t, v_t, *, scale, temporal_causal, temporal_window, stacked, out=None):
    """Output (B, T, S, H, D), or (B, T, S, 2, H, D) stacked, in the input dtype and each present branch's lse
    (B, T, H, S) float32. `out`: the tensor to write the output into (any strides, the last 1), or None."""
    first = q_s if q_s is not None else q_t
    B, T, S, H, D = first.shape
    if out is None:
        out = new_output((B, T, S, 2, H, D) if stacked else (B, T, S, H, D), dtype=first.dtype, device=first.device)
    out_s, out_t = _halves(out, stacked)
    lse_s = lse_t = None
    if q_t is not None:
        lse_t = temporal_forward(q_t, k_t, v_t, out_t, scale=scale, causal=temporal_causal, window=temporal_window)
    if q_s is not None:
        lse_s = spatial_forward(q_s, k_s, v_s, out_s, scale=scale, add_to_out=q_t is not None and not stacked)
    return out, lse_s, lse_t


def backward(dout, q_s, k_s, v_s, q_t, k_t, v_t, out, lse_s, lse_t, *, scale, temporal_causal, temporal_window,
             temporal_grad_window, stacked):
    """Gradients of the six inputs (None for an absent branch), contiguous, in the input dtype. Besides them,
    allocates float32 (B, T, H, S) rows (each branch's delta): nothing quadratic."""
    dout_s, dout_t = _halves(dout, stacked)
    dq_t = dk_t = dv_t = delta_t = None
    if q_t is not None:
        dq_t, dk_t, dv_t, delta_t = temporal_backward(dout_t, q_t, k_t, v_t, lse_t, scale=scale,
                                                      causal=temporal_causal, window=temporal_window,
                                                      grad_window=temporal_grad_window)
    dq_s = dk_s = dv_s = None
    if q_s is not None:
        out_is_sum = q_t is not None and not stacked
        dq_s, dk_s, dv_s = spatial_backward(dout_s, q_s, k_s, v_s, _halves(out, stacked)[0], lse_s, scale=scale,
                                            delta_t=delta_t if out_is_sum else None)
    return dq_s, dk_s, dv_s, dq_t, dk_t, dv_t
