"""Suite `attention`: fused parallel spatial-temporal attention against the unfused reference.

At each shape: forward and forward+backward time, TFLOP/s and peak memory of every available backend of
``pychop.parallel_st_attention`` (the ``torch`` backend is the unfused reference: two SDPA calls on permuted
copies, then a sum), beside the spatial and the temporal SDPA call alone on contiguous inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import pychop

DESCRIPTION = "parallel spatial-temporal attention: fused backends vs the unfused reference"

# name: (B, T, h, w, H, D); S = h * w. DESIGN.md's shapes, bf16 on the GPU.
GPU_SHAPES = {
    "A": (1, 16, 64, 64, 5, 64),
    "B": (2, 16, 32, 32, 10, 64),
    "C": (1, 32, 64, 64, 8, 64),
    "D": (1, 16, 32, 32, 8, 128),
    "E": (4, 64, 16, 16, 8, 64),
    "F": (2, 16, 32, 32, 8, 40),
}
CPU_SHAPES = {
    "cpu-a": (1, 8, 8, 8, 2, 32),
    "cpu-b": (2, 4, 6, 6, 4, 40),
}


def attention_flops(B, T, S, H, D, *, spatial=True, temporal=True, backward=False):
    """Matmul FLOPs: 4 per score per head dim forward (QK^T and PV); the backward is 2.5x the forward."""
    flops = (4 * B * T * H * S * S * D if spatial else 0) + (4 * B * S * H * T * T * D if temporal else 0)
    return flops * (3.5 if backward else 1.0)


def fwd_bwd(fn, inputs, dout):
    def step():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, dout)
    return step


def measure(ctx, label, fn, inputs, flops_fwd, reference=None):
    out = fn(*inputs)
    dout = torch.randn_like(out)
    fwd_ms = ctx.time_ms(lambda: fn(*inputs))
    both = fwd_bwd(fn, inputs, dout)
    fwdbwd_ms = ctx.time_ms(both)
    row = {"impl": label, "fwd_ms": fwd_ms, "fwdbwd_ms": fwdbwd_ms,
           "fwd_tflops": flops_fwd / fwd_ms * 1e-9, "fwdbwd_tflops": 3.5 * flops_fwd / fwdbwd_ms * 1e-9,
           "peak_mb": ctx.peak_memory_mb(both)}
    if reference is not None:
        row["fwd_speedup"] = reference["fwd_ms"] / fwd_ms
        row["fwdbwd_speedup"] = reference["fwdbwd_ms"] / fwdbwd_ms
    return row


def run(ctx):
    dtype = torch.bfloat16 if ctx.on_gpu else torch.float32
    shapes = GPU_SHAPES if ctx.on_gpu else CPU_SHAPES
    fused = [name for name, reason in pychop.available_backends(ctx.device).items()
             if reason is None and name != "torch"]
    rows = []
    for shape_name in ctx.progress(shapes, "attention shapes"):
        B, T, h, w, H, D = shapes[shape_name]
        S = h * w
        make = lambda *size: torch.randn(*size, device=ctx.device, dtype=dtype, requires_grad=True)
        inputs = [make(B, T, S, H, D) for _ in range(6)]
        flops = attention_flops(B, T, S, H, D)
        shape_rows = []
        reference = measure(ctx, "reference", lambda *x: pychop.parallel_st_attention(*x, backend="torch"),
                            inputs, flops)
        shape_rows.append(reference)
        for backend in fused:
            fn = lambda *x, backend=backend: pychop.parallel_st_attention(*x, backend=backend)
            shape_rows.append(measure(ctx, backend, fn, inputs, flops, reference))
        spatial = [make(B * T, H, S, D) for _ in range(3)]
        shape_rows.append(measure(ctx, "sdpa spatial", F.scaled_dot_product_attention, spatial,
                                  attention_flops(B, T, S, H, D, temporal=False)))
        temporal = [make(B * S, H, T, D) for _ in range(3)]
        shape_rows.append(measure(ctx, "sdpa temporal", F.scaled_dot_product_attention, temporal,
                                  attention_flops(B, T, S, H, D, spatial=False)))
        rows += [{"shape": shape_name, "B,T,S,H,D": f"{B},{T},{S},{H},{D}", **row} for row in shape_rows]
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(row["shape"] for row in rows))
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key in zip(axes, ("fwd_ms", "fwdbwd_ms")):
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            values = [next((r[key] for r in rows if r["shape"] == s and r["impl"] == impl), 0) for s in shapes]
            ax.bar([x + i * width for x in range(len(shapes))], values, width, label=impl)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))], shapes)
        ax.set_ylabel("ms (median)")
        ax.set_title(key.replace("_ms", "").replace("fwdbwd", "forward + backward").replace("fwd", "forward"))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
