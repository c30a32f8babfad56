"""The communication of a frame-sharded VideoUNet step, counted from its layers, and the predicted step time on
GPUs linked by NVLink.

    python -m benchmarks.frame_scaling [--frames 64 128] [--ranks 8] [--gpu h100|h200] [--link-gbps 450]
                                       [--latency-us 10]

Traffic per rank and training step (forward and backward), at P ranks, from the sharded layers' local shapes
(``sharded_layers``): each spatial-temporal attention with E = B * T_r * S * C local elements moves 4E(P-1)/P in
the forward (q, k, v to sequence shards, the output back) and as much in the backward
(``pychop.ops.frame_parallel``); each temporal convolution sends one frame of (B, C, H, W) to each neighbouring
rank, forward and backward; GroupNorm statistics are a few numbers. ``traffic`` computes these; the
``frame_parallel`` suite holds them against the bytes the collectives actually sent.

The prediction (``predict``), on paper, for pychop's ``VideoUNet`` (``SD15_VIDEO`` by default, parallel form,
spatial layers frozen, bf16, batch 1):

- compute: the matmul and convolution FLOPs of one step at the local frame count (counted by
  ``torch.utils.flop_counter`` on fake tensors, the attention left out) at the GPU's matmul ceiling, plus the
  attention kernels' floors (``benchmarks.floors``: spatial at the local frames, temporal at the local sequence
  chunk over all frames). A floor: elementwise layers and kernel efficiency are not counted.
- communication: the traffic above at ``link_gbps`` GB/s each way per GPU (NVLink 4 of H100/H200 SXM: 900 GB/s
  bidirectional, 450 GB/s each way; all-to-all through NVSwitch), plus ``latency_us`` per collective.
- overlap: the all-to-all of q, k, v (forward) and of their gradients (backward) hides behind the spatial
  branch's kernels of the same layer; the output's all-to-alls, halos and norms are exposed.

``scaling_rows`` gives the one-GPU and the P-GPU prediction per frame count, ``markdown_rows`` their table; the
suite ``frame_scaling_prediction`` (``python -m benchmarks --suite frame_scaling_prediction``) writes them for
both GPUs into a result file, from which docs/benchmarks.md shows them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Dict, List, Sequence, Tuple
from unittest import mock

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import pychop
from benchmarks.floors import GPUS, kernel_floors
from benchmarks.tables import markdown_table
from pychop.models import SD15_VIDEO, VideoUNet, VideoUNetConfig
from pychop.nn import ParallelSTBlock, SerialSTBlock, TemporalConv

NVLINK4_EACH_WAY_GBPS = 450.0  # H100 / H200 SXM: 18 NVLink 4 links, 900 GB/s bidirectional per GPU
Layer = Tuple[str, Tuple[int, ...]]  # ("attention", (B, T, S, H, D)) or ("temporal_conv", (B, T, C, H, W))


def sharded_layers(model: nn.Module, inputs) -> List[Layer]:
    """The layers that mix frames, in call order, with the shapes they see in one forward of ``model(*inputs)``:
    each spatial-temporal attention block's (B, T, S, H, D) and each temporal convolution's (B, T, C, H, W)."""
    found, handles = [], []

    def attention(block, args):
        B, T, S, C = args[0].shape
        found.append(("attention", (B, T, S, block.heads, C // block.heads)))

    def convolution(_, args):
        frames, C, H, W = args[0].shape
        found.append(("temporal_conv", (frames // args[1], args[1], C, H, W)))

    for module in model.modules():
        if isinstance(module, (SerialSTBlock, ParallelSTBlock)):
            handles.append(module.register_forward_pre_hook(attention))
        elif isinstance(module, TemporalConv):
            handles.append(module.register_forward_pre_hook(convolution))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return found


def traffic(layers: List[Layer], ranks: int, rank: int, itemsize: int) -> Dict[str, float]:
    """Bytes rank ``rank`` of ``ranks`` sends in one step (forward and backward) through each kind of layer,
    ``layers`` at this rank's local shapes, sequences and frames splitting evenly."""
    neighbours = (rank > 0) + (rank < ranks - 1)
    sent = {"attention": 0.0, "temporal_conv": 0.0}
    for kind, shape in layers:
        if kind == "attention":
            sent[kind] += 8 * torch.Size(shape).numel() * (ranks - 1) / ranks * itemsize
        else:
            B, _, C, H, W = shape
            sent[kind] += 2 * neighbours * B * C * H * W * itemsize
    return sent


def collectives(layers: List[Layer]) -> int:
    """Collectives per step: 4 per layer (an attention's 2 all-to-alls each way; a temporal convolution's norm
    reduction and halo each way) and the frame-count gather of the forward."""
    return 4 * len(layers) + 1


def _attention_without_flops(q_s, k_s, v_s, q_t, k_t, v_t, **options):
    """Stands for ``pychop.parallel_st_attention(..., combine="stack")`` while FLOPs are counted: the right shape
    and gradient paths, no matmul (the attention is costed by its kernels' floors instead)."""
    return torch.stack([q_s + k_s + v_s, q_t + k_t + v_t], dim=3)


@functools.lru_cache(maxsize=None)  # the same for every GPU: counted once per shape
def step_flops(config: VideoUNetConfig, frames: int, batch: int = 1) -> float:
    """Matmul and convolution FLOPs of one training step (forward, backward; spatial layers frozen) of the
    parallel VideoUNet at ``frames`` frames, attention excluded; counted on fake tensors (no memory, no compute)."""
    config = dataclasses.replace(config, num_frames=frames)
    counter = FlopCounterMode(display=False)
    with FakeTensorMode():
        model = VideoUNet(config, "parallel", backend="torch").freeze_spatial()  # FLOPs do not depend on the dtype
        sample, timestep, text = model.example_inputs(batch)
        with mock.patch.object(pychop, "parallel_st_attention", _attention_without_flops), counter:
            model(sample, timestep, text).float().square().mean().backward()
    return float(counter.get_total_flops())


def predict(config: VideoUNetConfig = SD15_VIDEO, frames: int = 64, ranks: int = 8, gpu: str = "h200",
            link_gbps: float = NVLINK4_EACH_WAY_GBPS, latency_us: float = 10.0, batch: int = 1) -> dict:
    """Predicted step time (ms) of a frame-sharded training step at ``ranks`` GPUs and its communication share;
    see the module docstring. Frames and the attention's sequences split evenly."""
    if frames % ranks:
        raise ValueError(f"frames ({frames}) must be divisible by ranks ({ranks})")
    ceilings, itemsize, local = GPUS[gpu], 2, frames // ranks
    with FakeTensorMode():  # shapes only, no memory
        model = VideoUNet(dataclasses.replace(config, num_frames=local), "parallel", backend="torch")
        layers = sharded_layers(model, model.example_inputs(batch))  # at the local frame count
    compute_ms = step_flops(config, local, batch) / (ceilings.matmul_tflops * 1e9)
    hidden_ms = exposed_ms = attention_ms = 0.0
    link = link_gbps * 1e6  # bytes per ms
    for kind, shape in layers:
        if kind == "attention":
            B, T_r, S, H, D = shape
            spatial = kernel_floors(shape, temporal=False, gpu=ceilings)
            temporal = kernel_floors((B, frames, S // ranks, H, D), spatial=False, gpu=ceilings)
            forward_s = sum(f.floor_ms for f in spatial if "backward" not in f.kernel)
            backward_s = sum(f.floor_ms for f in spatial if "backward" in f.kernel)
            attention_ms += forward_s + backward_s + sum(f.floor_ms for f in temporal)
            moved = torch.Size(shape).numel() * (ranks - 1) / ranks * itemsize / link  # one tensor's all-to-all
            # q, k, v (3 tensors) behind the spatial forward; dq, dk, dv behind the spatial backward
            exposed_ms += max(0.0, 3 * moved - forward_s) + max(0.0, 3 * moved - backward_s) + 2 * moved
            hidden_ms += min(3 * moved, forward_s) + min(3 * moved, backward_s)
        else:  # a frame to each neighbour (an interior rank's two), forward and backward
            B, _, C, H, W = shape
            exposed_ms += 2 * min(2, ranks - 1) * B * C * H * W * itemsize / link
    latency_ms = collectives(layers) * latency_us / 1e3 if ranks > 1 else 0.0
    exposed_ms += latency_ms
    sent = sum(traffic(layers, ranks, ranks // 2, itemsize).values())  # an interior rank
    step_ms = compute_ms + attention_ms + exposed_ms
    return {"frames": frames, "ranks": ranks, "gpu": ceilings.name, "link_GBps": link_gbps,
            "latency_us": latency_us, "compute_ms": compute_ms, "attention_ms": attention_ms,
            "comm_hidden_ms": hidden_ms, "comm_exposed_ms": exposed_ms, "latency_ms": latency_ms, "step_ms": step_ms,
            "comm_share": exposed_ms / step_ms, "sent_GB": sent / 1e9,
            "collectives": collectives(layers) if ranks > 1 else 0}


def scaling_rows(gpu: str, frames: Sequence[int] = (64, 128), ranks: int = 8, config: VideoUNetConfig = SD15_VIDEO,
                 link_gbps: float = NVLINK4_EACH_WAY_GBPS, latency_us: float = 10.0) -> List[dict]:
    """Per frame count in ``frames``: ``predict`` on one GPU (the same model on all frames, as if it fitted) and on
    ``ranks`` GPUs, each row with ``speed_up``, the one-GPU step time over its own."""
    rows = []
    for count in frames:
        one = predict(config, count, 1, gpu, link_gbps, latency_us)
        for row in (one, predict(config, count, ranks, gpu, link_gbps, latency_us)):
            rows.append({**row, "speed_up": one["step_ms"] / row["step_ms"]})
    return rows


def markdown_rows(rows: Sequence[dict]) -> str:
    """``scaling_rows`` as a Markdown table (times in ms, the bytes one GPU sends in GB)."""
    return markdown_table([{
        "frames": str(r["frames"]), "GPUs": str(r["ranks"]), "frames per GPU": str(r["frames"] // r["ranks"]),
        "compute ms": f"{r['compute_ms']:.1f}", "attention ms": f"{r['attention_ms']:.1f}",
        "comm hidden ms": f"{r['comm_hidden_ms']:.1f}", "comm exposed ms": f"{r['comm_exposed_ms']:.1f}",
        "of which latency ms": f"{r['latency_ms']:.1f}", "step ms": f"{r['step_ms']:.1f}",
        "comm share": f"{100 * r['comm_share']:.1f}%", "sent per GPU GB": f"{r['sent_GB']:.2f}",
        "collectives": str(r["collectives"]), "speed-up": f"{r['speed_up']:.2f}x"} for r in rows])


def title(rows: Sequence[dict], config_name: str) -> str:
    """What ``rows`` predict, in one line: the model, the GPUs, the link."""
    first, ranks = rows[0], max(r["ranks"] for r in rows)
    return (f"VideoUNet {config_name} (parallel form, spatial frozen), bf16, batch 1, {ranks} x {first['gpu']}, "
            f"link {first['link_GBps']:g} GB/s each way, {first['latency_us']:g} us per collective")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frame_scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--gpu", default="h200", choices=sorted(GPUS))
    parser.add_argument("--link-gbps", type=float, default=NVLINK4_EACH_WAY_GBPS,
                        help="GB/s each way per GPU (default: NVLink 4, 450)")
    parser.add_argument("--latency-us", type=float, default=10.0, help="assumed latency of one collective")
    args = parser.parse_args(argv)
    rows = scaling_rows(args.gpu, args.frames, args.ranks, link_gbps=args.link_gbps, latency_us=args.latency_us)
    print(title(rows, "SD15_VIDEO"))
    print(markdown_rows(rows))


if __name__ == "__main__":
    main()
