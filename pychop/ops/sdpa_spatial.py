"""The spatial branch through torch's own attention kernels: ``scaled_dot_product_attention``'s fused kernels,
called on zero-copy (B*T, H, S, D) views of the (B, T, S, H, D) inputs, forward and backward apart.

Kernels (``SDPA_KERNELS``), each a pair of ATen operators:

    "flash_cpu"  _scaled_dot_product_flash_attention_for_cpu(_backward): ATen's CPU flash kernel
    "cudnn"      _scaled_dot_product_cudnn_attention(_backward): cuDNN's fused attention
    "flash"      _scaled_dot_product_flash_attention(_backward): FlashAttention-2 in torch
    "efficient"  _scaled_dot_product_efficient_attention(_backward): the memory-efficient (CUTLASS) kernel

``sdpa_kernel_for(q, k, v)`` names the first kernel of a deliberate order that takes the inputs (torch's own
checks: ``torch.backends.cuda.can_use_*`` and ``torch._fused_sdp_choice``), or None:

    CPU: flash_cpu. GPU: cudnn, flash, efficient where torch itself puts cuDNN first (capability 9.x and 10.x with
    cuDNN > 9.15: torch's check_prefer_cudnn_attention), flash, efficient, cudnn elsewhere; efficient left out
    under torch.use_deterministic_algorithms(True) (its backward accumulates with atomics).

On a GPU every row of the inputs must also start 16-byte aligned (strides and storage offsets), which torch checks
for the efficient kernel only and the others load with 16-byte vectors. ``forward`` returns the output as a
(B, T, S, H, D) view (the kernels write it in that memory order, or q's; a query row holding a NaN or an inf
gives a NaN output row, as the fused backends return) and the saved statistics: the float32
logsumexp per query row and, on a GPU, the kernel's random-number state (a few bytes; no dropout runs). The
backward recomputes the probabilities from them: nothing quadratic is kept.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.nn.attention import SDPBackend

Tensor = torch.Tensor
SDPA_KERNELS = ("flash_cpu", "cudnn", "flash", "efficient")
Stats = Tuple[Tensor, Optional[Tensor], Optional[Tensor]]  # logsumexp, and the GPU kernels' random-number state

_aten = torch.ops.aten
_CAN_USE = {"cudnn": "can_use_cudnn_attention", "flash": "can_use_flash_attention",
            "efficient": "can_use_efficient_attention"}


def frames_view(x: Tensor) -> Tensor:
    """(B, T, S, H, D) -> (B*T, H, S, D): a view for the inputs' layouts (packed projections included)."""
    B, T, S, H, D = x.shape
    return x.transpose(2, 3).reshape(B * T, H, S, D)


def tokens_view(x: Tensor, frames: int) -> Tensor:
    """(B*T, H, S, D) -> (B, T, S, H, D), a view."""
    return x.unflatten(0, (-1, frames)).transpose(2, 3)


def gpu_order(device: torch.device) -> Tuple[str, ...]:
    """The GPU kernels in the order they are tried on `device`."""
    major, _ = torch.cuda.get_device_capability(device)
    cudnn = torch.backends.cudnn.version() or 0
    order = ("cudnn", "flash", "efficient") if major in (9, 10) and cudnn > 91500 else ("flash", "efficient", "cudnn")
    if torch.are_deterministic_algorithms_enabled():
        order = tuple(name for name in order if name != "efficient")
    return order


def rows_aligned(*tensors: Tensor) -> bool:
    """Whether every row (last dimension) of the tensors starts on a 16-byte boundary, as far as strides and
    storage offsets tell (allocations are aligned further)."""
    for x in tensors:
        per_row = 16 // x.element_size()
        if x.storage_offset() % per_row or any(stride % per_row for stride in x.stride()[:-1]):
            return False
    return True


@torch.compiler.assume_constant_result
def sdpa_kernel_for(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    """The SDPA kernel for these (B, T, S, H, D) inputs (see the module docstring), or None when none takes them.
    Under torch.compile it runs once, while tracing."""
    q4, k4, v4 = (frames_view(x) for x in (q, k, v))
    if q.device.type == "cpu":
        chosen = torch._fused_sdp_choice(q4, k4, v4, None, 0.0, False)
        return "flash_cpu" if chosen == int(SDPBackend.FLASH_ATTENTION) else None
    if q.device.type != "cuda" or not rows_aligned(q4, k4, v4):
        return None
    params = torch.backends.cuda.SDPAParams(q4, k4, v4, None, 0.0, False, False)
    with torch.cuda.device(q.device):  # the checks read the current device's properties
        for name in gpu_order(q.device):
            if getattr(torch.backends.cuda, _CAN_USE[name])(params):
                return name
    return None


def forward(kernel: str, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Stats]:
    """Attention over each frame's tokens of (B, T, S, H, D) q, k, v with `kernel`: (o (B, T, S, H, D) view,
    statistics for ``backward``). The kernels run as they are, outside autocast."""
    frames = q.shape[1]
    q4, k4, v4 = (frames_view(x) for x in (q, k, v))
    with torch.autocast(q.device.type, enabled=False):
        if kernel == "flash_cpu":
            out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q4, k4, v4, 0.0, False, scale=scale)
            stats = (lse, None, None)
        elif kernel == "cudnn":
            out, lse, _, _, _, _, seed, offset, _ = _aten._scaled_dot_product_cudnn_attention(
                q4, k4, v4, None, True, 0.0, False, False, scale=scale)
            stats = (lse, seed, offset)
        elif kernel == "flash":
            out, lse, _, _, _, _, rng_state, unused, _ = _aten._scaled_dot_product_flash_attention(
                q4, k4, v4, 0.0, False, False, scale=scale)
            stats = (lse, rng_state, unused)
        elif kernel == "efficient":
            out, lse, seed, offset = _aten._scaled_dot_product_efficient_attention(q4, k4, v4, None, True, 0.0,
                                                                                  False, scale=scale)
            stats = (lse, seed, offset)
        else:
            raise ValueError(f"unknown SDPA kernel {kernel!r}; one of {SDPA_KERNELS}")
    out = tokens_view(out, frames)
    if kernel == "flash_cpu":  # it takes a row of NaN or infinite scores for a fully masked one and writes zeros
        # there; every backend's output row is NaN where its query holds a NaN or an inf (docs/numerics.md). A row's
        # sum is not finite where it holds one (or where finite elements overflow float32's range, past any finite
        # result); summing is ~100x faster on a CPU than isfinite().all(-1); eager mode skips the fill where no
        # row needs it
        poisoned_rows = ~q.sum(-1, keepdim=True).isfinite()
        if torch.compiler.is_compiling() or bool(poisoned_rows.any()):
            out.masked_fill_(poisoned_rows, float("nan"))
    return out, stats


def _in_layout_of(x: Tensor, like: Tensor) -> Tensor:
    """x, or a copy of it, dense with its dimensions in the memory order of `like`'s strides: the layout cuDNN's
    forward gives its output. cuDNN keys its compiled backward graphs on q, k and v alone, so o and dO always go in
    in this one layout."""
    order = sorted(range(like.dim()), key=lambda d: like.stride(d), reverse=True)
    inverse = sorted(range(like.dim()), key=order.__getitem__)
    return x.permute(order).contiguous().permute(inverse)


def backward(kernel: str, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Stats,
             scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of (B, T, S, H, D) q, k, v from the output gradient `dout` and what ``forward`` gave (`out` may be
    a strided view of it, e.g. its half of a stacked output): (dq, dk, dv), (B, T, S, H, D)."""
    frames, S = q.shape[1], q.shape[2]
    q4, k4, v4, out4, dout4 = (frames_view(x) for x in (q, k, v, out, dout))
    lse, seed, offset = stats
    with torch.autocast(q.device.type, enabled=False):
        if kernel == "flash_cpu":
            grads = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout4, q4, k4, v4, out4, lse, 0.0, False, scale=scale)
        elif kernel == "cudnn":
            out4, dout4 = _in_layout_of(out4, q4), _in_layout_of(dout4, q4)
            grads = _aten._scaled_dot_product_cudnn_attention_backward(
                dout4, q4, k4, v4, out4, lse, seed, offset, None, None, None, S, S, 0.0, False, scale=scale)
        elif kernel == "flash":
            grads = _aten._scaled_dot_product_flash_attention_backward(
                dout4, q4, k4, v4, out4, lse, None, None, S, S, 0.0, False, seed, offset, scale=scale)
        elif kernel == "efficient":
            grads = _aten._scaled_dot_product_efficient_attention_backward(
                dout4, q4, k4, v4, None, out4, lse, seed, offset, 0.0, [True, True, True, False], False,
                scale=scale)[:3]
        else:
            raise ValueError(f"unknown SDPA kernel {kernel!r}; one of {SDPA_KERNELS}")
    return tuple(tokens_view(grad, frames) for grad in grads)
