"""The benchmark runner: discovers suites, runs them with progress, prints tables, writes JSON and plots.

A suite is a module in ``benchmarks/suites`` that defines:

    DESCRIPTION = "one line"
    def run(ctx: Context) -> list[dict]     # one row per measurement, flat dicts of str / int / float / None
    def plot(rows, path) -> None            # optional: one PNG figure of the rows
    PRINTS_ITS_TABLES = True                # optional: the suite prints its own tables (the runner then does not)

and uses ``ctx.device``, ``ctx.quick``, ``ctx.smoke`` (the smallest sizes: every code path runs, no figure
means anything; the GPU check's rehearsal), ``ctx.progress(items, desc)``, ``ctx.compare(candidates,
baseline)`` and ``ctx.peak_memory_mb(fn)``. Every time a suite reports comes from ``ctx.compare``: the candidates of one
comparison timed interleaved in one process, repeated, warmed up (``benchmarks.timing``); a ratio goes into a
row as three columns (``Ratio.columns``: the median, ``_p10`` and ``_p90`` of the per-round ratios), which the
printed table shows as one cell, ``1.52x (1.41-1.60)``, marked ``~`` when the spread straddles 1.0. Each
suite's JSON holds its rows, the timing settings, the CPU thread counts the comparisons ran with and an
account of every comparison (candidates, calls per sample, rounds, seconds).
"""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from tqdm.auto import tqdm

import benchmarks.suites
from benchmarks.timing import MIN_ROUNDS, Comparison, CpuClock, CudaClock, Settings, format_ratio, measure

RATIO_LEGEND = ("ratios: median over paired rounds (p10-p90 of the per-round ratios); "
                "~: the spread straddles 1.0, no clear difference")


def default_settings(device: torch.device, quick: bool = False, smoke: bool = False) -> Settings:
    """20 timed rounds (8 with quick) after one warm-up round. GPU: samples of at least 1 ms (CUDA events), no
    budget. CPU: samples of at least 10 ms, at most 8 s of timed rounds per comparison (the main command then
    takes a few minutes on two cores). Smoke: the fewest rounds, no warm-up, 1 ms samples, 1 s budgets."""
    if smoke:
        return Settings(repeats=MIN_ROUNDS, warmup=0, min_sample_ms=1.0, budget_s=1.0)
    on_gpu = device.type == "cuda"
    return Settings(repeats=8 if quick else 20, warmup=1, min_sample_ms=1.0 if on_gpu else 10.0,
                    budget_s=None if on_gpu else 8.0)


@dataclass
class Context:
    device: torch.device
    quick: bool
    settings: Optional[Settings] = None  # default_settings(device, quick, smoke) when not given
    smoke: bool = False
    comparisons: List[dict] = field(default_factory=list)  # Comparison.record() of each compare, in order

    def __post_init__(self):
        if self.settings is None:
            self.settings = default_settings(self.device, self.quick, self.smoke)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def progress(self, items: Iterable, desc: str):
        items = list(items)
        return tqdm(items, desc=desc, leave=False, dynamic_ncols=True, disable=None)  # no bar off a terminal

    def compare(self, candidates: Mapping[str, Callable[[], object]], baseline: Optional[str] = None) -> Comparison:
        """Times the candidates side by side (benchmarks.timing.measure with this context's settings): on a GPU
        with CUDA events, on a CPU with time.perf_counter and torch's current thread count, recorded."""
        clock = CudaClock(self.device) if self.on_gpu else CpuClock()
        threads = None if self.on_gpu else torch.get_num_threads()
        comparison = measure(candidates, self.settings, clock, baseline=baseline, threads=threads)
        self.comparisons.append(comparison.record())
        return comparison

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

    def timing_summary(self) -> str:
        """One line: how the suite's times were measured (comparisons, rounds, settings, CPU threads)."""
        if not self.comparisons:
            return "timing: no comparisons"
        settings = self.settings
        rounds = sorted({record["rounds"] for record in self.comparisons})
        budget = "" if settings.budget_s is None else f", budget {settings.budget_s:g} s per comparison"
        line = (f"timing: {len(self.comparisons)} comparisons of interleaved candidates, "
                f"{rounds[0] if len(rounds) == 1 else f'{rounds[0]}-{rounds[-1]}'} rounds (warm-up "
                f"{settings.warmup}, samples >= {settings.min_sample_ms:g} ms{budget}), "
                f"{sum(record['seconds'] for record in self.comparisons):.1f} s timed")
        threads = sorted({record["threads"] for record in self.comparisons if record["threads"] is not None})
        if threads:
            line += f"; CPU threads: {', '.join(map(str, threads))}"
        return line


def discover() -> Dict[str, object]:
    """Suite name -> module, for every module in benchmarks/suites that defines run()."""
    suites = {}
    for info in pkgutil.iter_modules(benchmarks.suites.__path__):
        module = importlib.import_module(f"benchmarks.suites.{info.name}")
        if callable(getattr(module, "run", None)):
            suites[info.name] = module
    return suites


def table_cells(rows: List[dict]) -> Tuple[List[str], List[List[str]], set]:
    """(column names, cell texts per row, the ratio columns) of rows: columns in first-seen order, floats to 4
    significant digits, None as "-". A column NAME with columns NAME_p10 and NAME_p90 beside it is a ratio
    (Ratio.columns) and shows as one cell, ``1.52x (1.41-1.60)``."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    ratios = {column for column in columns if f"{column}_p10" in columns and f"{column}_p90" in columns}
    columns = [c for c in columns if not any(c in (f"{r}_p10", f"{r}_p90") for r in ratios)]

    def cell(row, column):
        value = row.get(column)
        if value is None:
            return "-"
        if column in ratios and row.get(f"{column}_p10") is not None and row.get(f"{column}_p90") is not None:
            return format_ratio(value, row[f"{column}_p10"], row[f"{column}_p90"])
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    return columns, [[cell(row, column) for column in columns] for row in rows], ratios


def format_table(rows: List[dict]) -> str:
    """A plain-text table of rows (see table_cells), with the legend of its ratios."""
    if not rows:
        return "(no rows)"
    columns, cells, ratios = table_cells(rows)
    widths = [max(len(column), *(len(r[i]) for r in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    if ratios:
        lines.append(RATIO_LEGEND)
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


def run_suites(names: List[str], device: torch.device, quick: bool, out_dir: Path,
               settings: Optional[Settings] = None, smoke: bool = False) -> Dict[str, List[dict]]:
    """Runs the named suites (all when empty); settings default to default_settings(device, quick, smoke)."""
    suites = discover()
    unknown = [name for name in names if name not in suites]
    if unknown:
        raise SystemExit(f"unknown suite(s) {unknown}; available: {sorted(suites)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = settings or default_settings(device, quick, smoke)
    size = "smoke" if smoke else "quick" if quick else "full"
    results = {}
    for name in names or sorted(suites):
        module = suites[name]
        ctx = Context(device=device, quick=quick, settings=settings, smoke=smoke)
        print(f"\n== {name}: {module.DESCRIPTION} ({device}, {size})", flush=True)
        rows = module.run(ctx)
        results[name] = rows
        if not getattr(module, "PRINTS_ITS_TABLES", False):  # a suite that prints its tables as it runs
            print(format_table(rows), flush=True)
        print(ctx.timing_summary(), flush=True)
        payload = {"suite": name, "environment": environment(device), "quick": quick, "smoke": smoke,
                   "timing": {"settings": asdict(settings), "summary": ctx.timing_summary(),
                              "comparisons": ctx.comparisons},
                   "rows": rows}
        (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=1))
        if callable(getattr(module, "plot", None)) and rows:
            module.plot(rows, out_dir / f"{name}.png")
        print(f"-> {out_dir / (name + '.json')}", flush=True)
    return results
