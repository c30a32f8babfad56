"""python -m pychop.check [--device cpu|cuda] [--repeats N] [--threads N] [--smoke]: is pychop's attention right
and fast on this machine?

For every backend that runs here (each fused one on both spatial paths where SDPA takes the inputs), at a few
shapes: ``parallel_st_attention`` forward and backward on fresh random inputs, its output and six gradients
against a float64 reference (the torch backend in float64 on the same inputs), each error held to the project's
rule, the one its tests apply: at most ERROR_FACTOR times the torch backend's own error in the same dtype, plus
FLOOR[dtype]; then pass or fail, the median time of a forward+backward step and its speed against the torch
backend's (the median of per-round ratios, every case timed in each round), and the backend and spatial path
``auto`` takes at that shape. Exits 1 when a case fails. On a CPU it takes
seconds; Triton runs only where it can (a GPU, or its CPU interpreter under TRITON_INTERPRET=1).

Errors are relative to the reference's largest magnitude (of the output, of each gradient).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

import pychop
from pychop.ops import backends, spatial_paths

ERROR_FACTOR = 3.0  # a fused backend's error may be this many times the torch backend's in the same dtype ...
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # ... plus this, relative

GRADIENTS = ("q_s", "k_s", "v_s", "q_t", "k_t", "v_t")
# name: ((B, T, S, H, D), temporal options). CPU: small, float32; GPU: the Stable Diffusion family's head dim 40,
# the common 64 and 128, S from 256 to 2048 (where the float64 reference still fits in memory).
CPU_SHAPES = {"frames": ((1, 8, 64, 2, 40), dict(temporal_causal=True, temporal_grad_window=2)),
              "tokens": ((1, 2, 256, 2, 64), {})}
GPU_SHAPES = {"sd-head-dim": ((2, 16, 256, 8, 40), dict(temporal_causal=True, temporal_grad_window=4)),
              "tokens-1024": ((2, 8, 1024, 4, 64), {}),
              "tokens-2048": ((1, 8, 2048, 2, 128), dict(temporal_window=4))}
SMOKE_SHAPES = {"smoke": ((1, 3, 9, 2, 16), dict(temporal_causal=True, temporal_grad_window=1))}  # --smoke
DTYPES = {"cpu": (torch.float32,), "cuda": (torch.bfloat16, torch.float32)}


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute error over the reference's largest magnitude; inf where `actual` is not finite."""
    if not bool(torch.isfinite(actual).all()):
        return float("inf")
    return ((actual.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def step(inputs, dout, **kwargs) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """One forward and backward of the parallel op: (output, the six gradients)."""
    out = pychop.parallel_st_attention(*inputs, **kwargs)
    return out, torch.autograd.grad(out, inputs, dout)


def timed_steps(cases: Dict[str, dict], inputs, dout, repeats: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Milliseconds of one forward+backward step of each case (name -> op keywords), `repeats` rounds of every case
    in turn after `warmup` untimed ones, so that a round's cases share the machine's state of the moment."""
    device = inputs[0].device
    samples: Dict[str, List[float]] = {name: [] for name in cases}
    for round_index in range(warmup + repeats):
        for name, kwargs in cases.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step(inputs, dout, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index >= warmup:
                samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def candidates(device: torch.device, inputs) -> List[Tuple[str, Optional[str]]]:
    """(backend, spatial path) for every backend that runs here: the torch backend, each fused one on the paths
    its inputs can take."""
    found = []
    for name, reason in pychop.available_backends(device).items():
        if reason is not None:
            continue
        if name == "torch":
            found.append((name, None))
            continue
        paths = ["kernel"]
        try:
            spatial_paths.choose("sdpa", *inputs[:3], stacked=False)
            paths.insert(0, "sdpa")
        except ValueError:
            pass
        found += [(name, path) for path in paths]
    return found


def auto_takes(device: torch.device, inputs) -> str:
    """The backend and spatial path ``backend="auto"`` takes for these inputs, in words."""
    name = backends.resolve("auto", device)
    if name == "torch":
        return "torch"
    kernel = spatial_paths.choose("auto", *inputs[:3], stacked=False)
    return f"{name}, spatial branch {'through SDPA (' + kernel + ')' if kernel else 'through its own kernel'}"


def check_shape(device: torch.device, dtype: torch.dtype, shape, options: dict, repeats: int,
                warmup: int = 1) -> List[dict]:
    """One row per candidate at this shape and dtype (see the module docstring)."""
    torch.manual_seed(0)
    inputs = [torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(6)]
    dout = torch.randn(shape, device=device, dtype=dtype)
    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    reference = step(inputs64, dout.double(), backend="torch", **options)
    reference = [reference[0], *reference[1]]
    torch_out, torch_grads = step(inputs, dout, backend="torch", **options)
    torch_errors = [relative_error(x, r) for x, r in zip([torch_out, *torch_grads], reference)]
    bounds = [ERROR_FACTOR * e + FLOOR[dtype] for e in torch_errors]
    rows, runs = [], {}
    for name, path in candidates(device, inputs):
        row = dict(backend=name, spatial_path=path or "-")
        kwargs = dict(backend=name, **options, **({} if path is None else {"spatial_path": path}))
        try:
            out, grads = step(inputs, dout, **kwargs)
            errors = [relative_error(x, r) for x, r in zip([out, *grads], reference)]
            worst = max(range(7), key=lambda i: errors[i] / bounds[i])
            row.update(worst=("out", *GRADIENTS)[worst], error=errors[worst],
                       bound=None if name == "torch" else bounds[worst],
                       passed=name == "torch" or errors[worst] <= bounds[worst])
            runs[len(rows)] = kwargs
        except Exception as error:  # a backend that fails here is reported, never the end of the check
            row.update(passed=False, failure=f"{type(error).__name__}: {' '.join(str(error).split())[:200]}")
        rows.append(row)
    samples = timed_steps(runs, inputs, dout, repeats, warmup)
    torch_samples = samples[0]  # the torch backend is the first candidate
    for index, times in samples.items():
        rows[index]["ms"] = statistics.median(times)
        rows[index]["vs_torch"] = statistics.median(t / own for t, own in zip(torch_samples, times))
    return rows


def run(device: torch.device, shapes: Dict[str, tuple], dtypes, repeats: int, warmup: int = 1) -> List[dict]:
    """Every shape and dtype: rows of check_shape (`repeats` timed rounds after `warmup` untimed ones) with the
    shape, the dtype and what auto takes."""
    rows = []
    for shape_name, (shape, options) in shapes.items():
        for dtype in dtypes:
            probe = [torch.empty(shape, device=device, dtype=dtype) for _ in range(3)]
            auto = auto_takes(device, probe)
            for row in check_shape(device, dtype, shape, options, repeats, warmup):
                rows.append(dict(shape=shape_name, size=",".join(map(str, shape)), dtype=str(dtype)[6:],
                                 options=",".join(f"{k.replace('temporal_', '')}={v}" for k, v in options.items())
                                 or "-", auto=auto, **row))
    return rows


def format_rows(rows: List[dict]) -> str:
    """The rows as a table, then what auto takes per shape and dtype."""
    header = ("shape", "B,T,S,H,D", "dtype", "options", "backend", "spatial", "worst", "error", "bound", "result",
              "fwd+bwd ms", "vs torch")
    lines = [header]
    for row in rows:
        given = (row["shape"], row["size"], row["dtype"], row["options"], row["backend"], row["spatial_path"])
        if "failure" in row:
            lines.append(given + ("-", "-", "-", "FAIL: " + row["failure"], "-", "-"))
            continue
        lines.append(given + (row["worst"], f"{row['error']:.2e}", "-" if row["bound"] is None else
                              f"{row['bound']:.2e}", "pass" if row["passed"] else "FAIL", f"{row['ms']:.3f}",
                              f"{row['vs_torch']:.2f}x"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    text.append("")
    floors = ", ".join(f"{value:g} ({str(dtype)[6:]})" for dtype, value in FLOOR.items())
    text.append(f"error: relative to the float64 reference, of the output or gradient nearest its bound (the torch "
                f"backend: its largest); bound: {ERROR_FACTOR:g} x the torch backend's error there + {floors}")
    for key in dict.fromkeys((row["shape"], row["dtype"]) for row in rows):
        auto = next(row["auto"] for row in rows if (row["shape"], row["dtype"]) == key)
        text.append(f"auto at {key[0]} ({key[1]}): {auto}")
    return "\n".join(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pychop.check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to check (default: cuda when a GPU is present)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward+backward steps per case (default 5)")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    parser.add_argument("--smoke", action="store_true", help="one tiny shape: every code path, no meaningful time")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = SMOKE_SHAPES if args.smoke else GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    print(f"pychop {pychop.__version__} check on {name}, torch {torch.__version__}", flush=True)
    rows = run(device, shapes, DTYPES[device.type], args.repeats)
    print(format_rows(rows))
    print("\n" + verdict(rows))
    return 0 if all(row["passed"] for row in rows) else 1


def verdict(rows: List[dict]) -> str:
    failed = sum(not row["passed"] for row in rows)
    return f"{len(rows) - failed} of {len(rows)} cases passed" + (": FAILED" if failed else "")


if __name__ == "__main__":
    sys.exit(main())
