"""Suite `attention_sweep`: the temporal branch (``pychop.temporal_attention``, causal) over T = 8 ... 256 with
the gradient window k in {1, 4, T}, every backend, bf16, on a GPU (skipped on a CPU: the interpreter's timings
say nothing of kernel cost).

The backward splits into the query kernel (dq and delta over every key frame of the causal range, whatever k)
and the key kernel (dk, dv over the k-frame band only, T * k). At each T all backends and windows are timed in
one interleaved comparison; fused rows hold their forward+backward speedup over the torch backend at the same
k, and the Triton rows the two backward kernels' times (profiler).
"""

from __future__ import annotations

from functools import partial

import torch

import pychop
from benchmarks.plots import no_data
from benchmarks.suites.attention import fused_backends, fwd_bwd, kernel_times_ms
from benchmarks.tables import Table, markdown

DESCRIPTION = "the temporal branch over T = 8 ... 256 and grad window k in {1, 4, T} (GPU)"

SWEEP_SHAPE = (1, 32 * 32, 8, 64)  # (B, S, H, D)
SWEEP_FRAMES = (8, 16, 32, 64, 128, 256)
SWEEP_WINDOWS = (1, 4, None)  # None: k = T, full backpropagation


def run(ctx):
    """Causal temporal attention over T with grad window k in {1, 4, T}: backward time and its split."""
    dtype = torch.bfloat16
    if not ctx.on_gpu:
        return [{"sweep": "T x grad window", "note": "skipped on the CPU: needs a GPU (interpreter timings "
                                                     "say nothing of kernel cost)"}]
    B, S, H, D = SWEEP_SHAPE
    backends = fused_backends(ctx) + ["torch"]
    rows = []
    for T in ctx.progress(SWEEP_FRAMES[:2] if ctx.smoke else SWEEP_FRAMES, "T sweep"):
        inputs = [torch.randn(B, T, S, H, D, device=ctx.device, dtype=dtype, requires_grad=True) for _ in range(3)]
        dout = torch.randn(B, T, S, H, D, device=ctx.device, dtype=dtype)
        ops = {(backend, k): partial(pychop.temporal_attention, causal=True, grad_window=k, backend=backend)
               for backend in backends for k in SWEEP_WINDOWS}
        label = lambda backend, k: f"{backend} k={'T' if k is None else k}"
        forward = ctx.compare({label(*key): partial(fn, *inputs) for key, fn in ops.items()})
        steps = {label(*key): fwd_bwd(fn, inputs, dout) for key, fn in ops.items()}
        both = ctx.compare(steps)
        for backend, k in ops:
            name = label(backend, k)
            row = {"sweep": "T x grad window", "impl": backend, "T": T, "k": "T" if k is None else k,
                   "fwd_ms": forward.ms[name], "bwd_ms": both.ms[name] - forward.ms[name], "fwdbwd_ms": both.ms[name],
                   "peak_mb": ctx.peak_memory_mb(steps[name])}
            if backend != "torch":
                row.update(both.speedup(name, over=label("torch", k)).columns("fwdbwd_speedup"))
            if backend == "triton":  # its kernels by name: _temporal_backward_query_kernel, ..._key_kernel
                split = kernel_times_ms(steps[name], ("backward_query", "backward_key"))
                row["bwd_dq_kernel_ms"], row["bwd_dkdv_kernel_ms"] = split["backward_query"], split["backward_key"]
            rows.append(row)
        ctx.print_rows(frames_table(rows, T), f"T = {T}")  # kept in the log if the run is cut off
    return rows


def frames_table(rows, T):
    """The rows of frame count T (one comparison of forwards, one of forward+backward steps), less T."""
    return [{key: value for key, value in row.items() if key not in ("sweep", "T")} for row in rows
            if row.get("T") == T]


def tables(rows):
    """One table per frame count T; rows with only a note (the suite skipped) as their own table."""
    out = [Table(f"causal temporal attention, T = {T}, (B, S, H, D) = {SWEEP_SHAPE}", frames_table(rows, T),
                 "bf16; k: the gradient window (T: full backpropagation); fwdbwd_speedup: over the torch backend "
                 "at the same k")
           for T in dict.fromkeys(row["T"] for row in rows if "T" in row)]
    notes = [{"note": row["note"]} for row in rows if "T" not in row]
    return out + ([Table("skipped", notes)] if notes else [])


def report(result):
    """Markdown for docs/benchmarks.md: the suite's tables."""
    return "\n\n".join(markdown(table) for table in tables(result["rows"]))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [row for row in rows if "T" in row]
    fig, ax = plt.subplots(figsize=(7, 4))
    for impl in dict.fromkeys(row["impl"] for row in swept):
        for k_label in dict.fromkeys(str(r["k"]) for r in swept):
            points = [(r["T"], r["bwd_ms"]) for r in swept if r["impl"] == impl and str(r["k"]) == k_label]
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{impl} k={k_label}")
    ax.set(xlabel="frames T", ylabel="backward ms", title="causal temporal attention, grad window k")
    if swept:
        frames = sorted({row["T"] for row in swept})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(frames, [str(T) for T in frames])
        ax.minorticks_off()
        ax.legend()
    else:
        no_data(ax, "; ".join(row["note"] for row in rows if "note" in row) or "no rows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
