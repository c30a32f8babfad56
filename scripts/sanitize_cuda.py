"""Runs the GPU backends ("cuda" and "triton") forward and backward at small shapes, every option and dtype, both
branches summed and stacked, for compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize_cuda.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python scripts/sanitize_cuda.py

``--quick`` (the GPU check): bfloat16 only, the first two shapes. ``--rehearse`` makes the same calls on the CPU
with the "cpp" backend (no sanitizer): the GPU check's rehearsal.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pychop  # noqa: E402
from pychop.ops import backends  # noqa: E402

# S off the block sizes, head dims padded (40, 80) or not (64), 256 (the smallest blocks); T = 1 and 5, and 70
# (the cuda temporal backward's query kernel).
SHAPES = [(1, 5, 70, 2, 40), (1, 1, 17, 1, 64), (1, 3, 33, 1, 80), (1, 2, 20, 1, 256), (1, 70, 3, 1, 16)]
# Every temporal mask (all frames, a window, causal) and grad window; the kernels take them as run-time values.
OPTIONS = [{}, dict(temporal_window=2, temporal_grad_window=1), dict(temporal_causal=True, temporal_grad_window=2)]


def main():
    rehearse, quick = "--rehearse" in sys.argv[1:], "--quick" in sys.argv[1:]
    device, names = ("cpu", ("cpp",)) if rehearse else ("cuda", ("cuda", "triton"))
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    shapes = SHAPES[:2] if quick else SHAPES
    if not rehearse and not torch.cuda.is_available():
        raise SystemExit("sanitize_cuda.py needs a CUDA GPU (or --rehearse)")
    for name in names:
        backends.load(name, torch.device(device))  # build outside the sanitized region's interest
    for backend in names:
        for dtype in dtypes:
            for shape in shapes:
                x = [torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(6)]
                calls = [(pychop.spatial_attention, x[:3], {})]
                for options in OPTIONS:
                    calls += [(pychop.parallel_st_attention, x, options),
                              (pychop.parallel_st_attention, x, dict(options, combine="stack")),
                              (pychop.temporal_attention, x[3:],
                               {key.replace("temporal_", ""): value for key, value in options.items()})]
                for op, inputs, kwargs in calls:
                    out = op(*inputs, backend=backend, **kwargs)
                    torch.autograd.grad(out, inputs, torch.randn_like(out))
                if device == "cuda":
                    torch.cuda.synchronize()
        print(f"sanitize_cuda: {backend} ok")


if __name__ == "__main__":
    main()
