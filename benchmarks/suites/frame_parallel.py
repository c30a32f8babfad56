"""Suite `frame_parallel`: a VideoUNet training step with its frames sharded over P gloo processes on the CPU
(``pychop.distributed.shard_frames``).

Per form (``parallel``: Mobius blocks on the fused backend, ``backend="auto"``; ``serial``: the diffusers-style
blocks) and per P in 1, 2, 4, every rank builds the same model (spatial layers frozen, float32), shards the frames
of one video (``CONFIG``: the mobius suite's CPU_CONFIG at 16 frames; smoke: TINY at 4) and reports:

- ``saved``: the bytes autograd saves for backward in one forward on this rank (storages counted once,
  parameters and buffers left out, as the mobius suite counts), the largest over the ranks; ``x_of_1/P`` is
  P * saved(P) / saved(1): 1.00 is exactly 1/P of one process's.
- ``traffic``: the bytes each rank sent to the others in one step (forward and backward) through the
  all-to-alls, measured at ``torch.distributed.all_to_all_single``, mean over the ranks, against the count from
  the layers' shapes (``benchmarks.frame_scaling.traffic``); ``reduced_kb``: the payload of the small
  all-reduces and gathers (GroupNorm statistics, frame counts).
- ``time``: the median of the step time (forward, backward, SGD step) over the steps, each step's time the
  slowest rank's, with its p10-p90, at P = 1 and 2, the parallel form only. Informational: gloo over loopback on
  a shared CPU, one thread per process; it says nothing of GPUs (the suite ``frame_scaling_prediction`` predicts
  NVLink GPUs).
  These times come from the processes' own clocks, not from ``ctx.compare`` (one step spans several processes).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import defaultdict
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pychop
from benchmarks.frame_scaling import sharded_layers, traffic
from benchmarks.processes import run_ranks
from benchmarks.suites.mobius import CPU_CONFIG, saved_tensor_account
from pychop.distributed import local_frames, shard_frames
from pychop.models import TINY, VideoUNet

DESCRIPTION = "frames sharded over P gloo processes: saved bytes per rank, bytes sent, step time (CPU)"

CONFIG = dataclasses.replace(CPU_CONFIG, num_frames=16)
SMOKE_CONFIG = dataclasses.replace(TINY, num_frames=4)
FORMS = (("parallel", "auto"), ("serial", "torch"))  # (st_mode, attention backend; serial blocks use SDPA)
TIMED_RANKS, TIMED_FORM = (1, 2), "parallel"


def _counting_collectives(sent, reduced):
    """Patches of torch.distributed's collectives that add the bytes this rank sends to ``sent`` (all-to-alls)
    and the payload of the others to ``reduced``."""
    all_to_all, all_reduce, all_gather = dist.all_to_all_single, dist.all_reduce, dist.all_gather

    def counted_all_to_all(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kwargs):
        splits = input_split_sizes or [input.numel() // dist.get_world_size(group)] * dist.get_world_size(group)
        sent[0] += (sum(splits) - splits[dist.get_rank(group)]) * input.element_size()
        return all_to_all(output, input, output_split_sizes, input_split_sizes, group=group, **kwargs)

    def counted_all_reduce(tensor, *args, **kwargs):
        reduced[0] += tensor.numel() * tensor.element_size()
        return all_reduce(tensor, *args, **kwargs)

    def counted_all_gather(tensors, tensor, *args, **kwargs):
        reduced[0] += tensor.numel() * tensor.element_size()
        return all_gather(tensors, tensor, *args, **kwargs)

    return [mock.patch.object(dist, "all_to_all_single", counted_all_to_all),
            mock.patch.object(dist, "all_reduce", counted_all_reduce),
            mock.patch.object(dist, "all_gather", counted_all_gather)]


def _worker(rank, config, st_mode, backend, steps):
    """One rank's measurements of one form (see the module docstring)."""
    group = dist.group.WORLD
    ranks = dist.get_world_size()
    torch.manual_seed(0)
    model = VideoUNet(config, st_mode, backend=backend).freeze_spatial()
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, config.num_frames, config.in_channels, *config.latent_size, generator=generator)
    text = torch.randn(1, config.text_length, config.text_dim, generator=generator)
    timestep = torch.tensor([500])
    target = torch.randn(sample.shape, generator=generator)
    if ranks > 1:
        shard_frames(model, group)
        sample, target = local_frames(sample, group, 1), local_frames(target, group, 1)
    inputs = (sample, timestep, text)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(model(*inputs), target).backward()
        optimizer.step()

    result = {"saved_bytes": sum(saved_tensor_account(model, inputs)[0].values()) * 2 ** 20}
    sent, reduced = [0], [0]
    patches = _counting_collectives(sent, reduced)
    for patch in patches:
        patch.start()
    try:
        step()
    finally:
        for patch in patches:
            patch.stop()
    result.update(sent=sent[0], reduced=reduced[0],
                  model=sum(traffic(sharded_layers(model, inputs), ranks, rank, sample.element_size()).values()))
    if steps:
        times = []
        for _ in range(steps + 1):  # the first is a warm-up
            dist.barrier()
            start = time.perf_counter()
            step()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.append(elapsed.item() * 1e3)
        result["step_ms"] = times[1:]
    return result


def _quantile(values, q):
    return statistics.quantiles(values, n=10, method="inclusive")[int(q * 10) - 1] if len(values) > 1 else values[0]


def run(ctx):
    config, config_name = (SMOKE_CONFIG, "TINY, 4 frames") if ctx.smoke else (CONFIG, "CPU_CONFIG, 16 frames")
    all_ranks = (1, 2) if ctx.smoke else (1, 2, 4)
    steps = 3 if ctx.smoke else (3 if ctx.quick else 5)
    rows, saved_one = [], {}
    measured = defaultdict(dict)
    for (st_mode, backend), ranks in ctx.progress([(f, p) for f in FORMS for p in all_ranks], "frame_parallel"):
        timed = steps if ranks in TIMED_RANKS and st_mode == TIMED_FORM else 0
        results = run_ranks(_worker, config, st_mode, backend, timed, world=ranks, timeout=1800)
        for rank, result in results:
            if not isinstance(result, dict):
                raise RuntimeError(f"rank {rank} of {ranks} failed:\n{result}")
        measured[st_mode][ranks] = [result for _, result in results]
    for st_mode, backend in FORMS:
        saved_one = max(r["saved_bytes"] for r in measured[st_mode][1])
        for ranks, results in measured[st_mode].items():
            attention = "sdpa" if st_mode == "serial" else pychop.ops.backends.resolve(backend, ctx.device)
            base = {"form": st_mode, "attention": attention, "config": config_name, "ranks": ranks}
            saved = max(r["saved_bytes"] for r in results)
            rows.append({"table": "saved", **base, "saved_mb": saved / 2 ** 20, "x_of_1/P": saved * ranks / saved_one})
            if ranks > 1:
                sent = statistics.mean(r["sent"] for r in results)
                model = statistics.mean(r["model"] for r in results)
                rows.append({"table": "traffic", **base, "sent_mb": sent / 2 ** 20, "model_mb": model / 2 ** 20,
                             "sent_vs_model": sent / model,
                             "reduced_kb": statistics.mean(r["reduced"] for r in results) / 2 ** 10})
            if "step_ms" in results[0]:
                times = results[0]["step_ms"]  # every rank holds the per-step maxima
                rows.append({"table": "time", **base, "step_ms": statistics.median(times),
                             "p10_ms": _quantile(times, 0.1), "p90_ms": _quantile(times, 0.9)})
    return rows


def _table(header, rows, cells):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def report(result: dict) -> str:
    """Markdown for docs/benchmarks.md from this suite's JSON: saved bytes, traffic and (informational) times."""
    rows = result["rows"]
    by_table = defaultdict(list)
    for row in rows:
        by_table[row["table"]].append(row)
    parts = [f"Frame-parallel VideoUNet ({rows[0]['config']}, float32, spatial layers frozen), gloo on the CPU."]
    parts.append("Saved for backward per rank (largest over the ranks); x of 1/P = P x saved(P) / saved(1):\n\n" +
                 _table(["form", "attention", "P", "saved MiB", "x of 1/P"], by_table["saved"], lambda r: [
                     r["form"], r["attention"], str(r["ranks"]), f"{r['saved_mb']:.1f}", f"{r['x_of_1/P']:.3f}"]))
    parts.append("Bytes sent per rank and step (forward and backward, mean over the ranks), measured against the "
                 "count from the layers' shapes:\n\n" +
                 _table(["form", "P", "sent MiB", "model MiB", "sent / model", "reductions KiB"], by_table["traffic"],
                        lambda r: [r["form"], str(r["ranks"]), f"{r['sent_mb']:.2f}", f"{r['model_mb']:.2f}",
                                   f"{r['sent_vs_model']:.3f}", f"{r['reduced_kb']:.1f}"]))
    parts.append("Step time, slowest rank, median over steps (p10-p90); informational only: gloo over loopback on a "
                 "shared CPU says nothing of GPUs:\n\n" +
                 _table(["form", "P", "step ms"], by_table["time"], lambda r: [
                     r["form"], str(r["ranks"]),
                     f"{r['step_ms']:.0f} ({r['p10_ms']:.0f}-{r['p90_ms']:.0f})"]))
    return "\n\n".join(parts) + "\n"
