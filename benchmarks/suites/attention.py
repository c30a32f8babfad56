"""Suite `attention`: the fused parallel spatial-temporal attention against two unfused references, per path.

At each shape, three comparisons, each timed forward and forward+backward (``ctx.compare``: candidates interleaved,
each speedup the median of per-round ratios with its p10-p90 spread):

- ``spatial``: the spatial branch alone, SDPA on (B*T, H, S, D) views under each of its backends and its default
  priority, pychop's SDPA path (``spatial_path="sdpa"``, the SDPA call inside the fused op's machinery) and each
  fused backend's own kernel; speedups over SDPA's default.
- ``temporal``: the temporal branch alone, SDPA on contiguous (B*S, H, T, D) inputs under each of its backends and
  its default, and each fused backend's kernel; speedups over SDPA's default.
- ``op``: the parallel op (branches summed). References: ``diffusers default`` (what a diffusers model does: SDPA
  on the spatial views, the temporal inputs permuted to (B*S, T, ...) copies, SDPA, permuted back, summed; SDPA's
  default backend priority) and ``best unfused`` (the same with each branch under its fastest SDPA backend of the
  comparisons above, named in its row). Candidates: the torch backend and every fused backend on each spatial
  path (``{backend} sdpa``, ``{backend} kernel``); speedups over both references, forward and forward+backward,
  and over the torch backend, forward+backward.

Then ``auto``: ``backend="auto"`` against the torch backend, forward+backward, in a comparison of the two alone,
what auto takes at that shape (``pychop.check.auto_takes``) and ``no_slower``: whether the p10 of the per-round
speedups is at least 0.95 (AUTO_NO_SLOWER_P10), checked on the machine the suite runs on. Every comparison prints
its table as it ends; the JSON holds the rows, ``report(result)`` makes them Markdown for docs/benchmarks.md.

On a GPU (bf16) the op's and the branches' rows also hold their floor (``benchmarks.floors`` at an H200's
ceilings; the op's per spatial path) and the share of it reached, and a ``kernel`` row per Triton kernel its time
(profiler) over its floor. The CPU shapes (float32) are large enough that the kernels, not the Python and dispatch
overhead, take the time.

The T sweep of the temporal branch is the suite ``attention_sweep``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pychop
from benchmarks.floors import DESIGN_SHAPES, kernel_floors, op_floor_ms, spatial_path_floors
from benchmarks.tables import Table, markdown
from pychop.check import auto_takes

DESCRIPTION = "parallel spatial-temporal attention: fused backends per spatial path vs diffusers' and the best unfused"

GPU_SHAPES = DESIGN_SHAPES  # name: (B, T, S, H, D), bf16 on the GPU
CPU_SHAPES = {  # (B, T, S, H, D), float32, sized so that the kernels dominate the call overhead
    "cpu-a": (1, 8, 144, 4, 40),  # the Stable Diffusion family's head dim
    "cpu-b": (1, 32, 64, 4, 64),  # many frames of few tokens: the temporal branch's largest share
    "cpu-c": (1, 8, 256, 4, 64),  # mid-size
    "cpu-d": (1, 4, 1024, 2, 64),  # S = 1024: the spatial matrix products dominate
}
SMOKE_SHAPES = {"smoke": (1, 4, 16, 2, 16)}  # every code path, no meaningful figure (--smoke)
SDPA_BACKENDS = {"cpu": ("FLASH_ATTENTION", "MATH"), "cuda": ("CUDNN_ATTENTION", "FLASH_ATTENTION",
                                                              "EFFICIENT_ATTENTION")}
SPATIAL_PATHS = ("sdpa", "kernel")
AUTO_NO_SLOWER_P10 = 0.95  # auto is no slower than the torch backend: p10 of its per-round speedup at least this
REFERENCES = {"diffusers": "diffusers default", "best": "best unfused", "torch": "torch backend"}


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


# ----------------------------------------------------------------------------------------------------------
# The unfused references.
# ----------------------------------------------------------------------------------------------------------

def sdpa_under(backend: Optional[str]) -> Callable:
    """scaled_dot_product_attention under one SDPA backend (its name in SDPBackend), or its default priority."""
    if backend is None:
        return F.scaled_dot_product_attention

    def attend(q, k, v):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(q, k, v)
    return attend


def spatial_views(*xs):
    """(B, T, S, H, D) -> (B*T, H, S, D) views."""
    return [x.transpose(2, 3).flatten(0, 1) for x in xs]


def unfused(spatial_attend: Callable, temporal_attend: Callable) -> Callable:
    """The parallel op as a diffusers model computes it: spatial attention on (B*T, H, S, D) views, temporal
    attention on (B*S, H, T, D) views of permuted copies (diffusers' (B*S, T, C) rearrangement), the temporal
    output permuted back, the two summed."""
    def op(q_s, k_s, v_s, q_t, k_t, v_t):
        B, T, S, H, D = q_s.shape
        o_s = spatial_attend(*spatial_views(q_s, k_s, v_s)).unflatten(0, (B, T)).transpose(2, 3)
        pixels = [x.permute(0, 2, 1, 3, 4).reshape(B * S, T, H, D).transpose(1, 2) for x in (q_t, k_t, v_t)]
        o_t = temporal_attend(*pixels).transpose(1, 2).reshape(B, S, T, H, D).permute(0, 2, 1, 3, 4)
        return o_s + o_t
    return op


def runnable(fn: Callable, inputs) -> bool:
    """Whether fn runs on these inputs, forward and backward (an SDPA backend refuses what it cannot take)."""
    try:
        fwd_bwd(fn, inputs, torch.randn_like(fn(*inputs)))()
        return True
    except (RuntimeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------------------------------------

def timed_rows(ctx, ops: Dict[str, Tuple[Callable, list, float]], references: Dict[str, str],
               forward_references: Tuple[str, ...] = ()) -> List[dict]:
    """ops: label -> (fn, inputs, forward FLOPs); references: column suffix -> the label compared with. The
    forwards of all ops are timed in one comparison, their forward+backward steps in another; one row per op with
    its medians, on a GPU its TFLOP/s and peak memory, and for each reference its ``fwdbwd_vs_<suffix>`` speedup
    (median and p10-p90 of the per-round ratios; None over itself), and ``fwd_vs_<suffix>`` for the suffixes in
    `forward_references` (all when empty). At --smoke size the forwards are not timed apart."""
    steps = {label: fwd_bwd(fn, inputs, torch.randn_like(fn(*inputs))) for label, (fn, inputs, _) in ops.items()}
    # at --smoke size only the forward+backward comparison: it runs every code path, in half the time
    forwards = {label: partial(fn, *inputs) for label, (fn, inputs, _) in ops.items()}
    forward = None if ctx.smoke else ctx.compare(forwards)
    both = ctx.compare(steps)
    rows = []
    for label, (_, _, flops_fwd) in ops.items():
        fwdbwd_ms = both.ms[label]
        row = {"impl": label, "fwd_ms": None if forward is None else forward.ms[label], "fwdbwd_ms": fwdbwd_ms}
        if ctx.on_gpu:
            row.update(fwd_tflops=flops_fwd / row["fwd_ms"] * 1e-9, fwdbwd_tflops=3.5 * flops_fwd / fwdbwd_ms * 1e-9,
                       peak_mb=ctx.peak_memory_mb(steps[label]))
        for suffix, reference in references.items():
            if reference not in ops:
                continue
            for kind, comparison in (("fwd", forward), ("fwdbwd", both)):
                if comparison is None or (kind == "fwd" and forward_references and suffix not in forward_references):
                    continue
                name = f"{kind}_vs_{suffix}"
                if reference == label:
                    row.update(dict.fromkeys((name, f"{name}_p10", f"{name}_p90")))
                else:
                    row.update(comparison.speedup(label, over=reference).columns(name))
        rows.append(row)
    return rows


def with_floor(row: dict, floors) -> dict:
    """The row with its floor (forward, forward+backward) and the share of it reached."""
    fwd_floor, fwdbwd_floor = (op_floor_ms(floors, backward=backward) for backward in (False, True))
    row.update(floor_fwd_ms=fwd_floor, floor_fwdbwd_ms=fwdbwd_floor, fwd_of_floor=fwd_floor / row["fwd_ms"],
               fwdbwd_of_floor=fwdbwd_floor / row["fwdbwd_ms"])
    return row


def branch_rows(ctx, branch: str, inputs, flops: float, backends: List[str]) -> List[dict]:
    """The spatial or temporal branch alone: SDPA under each backend and its default, pychop's paths."""
    sdpa_inputs = spatial_views(*inputs) if branch == "spatial" else [
        x.detach().permute(0, 2, 3, 1, 4).flatten(0, 1).requires_grad_() for x in inputs]
    ops = {"sdpa default": (F.scaled_dot_product_attention, sdpa_inputs, flops)}
    for name in SDPA_BACKENDS[ctx.device.type]:
        if runnable(sdpa_under(name), sdpa_inputs):
            ops[f"sdpa {name.split('_')[0].lower()}"] = (sdpa_under(name), sdpa_inputs, flops)
    for backend in backends:
        if branch == "temporal":
            ops[f"{backend} kernel"] = (partial(pychop.temporal_attention, backend=backend), inputs, flops)
            continue
        for path in SPATIAL_PATHS if backend == backends[0] else ("kernel",):  # one sdpa row: it is one call
            alone = partial(pychop.spatial_attention, backend=backend, spatial_path=path)
            if path == "kernel" or runnable(alone, inputs):
                ops[f"{backend} {path}"] = (alone, inputs, flops)
    rows = timed_rows(ctx, ops, {"sdpa": "sdpa default"})
    if ctx.on_gpu:
        B, T, S, H, D = inputs[0].shape
        for row in rows:
            path = row["impl"].split()[-1]
            if branch == "temporal" and path == "kernel":
                with_floor(row, kernel_floors((B, T, S, H, D), spatial=False))
            elif branch == "spatial" and path == "kernel":
                with_floor(row, kernel_floors((B, T, S, H, D), temporal=False))
            elif branch == "spatial" and path == "sdpa":  # alone: no pass combines it with the temporal branch
                with_floor(row, [floor for floor in spatial_path_floors((B, T, S, H, D), "sdpa", stacked=True)
                                 if floor.kernel not in ("sdpa_combine", "sdpa_spatial_backward_layout")])
    return [{"comparison": branch, **row} for row in rows]


def fastest_sdpa(rows: List[dict]) -> Optional[str]:
    """The SDPA backend (SDPBackend name) of the fastest forward+backward ``sdpa <backend>`` row."""
    timed = [row for row in rows if row["impl"].startswith("sdpa ") and row["impl"] != "sdpa default"]
    if not timed:
        return None
    fastest = min(timed, key=lambda row: row["fwdbwd_ms"])["impl"].split()[1]
    return next(name for name in SDPBackend.__members__ if name.split("_")[0].lower() == fastest)


def op_rows(ctx, inputs, flops: float, backends: List[str], best: Dict[str, Optional[str]]) -> List[dict]:
    """The parallel op: the two references, the torch backend, each fused backend on each spatial path."""
    ops = {REFERENCES["diffusers"]: (unfused(F.scaled_dot_product_attention, F.scaled_dot_product_attention), inputs,
                                     flops),
           REFERENCES["best"]: (unfused(sdpa_under(best["spatial"]), sdpa_under(best["temporal"])), inputs, flops),
           REFERENCES["torch"]: (partial(pychop.parallel_st_attention, backend="torch"), inputs, flops)}
    for backend in backends:
        for path in SPATIAL_PATHS:
            fused = partial(pychop.parallel_st_attention, backend=backend, spatial_path=path)
            if path == "kernel" or runnable(fused, inputs):
                ops[f"{backend} {path}"] = (fused, inputs, flops)
    rows = timed_rows(ctx, ops, REFERENCES, forward_references=("diffusers", "best"))
    best_names = {branch: (name or "default").split("_")[0].lower() for branch, name in best.items()}
    for row in rows:
        if row["impl"] == REFERENCES["best"]:
            row["impl"] += f" ({best_names['spatial']} + {best_names['temporal']})"
        if ctx.on_gpu and row["impl"].split()[-1] in SPATIAL_PATHS:
            shape = tuple(inputs[0].shape)
            with_floor(row, kernel_floors(shape, spatial=False) + spatial_path_floors(shape, row["impl"].split()[-1]))
    return [{"comparison": "op", **row} for row in rows]


def auto_row(ctx, inputs) -> dict:
    """``backend="auto"`` against the torch backend, forward+backward, in a comparison of their own (two
    candidates: more rounds in a budget than the op's comparison gives), and what auto takes at this shape."""
    dout = torch.randn_like(inputs[0])
    both = ctx.compare({"auto": fwd_bwd(partial(pychop.parallel_st_attention, backend="auto"), inputs, dout),
                        REFERENCES["torch"]: fwd_bwd(partial(pychop.parallel_st_attention, backend="torch"), inputs,
                                                     dout)})
    speedup = both.speedup("auto", over=REFERENCES["torch"])
    return {"comparison": "auto", "impl": "auto", "takes": auto_takes(ctx.device, inputs),
            "fwdbwd_ms": both.ms["auto"], "torch_fwdbwd_ms": both.ms[REFERENCES["torch"]],
            **speedup.columns("fwdbwd_vs_torch"), "rounds": both.rounds,
            "no_slower": speedup.p10 >= AUTO_NO_SLOWER_P10}


def shape_rows(ctx, dtype):
    shapes = SMOKE_SHAPES if ctx.smoke else GPU_SHAPES if ctx.on_gpu else CPU_SHAPES
    rows = []
    for shape_name in ctx.progress(shapes, "attention shapes"):
        B, T, S, H, D = shapes[shape_name]
        inputs = [torch.randn(B, T, S, H, D, device=ctx.device, dtype=dtype, requires_grad=True) for _ in range(6)]
        backends = fused_backends(ctx)
        found = branch_rows(ctx, "spatial", inputs[:3], attention_flops(B, T, S, H, D, temporal=False), backends)
        found += branch_rows(ctx, "temporal", inputs[3:], attention_flops(B, T, S, H, D, spatial=False), backends)
        best = {branch: fastest_sdpa([row for row in found if row["comparison"] == branch])
                for branch in ("spatial", "temporal")}
        found += op_rows(ctx, inputs, attention_flops(B, T, S, H, D), backends, best)
        found.append(auto_row(ctx, inputs))
        if ctx.on_gpu and "triton" in backends:
            floors = kernel_floors((B, T, S, H, D), itemsize=dtype.itemsize)
            triton_kernel_path = partial(pychop.parallel_st_attention, backend="triton", spatial_path="kernel")
            found += [{"comparison": "kernels", **row} for row in
                      kernel_rows(floors, fwd_bwd(triton_kernel_path, inputs, torch.randn_like(inputs[0])))]
        shaped = [{"shape": shape_name, "B,T,S,H,D": f"{B},{T},{S},{H},{D}", **row} for row in found]
        for table in tables(shaped):  # as each shape ends: a run cut off keeps in its log what it measured
            ctx.print_rows(table.rows, table.title)
        rows += shaped
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
    """One row per Triton kernel of the fused op on its kernel path (`step` runs it): its GPU time per call
    (profiler) over its floor."""
    names = [f"_{floor.kernel}_kernel" for floor in floors]
    times = kernel_times_ms(step, names)
    return [{"impl": "triton kernel", "kernel": floor.kernel, "kernel_ms": times[name], "floor_ms": floor.floor_ms,
             "bound": floor.bound, "of_floor": floor.floor_ms / times[name] if times[name] else None}
            for floor, name in zip(floors, names)]


def run(ctx):
    return shape_rows(ctx, torch.bfloat16 if ctx.on_gpu else torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Output: one table per comparison, no empty columns (printed as the suite runs; Markdown for the docs).
# ----------------------------------------------------------------------------------------------------------

TITLES = {"spatial": "spatial branch alone (speedup over SDPA's default)",
          "temporal": "temporal branch alone (speedup over SDPA's default)",
          "op": "parallel op (speedups over diffusers' default, the best unfused composition, the torch backend)",
          "auto": f"auto against the torch backend, forward+backward (no_slower: p10 >= {AUTO_NO_SLOWER_P10})",
          "kernels": "Triton kernels on the kernel path, time over floor (profiler)"}


def groups(rows: List[dict]):
    """(title, rows without their empty and constant columns) per comparison and shape, in order."""
    keys = list(dict.fromkeys((row.get("shape"), row["comparison"]) for row in rows if "comparison" in row))
    for shape, comparison in keys:
        members = [{key: value for key, value in row.items() if key not in ("comparison", "shape")}
                   for row in rows if row.get("shape") == shape and row.get("comparison") == comparison]
        size = members[0].pop("B,T,S,H,D", None)
        for member in members[1:]:
            member.pop("B,T,S,H,D", None)
        columns = [key for key in dict.fromkeys(k for member in members for k in member)
                   if any(member.get(key) is not None for member in members)]
        yield (f"{shape} ({size}): {TITLES[comparison]}",
               [{key: member.get(key) for key in columns} for member in members])


def tables(rows: List[dict]) -> List[Table]:
    """The rows as tables, one per comparison and shape."""
    return [Table(title, members) for title, members in groups(rows)]


def report(result: dict) -> str:
    """Markdown for docs/benchmarks.md from the suite's JSON: one table per comparison and shape, ratios as
    median (p10-p90 of the per-round ratios)."""
    out = [markdown(table) for table in tables(result["rows"])]
    auto = [row for row in result["rows"] if row.get("comparison") == "auto"]
    if auto:
        verdict = "no slower than" if all(row["no_slower"] for row in auto) else "SLOWER than"
        out.append(f"auto is {verdict} the torch backend at every shape (p10 of the forward+backward speedup >= "
                   f"{AUTO_NO_SLOWER_P10}).")
    return "\n\n".join(out)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shaped = [row for row in rows if row.get("comparison") == "op"]
    shapes = list(dict.fromkeys(row["shape"] for row in shaped))
    impls = list(dict.fromkeys(row["impl"] for row in shaped))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4))
    for ax, key in zip(axes, ("fwd_ms", "fwdbwd_ms")):
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            values = [next((r[key] or 0 for r in shaped if r["shape"] == s and r["impl"] == impl), 0) for s in shapes]
            ax.bar([x + i * width for x in range(len(shapes))], values, width, label=impl)
        if not any(row[key] for row in shaped):
            ax.text(0.5, 0.5, "not timed apart at --smoke size", transform=ax.transAxes, ha="center")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))], shapes)
        ax.set_ylabel("ms (median)")
        ax.set_title(key.replace("_ms", "").replace("fwdbwd", "forward + backward").replace("fwd", "forward"))
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
