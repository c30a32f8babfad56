"""What every Triton attention kernel of pychop shares: head-dim buckets, tl.dot's precision, tile pointers.

The head dim is the one size the kernels compile for: it is padded to a power of two >= 16 (``head_dim_block``)
and the launch tables are keyed on its bucket (``head_dim_bucket``: 64, 128 or 256) and on whether the dtype
has two bytes. The last bucket is ``MAX_HEAD_DIM`` (kernels/limits.py), the largest head dim any kernel takes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .limits import MAX_HEAD_DIM
from .outputs import new_output

if os.environ.get("TRITON_INTERPRET") == "1":
    from . import interpreter_compat

    interpreter_compat.apply()

HEAD_DIM_BUCKETS = (64, 128, MAX_HEAD_DIM)

LOG2E = tl.constexpr(1.4426950408889634)  # the spatial branch scores in log2 units: exp2 instead of exp
LN2 = tl.constexpr(0.6931471805599453)


def interpreting() -> bool:
    """True under Triton's CPU interpreter, whose launch settings are small tiles and one warp."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def head_dim_block(head_dim: int) -> int:
    """The head dim the kernels compile for: the next power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(head_dim))


def head_dim_bucket(head_dim: int) -> int:
    """The launch-table row of a head dim: the smallest bucket that holds it."""
    for bucket in HEAD_DIM_BUCKETS:
        if head_dim <= bucket:
            return bucket
    raise ValueError(f"head dim {head_dim} is larger than {MAX_HEAD_DIM}")


def dot_constants(dtype: torch.dtype) -> dict:
    """tl.dot's precision for `dtype`: float32 multiplies in full precision ("ieee", never TF32); the
    interpreter cannot multiply bfloat16, so it gets float32 operands (UPCAST_DOT)."""
    return dict(DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                UPCAST_DOT=interpreting() and dtype == torch.bfloat16)


def strides4(x):
    """(b, t, s, h) strides of a (B, T, S, H, D) tensor (last stride 1)."""
    return x.stride()[:4]


def row_statistics(B, T, S, H, device):
    """A float32 (B, T, H, S) tensor of per-row statistics (logsumexp, delta), poisoned in tests."""
    return new_output((B, T, H, S), dtype=torch.float32, device=device)


@triton.jit
def bounded_exponent(x, LIMIT: tl.constexpr):
    """min(x, LIMIT), NaN kept: the exponent of a probability recomputed in a backward, score - logsumexp, which
    is <= 0 in exact arithmetic. Rounding puts it above 0 by a few units of the score's last place, which a huge
    scale magnifies until exp overflows to inf (and then NaN). LIMIT is log 2 in the exponent's units: a
    probability stays at most 2, and the clamp binds only where rounding reaches a unit of the exponent."""
    return tl.where(x > LIMIT, LIMIT, x)


@triton.jit
def mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot accumulating in float32 (2-D, or batched 3-D); UPCAST feeds it float32 operands."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)
