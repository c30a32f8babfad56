"""Bookkeeping shared by the training-outcome suites: results per seed summarised over seeds.

A run trains one method from one seed and gives its final held-out metrics (a dict) and a curve (a list of
(step, value) pairs, the same steps for every seed). ``summary_rows`` turns the runs of one comparison into
rows: per method the mean and range over seeds of each metric and, against reference methods, the median of
the per-seed ratios with their p10-p90 spread (runs of the same seed paired, as ``benchmarks.timing`` pairs
rounds); per method and curve step the mean and range over seeds.

The suites' ``report`` states what a run found in sentences computed from its rows, never typed: each ratio of
a quality measure where lower is better (held-out MSE, loss, temporal error) gets a ``verdict`` by one rule on
its p10-p90 spread over seeds (``QUALITY``), step times likewise (``SPEED``); ``seed_ratios`` counts the seeds
on the verdict's side, since with few seeds the p10-p90 spread is interpolated between them and narrower than
their range.

Sizes: ``--smoke`` runs every code path in seconds; ``python -m benchmarks`` (with or without ``--quick``, what
``scripts/bench.sh`` runs) a size of a few minutes on a 2-core CPU; the full size, tens of minutes, is
``python -m benchmarks.suites.<suite> [--out DIR]`` (``run_full``), through the same runner.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

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


FINDINGS_HEADER = ("**What the run found**, in sentences computed from the rows above by the rules in "
                   "`benchmarks/outcomes.py`: a ratio of a quality measure (lower is better) whose p10-p90 spread "
                   "over seeds lies above 1 costs quality, one below 1 is better, one that holds 1 is no difference "
                   "the seeds can see; step times alike (slower, faster, no clear difference).")



def plot_note(suite: str, curve: str) -> str:
    """The sentence that points to the suite's plot (``<suite>.png``, which the runner writes beside the JSON and
    ``benchmarks.report`` shows after the section's findings)."""
    return (f"The plot after the findings (`{suite}.png`): {curve} per training step, a line per method (the mean "
            "over seeds) in a band of the seeds' range; and per method the peak bytes a training step saves for "
            "backward, labelled with its step time.")


# A verdict's words: the ratio's spread below 1.0, holding 1.0 ({seeds}: how many seeds), above 1.0.
QUALITY = ("better", "no difference {seeds} seeds can see", "costs quality")
SPEED = ("faster", "no clear difference", "slower")


def verdict(p10: float, p90: float, seeds: int, words: Sequence[str] = QUALITY) -> str:
    """The verdict on a ratio (candidate / reference) of a measure where lower is better, from the p10-p90 spread
    of its per-seed (or per-round) values: ``words[1]`` when the spread holds 1.0 (however far the median is
    from it), ``words[2]`` when the whole spread is above 1.0, ``words[0]`` when below."""
    better, level, worse = words
    if p10 <= 1.0 <= p90:
        return level.format(seeds=seeds)
    return worse if p10 > 1.0 else better


def judged(row: Mapping[str, float], key: str) -> str:
    """The verdict on the ratio column ``key`` of an outcome row (its p10-p90 spread over ``row["seeds"]``)."""
    return verdict(row[f"{key}_p10"], row[f"{key}_p90"], row["seeds"])


def paired(rows: Sequence[Mapping], group: Tuple[str, str], method: str, reference: str,
           metric: str) -> Tuple[List[float], List[float]]:
    """``metric`` of ``method``'s runs and of ``reference``'s runs of the same seeds, in the same order, from the
    ``kind="seed"`` rows whose ``group[0]`` column is ``group[1]``."""
    runs = [r for r in rows if r["kind"] == "seed" and r[group[0]] == group[1]]
    ref = {r["seed"]: r[metric] for r in runs if r["method"] == reference}
    pairs = [(r[metric], ref[r["seed"]]) for r in runs if r["method"] == method]
    return [value for value, _ in pairs], [value for _, value in pairs]


def seed_ratios(rows: Sequence[Mapping], group: Tuple[str, str], method: str, reference: str,
                metric: str) -> List[float]:
    """Per-seed ratios ``metric`` of ``method`` / of ``reference`` (``paired``)."""
    return [value / ref for value, ref in zip(*paired(rows, group, method, reference, metric))]


def ratio_text(row: Mapping[str, float], key: str) -> str:
    """'1.11x (1.00-1.11)': a ratio column with its p10-p90 spread, for a sentence."""
    return f"{row[key]:.2f}x ({row[f'{key}_p10']:.2f}-{row[f'{key}_p90']:.2f})"


def quality_finding(row: Mapping[str, float], key: str, per_seed: Sequence[float], what: str) -> Tuple[str, str]:
    """(the sentence, the verdict) for the ratio column ``key`` of ``row``: '{what} 1.11x (1.00-1.11): costs
    quality (2 of 3 seeds above 1)'; ``per_seed`` are the paired per-seed ratios, counted on the verdict's side
    where not all of them are."""
    seeds = len(per_seed)
    found = verdict(row[f"{key}_p10"], row[f"{key}_p90"], seeds)
    text = f"{what} {ratio_text(row, key)}: {found}"
    side = {QUALITY[0]: sum(r < 1 for r in per_seed), QUALITY[2]: sum(r > 1 for r in per_seed)}.get(found)
    if side is not None and side < seeds:
        text += f" ({side} of {seeds} seeds {'below' if found == QUALITY[0] else 'above'} 1)"
    return text, found


def speed_finding(row: Mapping[str, float], key: str) -> str:
    """'1.45x (1.41-1.49), slower': a step-time ratio (per timed round) with its verdict."""
    return f"{ratio_text(row, key)}, {verdict(row[f'{key}_p10'], row[f'{key}_p90'], 0, SPEED)}"


def names(items: Sequence[str]) -> str:
    """'1', '1 and 2', '1, 2 and 4'."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def grouped_verdicts(verdicts: Mapping[str, str], noun: str, nouns: str) -> str:
    """The verdicts of several candidates in one clause, grouped: 'windows 1 and 2 cost quality; window 4: no
    difference 3 seeds can see'; 'every window costs quality', 'no window made a difference 3 seeds can see'
    when they agree."""
    groups: Dict[str, List[str]] = {}
    for name, found in verdicts.items():
        groups.setdefault(found, []).append(name)
    if len(groups) == 1 and len(verdicts) > 1:
        ((found, _),) = groups.items()
        subject = f"every {noun}"
        return {QUALITY[2]: f"{subject} costs quality", QUALITY[0]: f"{subject} trained better"}.get(
            found, found.replace("no difference", f"no {noun} made a difference", 1))
    clauses = []
    for found, members in groups.items():
        plural = len(members) > 1
        subject = f"{nouns if plural else noun} {names(members)}"
        clauses.append({QUALITY[2]: f"{subject} {'cost' if plural else 'costs'} quality",
                        QUALITY[0]: f"{subject} trained better"}.get(found, f"{subject}: {found}"))
    return "; ".join(clauses)


def still_improving(rows: Sequence[Mapping], group: Tuple[str, str], metric: str,
                    higher_is_better: bool) -> Tuple[int, int]:
    """(methods whose mean curve improved from its second-to-last to its last evaluation, methods) in
    ``group``: how many were still improving when training stopped."""
    curves: Dict[str, List[float]] = {}
    for r in rows:
        if r["kind"] == "curve" and r[group[0]] == group[1]:
            curves.setdefault(r["method"], []).append(r[metric])
    rising = sum((c[-1] > c[-2]) == higher_is_better for c in curves.values() if len(c) > 1)
    return rising, len(curves)


def widest_spread(rows: Sequence[Mapping], keys: Sequence[str]) -> Optional[float]:
    """The widest p10-p90 spread of the ratio columns ``keys`` over ``rows`` (None when no row has one)."""
    widths = [r[f"{k}_p90"] - r[f"{k}_p10"] for r in rows for k in keys if f"{k}_p10" in r]
    return max(widths) if widths else None


def bullets(lines: Sequence[str]) -> List[str]:
    """Markdown list items."""
    return [f"- {line}" for line in lines]


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
