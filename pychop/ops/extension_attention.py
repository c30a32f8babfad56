"""The ``"cuda"`` and ``"cpp"`` backends of the attention ops: the kernels of the extension ``pychop._C``.

Implements the kernel interface of ``pychop.ops.attention`` (see its module docstring); the caller makes the
tensors' device current (``pychop.ops.attention.device_guard``), as the binding does again. Outputs are
allocated here with ``pychop.kernels.outputs.new_output`` (NaN-poisoned under ``PYCHOP_POISON_OUTPUTS=1``) and
written by the extension; gradients come back contiguous. ``ensure_available(backend)`` builds or loads
``pychop._C`` (see ``pychop._build``) and raises ``BackendUnavailable`` with the reason when it cannot run.
"""

from __future__ import annotations

from typing import Optional

import torch

from pychop import _build
from pychop.kernels.outputs import new_output
from pychop.ops.backends import BackendUnavailable


def ensure_available(backend: str) -> None:
    """Builds or loads pychop._C; raises BackendUnavailable naming `backend` and the reason."""
    try:
        extension = _build.load()
    except _build.ExtensionBuildError as error:
        raise BackendUnavailable(f"backend {backend!r}: {error}") from error
    if backend == "cuda" and not extension.with_cuda():
        reason = _build.cuda_missing_reason() or "it was built before CUDA was available here"
        raise BackendUnavailable(f"backend 'cuda': pychop._C was built without its CUDA kernels: {reason}")


def _stream(x: torch.Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0


def _stats(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if x is None:
        return None
    B, T, S, H, _ = x.shape
    return new_output((B, T, H, S), dtype=torch.float32, device=x.device)


def _branches(x: torch.Tensor, stacked: bool):
    """(spatial, temporal) views of a stacked (B, T, S, 2, H, D) output or gradient; (x, None) when summed."""
    return (x[:, :, :, 0], x[:, :, :, 1]) if stacked else (x, None)


def forward(q_s, k_s, v_s, q_t, k_t, v_t, *, scale: float, temporal_causal: bool,
            temporal_window: Optional[int], stacked: bool, out: Optional[torch.Tensor] = None):
    """-> out (B, T, S, H, D), or (B, T, S, 2, H, D) when stacked, in the input dtype; lse_s and lse_t
    (B, T, H, S) float32 (None for a branch not computed). `out`: the tensor to write the output into (any
    strides, the last 1), or None."""
    first = q_s if q_s is not None else q_t
    B, T, S, H, D = first.shape
    if out is None:
        out = new_output((B, T, S, 2, H, D) if stacked else (B, T, S, H, D), dtype=first.dtype, device=first.device)
    lse_s, lse_t = _stats(q_s), _stats(q_t)
    _build.load().attention_forward(q_s, k_s, v_s, q_t, k_t, v_t, *_branches(out, stacked), lse_s, lse_t,
                                    scale, temporal_causal, temporal_window or 0, _stream(first))
    return out, lse_s, lse_t


def backward(dout, q_s, k_s, v_s, q_t, k_t, v_t, out, lse_s, lse_t, *, scale: float, temporal_causal: bool,
             temporal_window: Optional[int], temporal_grad_window: Optional[int], stacked: bool):
    """-> (dq_s, dk_s, dv_s, dq_t, dk_t, dv_t), contiguous, in the input dtype (None for a branch not
    computed). Probabilities are recomputed from lse_s and lse_t."""
    def grads(q):
        if q is None:
            return None, None, None
        return tuple(new_output(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))

    spatial_grads, temporal_grads = grads(q_s), grads(q_t)
    _build.load().attention_backward(*_branches(dout, stacked), q_s, k_s, v_s, q_t, k_t, v_t,
                                     _branches(out, stacked)[0], lse_s, lse_t,
                                     *spatial_grads, *temporal_grads, scale, temporal_causal,
                                     temporal_window or 0, temporal_grad_window or 0, _stream(out))
    return (*spatial_grads, *temporal_grads)
