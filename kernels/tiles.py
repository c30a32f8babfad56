"""What every Triton attention kernel of pychop shares: head-dim widths and buckets, tl.dot's precision, the
alignment the host proves.

The head dim is the one size the kernels compile for. The temporal kernels (memory-bound) pad it to a power of
two >= 16 (``head_dim_block``); the spatial kernels (compute-bound) split it into a power of two and a narrower
power-of-two tail where that is narrower than the padding (``head_dim_split``: 40 = 32 + 16, 80 = 64 + 16,
160 = 128 + 32). The launch tables are keyed on the GPU family (kernels/gpu_families.py), the head dim's bucket
(``head_dim_bucket``: 64, 96, 128, 192 or 256; the temporal tables, whose kernels pad, only the powers of two)
and whether the dtype has two bytes. The last bucket is ``MAX_HEAD_DIM`` (kernels/limits.py), the largest head
dim any kernel takes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gpu_families import device_family
from .limits import MAX_HEAD_DIM
from .outputs import new_output

if os.environ.get("TRITON_INTERPRET") == "1":
    from . import interpreter_compat

    interpreter_compat.apply()

LN2 = tl.constexpr(0.6931471805599453)  # log 2: bounded_exponent's limit in natural-log units
HEAD_DIM_BUCKETS = (64, 96, 128, 192, MAX_HEAD_DIM)


def interpreting() -> bool:
    """True under Triton's CPU interpreter, whose launch settings are small tiles and one warp."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_family(device: torch.device) -> str:
    """The launch tables' key for `device`: its GPU family's name, or "interpreter" under Triton's interpreter."""
    return "interpreter" if interpreting() else device_family(device).name


def head_dim_block(head_dim: int) -> int:
    """The head dim the kernels compile for: the next power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(head_dim))


def head_dim_split(head_dim: int):
    """(BLOCK_D, TAIL_D): the head dim as the spatial kernels compile it, BLOCK_D columns (a power of two >= 16)
    and TAIL_D more (0, or a power of two >= 16) in products of their own. A tail only where the two are
    narrower than the padding ``head_dim_block``: 40 -> (32, 16), 72 and 80 -> (64, 16), 96 -> (64, 32),
    160 -> (128, 32); 64 -> (64, 0), 56 -> (64, 0) (32 + 32 is no narrower)."""
    padded = head_dim_block(head_dim)
    block = max(16, padded // 2)
    tail = max(16, triton.next_power_of_2(head_dim - block)) if head_dim > block else 0
    return (block, tail) if 0 < tail and block + tail < padded else (padded, 0)


def head_dim_bucket(head_dim: int) -> int:
    """The launch-table row of a head dim: the smallest bucket that holds it (96 and 192 hold the head dims that
    ``head_dim_split`` splits: 65 ... 96 and 129 ... 192)."""
    for bucket in HEAD_DIM_BUCKETS:
        if head_dim <= bucket:
            return bucket
    raise ValueError(f"head dim {head_dim} is larger than {MAX_HEAD_DIM}")


def alignment(*tensors) -> int:
    """The elements in 16 bytes when every row of every tensor (one row: the last dim at fixed leading indices)
    starts 16-byte aligned, which makes every tile load a 16-byte vector load; else 1. Checked on the data
    pointers and the strides of all but the last dim, which Triton's own specialisation (strides divisible by 16
    elements) misses for a head stride D = 40 or 72."""
    elements = 16 // tensors[0].element_size()
    aligned = all(x.data_ptr() % 16 == 0 and all(s % elements == 0 for s in x.stride()[:-1])
                  for x in tensors if x is not None)
    return elements if aligned else 1


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
