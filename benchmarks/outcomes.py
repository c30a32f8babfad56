"""Bookkeeping shared by the training-outcome suites: results per seed summarised over seeds.

A run trains one method from one seed and gives its final held-out metrics (a dict) and a curve (a list of
(step, value) pairs, the same steps for every seed). ``summary_rows`` turns the runs of one comparison into
rows: per method the mean and range over seeds of each metric and, against reference methods, the median of
the per-seed ratios with their p10-p90 spread (runs of the same seed paired, as ``benchmarks.timing`` pairs
rounds); per method and curve step the mean and range over seeds.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

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


def range_cell(row: Mapping[str, float], key: str, spec: str) -> str:
    """'mean (lo-hi)' of a column written by ``with_spread``."""
    return f"{row[key]:{spec}} ({row[f'{key}_lo']:{spec}}-{row[f'{key}_hi']:{spec}})"


def ratio_cell(row: Mapping[str, float], key: str) -> str:
    """A ratio column and its spread as one cell; '1' where the row is the reference itself."""
    return format_ratio(row[key], row[f"{key}_p10"], row[f"{key}_p90"]) if key in row else "1"


def plot_curves(ax, rows: Sequence[Mapping], methods: Sequence[str], metric: str, **where) -> None:
    """The curve rows matching ``where``, one line per method (mean over seeds) in a band (their range)."""
    for method in methods:
        curve = [r for r in rows if r["kind"] == "curve" and r["method"] == method
                 and all(r.get(key) == value for key, value in where.items())]
        if not curve:
            continue
        steps = [r["step"] for r in curve]
        line, = ax.plot(steps, [r[metric] for r in curve], "-o", ms=3, label=method)
        ax.fill_between(steps, [r[f"{metric}_lo"] for r in curve], [r[f"{metric}_hi"] for r in curve],
                        color=line.get_color(), alpha=0.15)
    ax.legend(fontsize=8)
