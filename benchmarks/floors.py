"""Floors of the Triton attention kernels: each kernel's matmul FLOPs, the fewest bytes it must move (every
input it reads once, every output written once) and the time those take at a GPU's ceilings.

    python -m benchmarks.floors [--causal] [--dtype bfloat16|float16|float32] [--gpu h200|h100]

The shapes A-F (``DESIGN_SHAPES``, printed first with what each stands for) are the attention calls every GPU
benchmark and GPU test of pychop uses, bf16: (B, T, S, H, D) = batch, frames, tokens per frame (the latent
grid's height x width), heads, head dim, as in the attention layers of Stable-Diffusion-family video UNets.
Also the floors of the spatial branch on its SDPA path (``sdpa_spatial_floors``) and where they cross the Triton
kernels' (``sdpa_from_tokens``), the GPU rule of ``spatial_path="auto"``.

A kernel's floor is the larger of FLOPs / matmul ceiling and bytes / copy ceiling (the copy ceiling counts
reads and writes). The op's floor is the sum over its kernels. On a GPU the attention suite divides measured
times by these floors. The temporal FLOPs are the useful ones (each token's T x T scores); the temporal kernels
run more on tensor cores (a program's rows hold several tokens, whose cross-token scores are masked), which
stays far below their memory time.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, List, Tuple

# name: (B, T, S, H, D). The shapes every GPU benchmark and GPU test uses (bf16).
DESIGN_SHAPES: Dict[str, Tuple[int, int, int, int, int]] = {
    "A": (1, 16, 64 * 64, 5, 64),
    "B": (2, 16, 32 * 32, 10, 64),
    "C": (1, 32, 64 * 64, 8, 64),
    "D": (1, 16, 32 * 32, 8, 128),
    "E": (4, 64, 16 * 16, 8, 64),
    "F": (2, 16, 32 * 32, 8, 40),
}
# What each shape stands for (a latent grid of h x w is S = h * w tokens; an 8x VAE makes 8h x 8w pixels; SD:
# Stable Diffusion, whose UNets the text-to-video UNets extend).
SHAPE_NOTES: Dict[str, str] = {
    "A": "16 frames of a 64x64 latent grid (512x512 video), 320 channels as 5 heads of 64 (SD 2's first stage)",
    "B": "batch 2, 16 frames of 32x32 latents (256x256 video), 640 channels as 10 heads of 64 (SD 2's second)",
    "C": "32 frames of 64x64 latents, 512 channels as 8 heads of 64: the largest spatial work",
    "D": "16 frames of 32x32 latents, head dim 128 (8 heads, 1024 channels): the largest head dim",
    "E": "batch 4, 64 frames of 16x16 latents: many frames, few tokens (the temporal branch's largest share)",
    "F": "batch 2, 16 frames of 32x32 latents, head dim 40 (8 heads, 320 channels: SD 1.5's first stage)",
}


def describe_shapes() -> str:
    """The shapes A-F as lines: name, (B, T, S, H, D) and what the shape stands for."""
    lines = ["benchmark shapes (B, T, S, H, D): batch, frames, tokens per frame (latent height x width), heads, "
             "head dim"]
    lines += [f"{name:<3}{str(shape):<24}{SHAPE_NOTES[name]}" for name, shape in DESIGN_SHAPES.items()]
    return "\n".join(lines)


@dataclass(frozen=True)
class Ceilings:
    name: str
    matmul_tflops: float  # dense bf16 / fp16 tensor-core matmul
    copy_tbps: float  # device-to-device copy, reads plus writes


GPUS = {
    "h200": Ceilings("H200", 790.0, 4.3),
    "h100": Ceilings("H100 (measured, torch 2.11)", 694.0, 3.0),
}


@dataclass(frozen=True)
class KernelFloor:
    kernel: str
    flops: float
    bytes: float
    compute_ms: float
    memory_ms: float

    @property
    def floor_ms(self) -> float:
        return max(self.compute_ms, self.memory_ms)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_ms >= self.memory_ms else "memory"


def temporal_pairs(T: int, causal: bool, window=None) -> int:
    """(query frame, key frame) pairs one token attends: T^2, T(T+1)/2 causal, fewer with a window."""
    if window is not None:
        return sum(min(t + 1, window) for t in range(T))
    return T * (T + 1) // 2 if causal else T * T


def kernel_floors(shape, *, itemsize: int = 2, causal: bool = False, window=None, spatial: bool = True,
                  temporal: bool = True, stacked: bool = False, gpu: Ceilings = GPUS["h200"]) -> List[KernelFloor]:
    """One KernelFloor per kernel of the Triton backend, forward kernels first, as they run for `shape`."""
    B, T, S, H, D = shape
    rows = B * T * S * H
    tensor = rows * D * itemsize  # one (B, T, S, H, D) tensor
    stats = rows * 4  # one float32 (B, T, H, S) row statistic
    spatial_mm = 2 * B * T * H * S * S * D  # one S x S x D matrix product per frame and head
    temporal_mm = 2 * B * S * H * temporal_pairs(T, causal, window) * D
    summed = spatial and temporal and not stacked

    def floor(name, matmuls, mm, tensors, statistics):
        flops, moved = matmuls * mm, tensors * tensor + statistics * stats
        return KernelFloor(name, flops, moved, flops / (gpu.matmul_tflops * 1e9), moved / (gpu.copy_tbps * 1e9))

    forward, backward = [], []
    if temporal:  # reads q, k, v; writes o_t, lse_t
        forward.append(floor("temporal_forward", 2, temporal_mm, 4, 1))
        # query kernel: QK^T, dP, dQ; reads q, k, v, dO, lse; writes dq, delta
        backward.append(floor("temporal_backward_query", 3, temporal_mm, 5, 2))
        # key kernel: QK^T, dP, dV, dK; reads q, k, v, dO, lse, delta; writes dk, dv
        backward.append(floor("temporal_backward_key", 4, temporal_mm, 6, 2))
    if spatial:  # reads q, k, v (and o_t to add, summed); writes out, lse_s
        forward.append(floor("spatial_forward", 2, spatial_mm, 5 if summed else 4, 1))
        # query kernel: QK^T, dP, dQ (and P K, summed); reads q, k, v, out, dO, lse (and delta_t); writes dq, delta
        backward.append(floor("spatial_backward_query", 4 if summed else 3, spatial_mm, 6, 3 if summed else 2))
        # key kernel: QK^T, dP, dV, dK; reads q, k, v, dO, lse, delta; writes dk, dv
        backward.append(floor("spatial_backward_key", 4, spatial_mm, 6, 2))
    return forward + backward


def sdpa_spatial_floors(shape, *, itemsize: int = 2, summed: bool = True,
                        gpu: Ceilings = GPUS["h200"]) -> List[KernelFloor]:
    """One KernelFloor per kernel of the spatial branch on the SDPA path (``spatial_path="sdpa"``), as
    FlashAttention-2 and cuDNN run it: the forward (2 products), the pass that combines its output with the
    temporal branch's (summed: o_s added to o_t, 3 tensors; stacked: o_s copied into its half, 2), and the backward:
    stacked, o_s and dO_s copied dense first (4 tensors), then delta = rowsum(dO o) (2), the main kernel (5
    products: QK^T, dP, dV, dQ, dK; reads q, k, v, dO, lse, delta, writes dk, dv and dq accumulated in float32)
    and dq's conversion from float32."""
    B, T, S, H, D = shape
    rows = B * T * S * H
    tensor, stats, accumulator = rows * D * itemsize, rows * 4, rows * D * 4
    product = 2 * B * T * H * S * S * D

    def floor(name, matmuls, moved):
        flops = matmuls * product
        return KernelFloor(name, flops, moved, flops / (gpu.matmul_tflops * 1e9), moved / (gpu.copy_tbps * 1e9))

    floors = [floor("sdpa_spatial_forward", 2, 4 * tensor + stats),
              floor("sdpa_combine", 0, (3 if summed else 2) * tensor)]
    if not summed:
        floors.append(floor("sdpa_spatial_backward_layout", 0, 4 * tensor))
    return floors + [floor("sdpa_spatial_backward_delta", 0, 2 * tensor + stats),
                     floor("sdpa_spatial_backward", 5, 6 * tensor + 2 * stats + accumulator),
                     floor("sdpa_spatial_backward_dq", 0, accumulator + tensor)]


def spatial_path_floors(shape, spatial_path: str, *, itemsize: int = 2, stacked: bool = False,
                        gpu: Ceilings = GPUS["h200"]) -> List[KernelFloor]:
    """The spatial branch's kernels on `spatial_path` ("kernel": the Triton kernels, "sdpa": SDPA's), as they run
    beside the temporal branch, summed or `stacked`. The temporal kernels are the same on both paths."""
    if spatial_path == "sdpa":
        return sdpa_spatial_floors(shape, itemsize=itemsize, summed=not stacked, gpu=gpu)
    both = kernel_floors(shape, itemsize=itemsize, stacked=stacked, gpu=gpu)
    return [f for f in both if f.kernel.startswith("spatial")]


def faster_spatial_path(shape, *, itemsize: int = 2, stacked: bool = False, gpu: Ceilings = GPUS["h200"]) -> str:
    """The spatial path with the lower floor, forward plus backward ("sdpa" on a tie: it has the tuned kernels)."""
    sdpa, kernel = (op_floor_ms(spatial_path_floors(shape, path, itemsize=itemsize, stacked=stacked, gpu=gpu),
                                backward=True) for path in ("sdpa", "kernel"))
    return "sdpa" if sdpa <= kernel else "kernel"


def sdpa_from_tokens(head_dim: int, *, itemsize: int = 2, stacked: bool = False, gpu: Ceilings = GPUS["h200"],
                     largest: int = 16384) -> int:
    """The fewest tokens per frame S (a multiple of 64) from which the SDPA path's floor is the lower at every
    larger S up to `largest`: the GPU rule of pychop.ops.spatial_paths. B, T and H scale both floors alike."""
    tokens = largest
    while tokens > 64 and faster_spatial_path((1, 1, tokens - 64, 1, head_dim), itemsize=itemsize, stacked=stacked,
                                              gpu=gpu) == "sdpa":
        tokens -= 64
    return tokens


def op_floor_ms(floors: List[KernelFloor], *, backward: bool) -> float:
    """The op's floor: its forward kernels' floors, plus its backward kernels' with `backward`."""
    return sum(f.floor_ms for f in floors if backward or "backward" not in f.kernel)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floors", description=__doc__.splitlines()[0])
    parser.add_argument("--causal", action="store_true", help="causal temporal attention (default: every frame)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--gpu", default="h200", choices=sorted(GPUS))
    args = parser.parse_args(argv)
    gpu, itemsize = GPUS[args.gpu], 4 if args.dtype == "float32" else 2
    print(describe_shapes() + "\n")
    print(f"floors on {gpu.name}: {gpu.matmul_tflops:g} TFLOP/s matmul, {gpu.copy_tbps:g} TB/s copy; "
          f"{args.dtype}, temporal {'causal' if args.causal else 'over every frame'}")
    print(f"{'shape':<6}{'kernel':<26}{'GFLOP':>9}{'MB':>9}{'compute ms':>12}{'memory ms':>11}{'floor ms':>10}"
          f"  bound")
    for name, shape in DESIGN_SHAPES.items():
        floors = kernel_floors(shape, itemsize=itemsize, causal=args.causal, gpu=gpu)
        for f in floors:
            print(f"{name:<6}{f.kernel:<26}{f.flops / 1e9:>9.1f}{f.bytes / 1e6:>9.1f}{f.compute_ms:>12.4f}"
                  f"{f.memory_ms:>11.4f}{f.floor_ms:>10.4f}  {f.bound}")
        print(f"{name:<6}{'op forward':<26}{'':>52}{op_floor_ms(floors, backward=False):>10.4f}")
        print(f"{name:<6}{'op forward+backward':<26}{'':>52}{op_floor_ms(floors, backward=True):>10.4f}")
    if itemsize == 2:
        summed, stacked = (sdpa_from_tokens(64, stacked=stacked, gpu=gpu) for stacked in (False, True))
        print(f"spatial branch: SDPA's path has the lower floor from S = {summed} tokens per frame summed, "
              f"{stacked} stacked (pychop.ops.spatial_paths' GPU rule)")


if __name__ == "__main__":
    main()
