"""Bookkeeping shared by the training-outcome suites: results per seed summarised over seeds.

A run trains one method from one seed and gives its final held-out metrics (a dict) and a curve (a list of
(step, value) pairs, the same steps for every seed). ``summary_rows`` turns the runs of one comparison into
rows: per method the mean and range over seeds of each metric and, against reference methods, the median of
the per-seed ratios with their p10-p90 spread (runs of the same seed paired, as ``benchmarks.timing`` pairs
rounds); per method and curve step the mean and range over seeds.

Sizes: ``--smoke`` runs every code path in seconds; ``python -m benchmarks`` (with or without ``--quick``, what
``scripts/bench.sh`` runs) a size of a few minutes on a 2-core CPU; the full size, tens of minutes, is
``python -m benchmarks.suites.<suite> [--out DIR]`` (``run_full``), through the same runner.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import torch

from benchmarks.timing import Ratio, format_ratio

Final = Dict[str, float]
Curve = List[Tuple[int, float]]


def spread(values: Sequence[float]) -> Tuple[float, float, float]:
    """Mean, smallest and largest of ``values``."""
    return sum(values) / len(values), min(values), max(values)


def with_spread(key: str, values: Sequence[float]) -> Dict[str, float]:
    """Row columns ``key`` (the mean), ``key_lo`` and ``key_hi`` (the range)."""
    mean, lo, hi = spread(values)
    return {key: mean, f"{key}_lo": lo, f"{key}_hi": hi}


def summary_rows(common: Mapping[str, object], finals: Mapping[str, List[Final]], curves: Mapping[str, List[Curve]],
                 metrics: Sequence[str], ratios: Sequence[str], references: Mapping[str, str],
                 curve_metric: str) -> List[dict]:
    """Rows ``kind="outcome"`` (one per method: ``metrics`` with their range; ``{ratio}_vs_{label}`` for each
    metric in ``ratios`` against each ``references[label]`` method, per-seed ratios) and ``kind="curve"`` (one
    per method and step: ``curve_metric`` with its range). ``finals[method]`` and ``curves[method]`` are
    lists over the same seeds, in the same order; ``common`` goes into every row."""
    rows = []
    for method, runs in finals.items():
        row = {"kind": "outcome", **common, "method": method, "seeds": len(runs)}
        for key in metrics:
            row.update(with_spread(key, [run[key] for run in runs]))
        for label, reference in references.items():
            if method == reference:
                continue
            for key in ratios:
                row.update(Ratio.of([run[key] for run in runs], [run[key] for run in finals[reference]])
                           .columns(f"{key}_vs_{label}"))
        rows.append(row)
    for method, runs in curves.items():
        for point, (step, _) in enumerate(runs[0]):
            rows.append({"kind": "curve", **common, "method": method, "step": step,
                         **with_spread(curve_metric, [curve[point][1] for curve in runs])})
    return rows


def trained_rows(ctx, common: Mapping[str, object], methods: Sequence[str], seeds: int,
                 train: Callable[[str, int], Tuple[Final, Curve]], **summary) -> List[dict]:
    """Trains every method from every seed (``train(method, seed)`` -> final metrics and curve), seed by seed;
    returns a ``kind="seed"`` row per run, then ``summary_rows(common, ..., **summary)``."""
    finals: Dict[str, List[Final]] = {method: [] for method in methods}
    curves: Dict[str, List[Curve]] = {method: [] for method in methods}
    rows = []
    runs = [(method, seed) for seed in range(seeds) for method in methods]
    for method, seed in ctx.progress(runs, " ".join(map(str, common.values()))):
        final, curve = train(method, seed)
        finals[method].append(final)
        curves[method].append(curve)
        rows.append({"kind": "seed", **common, "method": method, "seed": seed, **final})
    return rows + summary_rows(common, finals, curves, **summary)


def add_costs(ctx, rows: List[dict], steps: Mapping[str, Callable[[], object]], reference: str, suffix: str) -> None:
    """Times the training ``steps`` side by side (``ctx.compare``) and writes into the cost ``rows`` (one per
    method, with ``saved_mb``) the median ``step_ms``, and for all but ``reference`` ``saved_vs_{suffix}`` and
    ``time_vs_{suffix}`` (per-round ratios, with their spread)."""
    timed = ctx.compare(steps, baseline=reference)
    ref = next(row for row in rows if row["method"] == reference)
    for row in rows:
        row["step_ms"] = timed.ms[row["method"]]
        if row is not ref:
            row[f"saved_vs_{suffix}"] = row["saved_mb"] / ref["saved_mb"]
            row.update(timed.ratio(row["method"], reference).columns(f"time_vs_{suffix}"))


def range_cell(row: Mapping[str, float], key: str, spec: str) -> str:
    """'mean (lo-hi)' of a column written by ``with_spread``."""
    return f"{row[key]:{spec}} ({row[f'{key}_lo']:{spec}}-{row[f'{key}_hi']:{spec}})"


def ratio_cell(row: Mapping[str, float], key: str) -> str:
    """A ratio column and its spread as one cell; '1' where the row is the reference itself."""
    return format_ratio(row[key], row[f"{key}_p10"], row[f"{key}_p90"]) if key in row else "1"


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> List[str]:
    """The lines of a Markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def cost_table(costs: Sequence[Mapping], reference: str, suffix: str) -> List[str]:
    """The cost rows (saved MiB, ``saved_vs_{suffix}``, step ms, ``time_vs_{suffix}``) as a Markdown table;
    ``reference`` names the method the ratios are to."""
    return markdown_table(
        ("method", "saved for backward (MiB)", f"saved vs {reference}", "step (ms)", f"time vs {reference}"),
        [(r["method"], f"{r['saved_mb']:.2f}",
          f"{r[f'saved_vs_{suffix}']:.2f}x" if f"saved_vs_{suffix}" in r else "1", f"{r['step_ms']:.1f}",
          ratio_cell(r, f"time_vs_{suffix}")) for r in costs])


def plot_outcomes(rows: Sequence[Mapping], path, group: str, metric: str, xlabel: str, ylabel: str) -> None:
    """One PNG: a panel of curves per value of ``group`` (a line per method: mean over seeds, in a band of their
    range) and a panel of the cost rows (peak saved MiB as bars, labelled with the step time)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r for r in rows if r["kind"] == "curve"]
    groups = list(dict.fromkeys(r[group] for r in curves))
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(6 * (len(groups) + 1), 4.5))
    for ax, name in zip(axes, groups):
        mine = [r for r in curves if r[group] == name]
        for method in dict.fromkeys(r["method"] for r in mine):
            curve = [r for r in mine if r["method"] == method]
            steps = [r["step"] for r in curve]
            line, = ax.plot(steps, [r[metric] for r in curve], "-o", ms=3, label=method)
            ax.fill_between(steps, [r[f"{metric}_lo"] for r in curve], [r[f"{metric}_hi"] for r in curve],
                            color=line.get_color(), alpha=0.15)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{name}: mean and range over seeds")
        ax.legend(fontsize=8)
    costs = [r for r in rows if r["kind"] == "cost"]
    ax = axes[-1]
    ax.bar(range(len(costs)), [r["saved_mb"] for r in costs])
    ax.set_xticks(range(len(costs)), [r["method"] for r in costs], rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="peak saved for backward (MiB)", title="training step memory (step time above each bar)")
    for i, r in enumerate(costs):
        ax.annotate(f"{r['step_ms']:.0f} ms", (i, r["saved_mb"]), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_full(name: str, argv=None) -> None:
    """``python -m benchmarks.suites.<name> [--out DIR] [--device ...]``: the suite at its full size, through the
    runner (the same JSON and plot as ``python -m benchmarks --suite <name>``). Sets the suite module's
    ``full_run``, which its size choice reads."""
    from benchmarks.runner import default_settings, run_suites

    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.suites.{name}",
                                     description=f"the {name} suite at its full size")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=Path("results"), help="folder for JSON and PNG results")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    importlib.import_module(f"benchmarks.suites.{name}").full_run = True
    if device.type == "cpu":
        torch.set_num_threads(1)
    run_suites([name], device, False, args.out, default_settings(device))
