"""Suite `frame_scaling_prediction`: the predicted step time of a frame-sharded VideoUNet on 8 GPUs linked by
NVLink (``benchmarks.frame_scaling``), for each GPU ``benchmarks.floors`` knows, at 64 and 128 frames.

Arithmetic, not a measurement: FLOPs counted on fake tensors, bytes from the layers' shapes, times at the GPU's
ceilings and the link's bandwidth (the model is in ``benchmarks.frame_scaling``'s docstring). It runs on any
machine, in under a minute on a CPU, and gives the same figures everywhere; the result file records where and
when it was computed. Smoke: ``TINY`` at 4 frames on 2 GPUs.
"""

from __future__ import annotations

from typing import List

from benchmarks.floors import GPUS
from benchmarks.frame_scaling import markdown_rows, scaling_rows, title
from benchmarks.tables import Table
from pychop.models import SD15_VIDEO, TINY

DESCRIPTION = "predicted frame-parallel VideoUNet step on 8 NVLink GPUs (arithmetic, no GPU needed)"


def run(ctx) -> List[dict]:
    config, name, frames, ranks = (TINY, "TINY", (4,), 2) if ctx.smoke else (SD15_VIDEO, "SD15_VIDEO", (64, 128), 8)
    rows = []
    for gpu in ctx.progress(sorted(GPUS, reverse=True), "frame_scaling_prediction"):
        rows += [{"config": name, **row} for row in scaling_rows(gpu, frames, ranks, config)]
    return rows


def by_gpu(rows: List[dict]) -> List[List[dict]]:
    """The rows of each GPU, in the order they came."""
    groups = {}
    for row in rows:
        groups.setdefault(row["gpu"], []).append(row)
    return list(groups.values())


def tables(rows: List[dict]) -> List[Table]:
    return [Table(title(group, group[0]["config"]), group) for group in by_gpu(rows)]


def report(result: dict) -> str:
    """Markdown for docs/benchmarks.md: what is predicted and how, then a table per GPU."""
    groups = by_gpu(result["rows"])
    first = groups[0][0]
    parts = [
        f"A prediction, not a measurement: pychop's `VideoUNet` at `{first['config']}` (parallel form, spatial layers "
        f"frozen, bf16, batch 1) with its frames sharded over {max(r['ranks'] for r in groups[0])} GPUs "
        "(`pychop.distributed.shard_frames`), linked by NVLink 4 as on H100 / H200 SXM (all-to-all through "
        f"NVSwitch), used at {first['link_GBps']:g} GB/s each way per GPU, with an assumed {first['latency_us']:g} us "
        "per collective. Compute: the step's matmul and convolution FLOPs (counted by `torch.utils.flop_counter` on "
        "fake tensors, the attention left out) at `benchmarks/floors.py`'s matmul ceiling, plus the attention "
        "kernels' floors from the same model (spatial at the local frames, temporal at the local sequence chunk "
        "over all frames). Communication: the bytes counted from the layers' shapes (`benchmarks.frame_scaling."
        "traffic`, which the `frame_parallel` suite holds against the bytes gloo actually sent); the q, k, v "
        "all-to-all and its backward hide behind the spatial branch's kernels of the same layer, the rest is "
        "exposed. Computed on the machine named above; no GPU is involved.",
    ]
    for group in groups:
        parts.append(f"{title(group, group[0]['config'])}:\n\n{markdown_rows(group)}")
    parts.append("The one-GPU rows are the same model on all frames, as if it fitted. The compute figures are floors "
                 "(every matmul at the ceiling, elementwise layers free); real steps take longer, so the real "
                 "communication share is smaller than this one, most of whose exposed time is the assumed "
                 "per-collective latency (\"of which latency\"), not bandwidth.")
    return "\n\n".join(parts)
