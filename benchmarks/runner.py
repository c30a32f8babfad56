"""The benchmark runner: discovers suites, runs them with progress, prints tables, writes JSON and plots.

A suite is a module in ``benchmarks/suites`` that defines:

    DESCRIPTION = "one line"
    def run(ctx: Context) -> list[dict]     # one row per measurement, flat dicts of str / int / float / None
    def plot(rows, path) -> None            # optional: one PNG figure of the rows

and uses ``ctx.device``, ``ctx.quick``, ``ctx.progress(items, desc)``, ``ctx.time_ms(fn)`` and
``ctx.peak_memory_mb(fn)``. On a GPU ``time_ms`` is the median of ``triton.testing.do_bench``; on a CPU the
median of torch.utils.benchmark's blocked autorange (CPU timings say nothing of GPU speed).
"""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch
from tqdm.auto import tqdm

import benchmarks.suites


@dataclass
class Context:
    device: torch.device
    quick: bool
    log: List[str] = field(default_factory=list)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def progress(self, items: Iterable, desc: str):
        items = list(items)
        return tqdm(items, desc=desc, leave=False, dynamic_ncols=True, disable=None)  # no bar off a terminal

    def time_ms(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of fn(), warmed up (on the CPU with all of torch's threads, as a user runs it)."""
        if self.on_gpu:
            import triton.testing
            return float(triton.testing.do_bench(fn, warmup=25 if self.quick else 100,
                                                 rep=100 if self.quick else 500, return_mode="median"))
        from torch.utils.benchmark import Timer
        fn()
        measurement = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
            min_run_time=0.1 if self.quick else 0.5)
        return measurement.median * 1e3

    def peak_memory_mb(self, fn: Callable[[], object]) -> Optional[float]:
        """Peak device memory allocated while fn() runs, above what was allocated before (GPU only)."""
        if not self.on_gpu:
            return None
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - before) / 2 ** 20


def discover() -> Dict[str, object]:
    """Suite name -> module, for every module in benchmarks/suites that defines run()."""
    suites = {}
    for info in pkgutil.iter_modules(benchmarks.suites.__path__):
        module = importlib.import_module(f"benchmarks.suites.{info.name}")
        if callable(getattr(module, "run", None)):
            suites[info.name] = module
    return suites


def format_table(rows: List[dict]) -> str:
    """A plain-text table of rows (columns in first-seen order; floats to 4 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    cells = [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(r[i]) for r in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "machine": platform.machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def run_suites(names: List[str], device: torch.device, quick: bool, out_dir: Path) -> Dict[str, List[dict]]:
    suites = discover()
    unknown = [name for name in names if name not in suites]
    if unknown:
        raise SystemExit(f"unknown suite(s) {unknown}; available: {sorted(suites)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(device=device, quick=quick)
    results = {}
    for name in names or sorted(suites):
        module = suites[name]
        print(f"\n== {name}: {module.DESCRIPTION} ({device}, {'quick' if quick else 'full'})", flush=True)
        rows = module.run(ctx)
        results[name] = rows
        print(format_table(rows), flush=True)
        payload = {"suite": name, "environment": environment(device), "quick": quick, "rows": rows}
        (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=1))
        if callable(getattr(module, "plot", None)) and rows:
            module.plot(rows, out_dir / f"{name}.png")
        print(f"-> {out_dir / (name + '.json')}", flush=True)
    return results
