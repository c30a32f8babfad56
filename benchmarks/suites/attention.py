"""Suite `attention`: fused parallel spatial-temporal attention against the unfused reference.

At each shape: forward and forward+backward time, TFLOP/s and peak memory of every available backend of
``pychop.parallel_st_attention`` (the ``torch`` backend is the unfused reference: two SDPA calls on permuted
copies, then a sum), beside the spatial and the temporal SDPA call alone on contiguous inputs, and each fused
backend's spatial and temporal branch alone (``pychop.spatial_attention``, ``pychop.temporal_attention``)
against the SDPA call of that branch: together the rows show where each side's time goes. On a GPU the
op's rows also hold its floor (``benchmarks.floors``: the sum over the Triton kernels of the larger of their
matmul FLOPs at the H200's matmul ceiling and the fewest bytes they must move at its copy ceiling) and the
share of it each reached, and a ``kernel`` row per Triton kernel holds its time (profiler) over its floor.
At a shape, the forwards of all these are timed in one interleaved comparison, their forward+backward steps
in another (``ctx.compare``): each speedup is the median of per-round ratios, with its p10-p90 spread. The CPU
shapes (float32) are large enough that the kernels, not the Python and dispatch overhead, take the time: the
reference's forward+backward takes 10 to 100 ms on one thread.

The T sweep of the temporal branch is the suite ``attention_sweep``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

import pychop
from benchmarks.floors import DESIGN_SHAPES, kernel_floors, op_floor_ms
from benchmarks.runner import format_table

DESCRIPTION = "parallel spatial-temporal attention: fused backends vs the unfused reference at each shape"

GPU_SHAPES = DESIGN_SHAPES  # name: (B, T, S, H, D), bf16 on the GPU
CPU_SHAPES = {  # (B, T, S, H, D), float32, sized so that the kernels dominate the call overhead
    "cpu-a": (1, 8, 144, 4, 40),  # the Stable Diffusion family's head dim
    "cpu-b": (1, 32, 64, 4, 64),  # many frames of few tokens: the temporal branch's largest share
    "cpu-c": (1, 8, 256, 4, 64),  # mid-size
    "cpu-d": (1, 4, 1024, 2, 64),  # S = 1024: the spatial matrix products dominate
}
SMOKE_SHAPES = {"smoke": (1, 4, 16, 2, 16)}  # every code path, no meaningful figure (--smoke)


def attention_flops(B, T, S, H, D, *, spatial=True, temporal=True):
    """Forward matmul FLOPs: 4 per score per head dim (QK^T and PV); the backward is counted as 2.5x that."""
    return (4 * B * T * H * S * S * D if spatial else 0) + (4 * B * S * H * T * T * D if temporal else 0)


def fwd_bwd(fn, inputs, dout):
    def step():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, dout)
    return step


def fused_backends(ctx):
    return [name for name, reason in pychop.available_backends(ctx.device).items()
            if reason is None and name != "torch"]


def timed_rows(ctx, ops):
    """ops: label -> (fn, inputs, forward FLOPs, the label it is compared with or None). The forwards of all
    ops are timed in one comparison, their forward+backward steps in another; one row per op, with its
    speedups over the op it is compared with (median and p10-p90 of the per-round ratios)."""
    steps = {}
    for label, (fn, inputs, _, _) in ops.items():
        steps[label] = fwd_bwd(fn, inputs, torch.randn_like(fn(*inputs)))
    forward = ctx.compare({label: partial(fn, *inputs) for label, (fn, inputs, _, _) in ops.items()})
    both = ctx.compare(steps)
    rows = []
    for label, (_, _, flops_fwd, vs) in ops.items():
        fwd_ms, fwdbwd_ms = forward.ms[label], both.ms[label]
        row = {"impl": label, "fwd_ms": fwd_ms, "fwdbwd_ms": fwdbwd_ms,
               "fwd_tflops": flops_fwd / fwd_ms * 1e-9, "fwdbwd_tflops": 3.5 * flops_fwd / fwdbwd_ms * 1e-9,
               "peak_mb": ctx.peak_memory_mb(steps[label])}
        if vs is not None:
            row["vs"] = vs
            row.update(forward.speedup(label, over=vs).columns("fwd_speedup"))
            row.update(both.speedup(label, over=vs).columns("fwdbwd_speedup"))
        rows.append(row)
    return rows


def shape_rows(ctx, dtype):
    shapes = SMOKE_SHAPES if ctx.smoke else GPU_SHAPES if ctx.on_gpu else CPU_SHAPES
    rows = []
    for shape_name in ctx.progress(shapes, "attention shapes"):
        B, T, S, H, D = shapes[shape_name]
        make = lambda *size: torch.randn(*size, device=ctx.device, dtype=dtype, requires_grad=True)
        inputs = [make(B, T, S, H, D) for _ in range(6)]
        spatial, temporal = [make(B * T, H, S, D) for _ in range(3)], [make(B * S, H, T, D) for _ in range(3)]
        flops, spatial_flops = attention_flops(B, T, S, H, D), attention_flops(B, T, S, H, D, temporal=False)
        temporal_flops = attention_flops(B, T, S, H, D, spatial=False)
        backends = fused_backends(ctx)
        # label: (fn, its inputs, forward FLOPs, the label it is compared with)
        ops = {"reference": (partial(pychop.parallel_st_attention, backend="torch"), inputs, flops, None),
               "sdpa spatial": (F.scaled_dot_product_attention, spatial, spatial_flops, None),
               "sdpa temporal": (F.scaled_dot_product_attention, temporal, temporal_flops, None)}
        for backend in backends:
            ops[backend] = (partial(pychop.parallel_st_attention, backend=backend), inputs, flops, "reference")
            ops[f"{backend} spatial"] = (partial(pychop.spatial_attention, backend=backend), inputs[:3],
                                         spatial_flops, "sdpa spatial")
            ops[f"{backend} temporal"] = (partial(pychop.temporal_attention, backend=backend), inputs[3:],
                                          temporal_flops, "sdpa temporal")
        found = timed_rows(ctx, ops)
        if ctx.on_gpu:  # the op's rows against the floor of the Triton kernels on an H200
            floors = kernel_floors((B, T, S, H, D), itemsize=dtype.itemsize)
            fwd_floor, fwdbwd_floor = (op_floor_ms(floors, backward=backward) for backward in (False, True))
            for row in found:
                if row["impl"] in ["reference", *backends]:
                    row.update(floor_fwd_ms=fwd_floor, floor_fwdbwd_ms=fwdbwd_floor,
                               fwd_of_floor=fwd_floor / row["fwd_ms"],
                               fwdbwd_of_floor=fwdbwd_floor / row["fwdbwd_ms"])
            if "triton" in backends:
                triton_op = partial(pychop.parallel_st_attention, backend="triton")
                found += kernel_rows(floors, fwd_bwd(triton_op, inputs, torch.randn_like(inputs[0])))
        shape_table = [{"shape": shape_name, "B,T,S,H,D": f"{B},{T},{S},{H},{D}", **row} for row in found]
        print(format_table(shape_table), flush=True)  # a run cut off keeps in its log what it measured
        rows += shape_table
    return rows


def kernel_times_ms(fn, words, repeats=10):
    """Mean GPU milliseconds per call of fn() spent in kernels whose name contains each word (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    totals = dict.fromkeys(words, 0.0)
    for event in prof.key_averages():
        for word in words:
            if word in event.key:
                totals[word] += event.device_time_total / 1e3 / repeats  # microseconds in total -> ms per call
    return totals


def kernel_rows(floors, step):
    """One row per Triton kernel of the fused op (`step` runs it with backend="triton"): its GPU time per call
    (profiler) over its floor."""
    names = [f"_{floor.kernel}_kernel" for floor in floors]
    times = kernel_times_ms(step, names)
    return [{"impl": "triton", "kernel": floor.kernel, "kernel_ms": times[name], "floor_ms": floor.floor_ms,
             "bound": floor.bound, "of_floor": floor.floor_ms / times[name] if times[name] else None}
            for floor, name in zip(floors, names)]


def run(ctx):
    return shape_rows(ctx, torch.bfloat16 if ctx.on_gpu else torch.float32)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shaped = [row for row in rows if "fwd_ms" in row]
    shapes = list(dict.fromkeys(row["shape"] for row in shaped))
    impls = list(dict.fromkeys(row["impl"] for row in shaped))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4))
    for ax, key in zip(axes, ("fwd_ms", "fwdbwd_ms")):
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            values = [next((r[key] for r in shaped if r["shape"] == s and r["impl"] == impl), 0) for s in shapes]
            ax.bar([x + i * width for x in range(len(shapes))], values, width, label=impl)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))], shapes)
        ax.set_ylabel("ms (median)")
        ax.set_title(key.replace("_ms", "").replace("fwdbwd", "forward + backward").replace("fwd", "forward"))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
