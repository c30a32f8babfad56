"""The training-outcome suites at their smoke sizes (every code path, seconds) and their shared bookkeeping."""

import copy
import json

import pytest
import torch

from benchmarks.outcomes import QUALITY, SPEED, range_cell, ratio_cell, summary_rows, verdict
from benchmarks.runner import Context
from benchmarks.synthetic_video import moving_shapes
from benchmarks.timing import Ratio, Settings

SMOKE = Settings(repeats=3, warmup=0, min_sample_ms=0.1, budget_s=0.5)


def smoke_run(module):
    threads = torch.get_num_threads()
    try:
        ctx = Context(torch.device("cpu"), quick=False, settings=SMOKE, smoke=True)
        rows = module.run(ctx)
    finally:
        torch.set_num_threads(threads)
    json.dumps(rows)  # flat, JSON-ready
    return rows


@pytest.fixture(scope="module")
def chopgrad_rows():
    from benchmarks.suites import chopgrad_outcome
    return smoke_run(chopgrad_outcome)


@pytest.fixture(scope="module")
def mobius_rows():
    from benchmarks.suites import mobius_outcome
    return smoke_run(mobius_outcome)


def test_synthetic_videos_are_deterministic_and_move():
    first = moving_shapes(2, 5, 16, torch.Generator().manual_seed(3))
    again = moving_shapes(2, 5, 16, torch.Generator().manual_seed(3))
    other = moving_shapes(2, 5, 16, torch.Generator().manual_seed(4))
    assert first.shape == (2, 3, 5, 16, 16) and torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= -1 and first.max() <= 1
    assert (first[:, :, 1:] - first[:, :, :-1]).abs().mean() > 1e-3  # frames differ: things move
    assert moving_shapes(1, 2, 8, torch.Generator(), channels=4).shape == (1, 4, 2, 8, 8)


def test_summary_rows_pair_runs_of_the_same_seed():
    finals = {"base": [{"mse": 2.0}, {"mse": 4.0}, {"mse": 1.0}], "new": [{"mse": 1.0}, {"mse": 1.0}, {"mse": 1.0}]}
    curves = {"base": [[(0, 5.0), (10, 2.0)], [(0, 5.0), (10, 4.0)], [(0, 5.0), (10, 1.0)]],
              "new": [[(0, 5.0), (10, 1.0)]] * 3}
    rows = summary_rows({"task": "t"}, finals, curves, metrics=("mse",), ratios=("mse",),
                        references={"base": "base"}, curve_metric="mse")
    base, new = [r for r in rows if r["kind"] == "outcome"]
    assert (base["mse"], base["mse_lo"], base["mse_hi"]) == (7 / 3, 1.0, 4.0) and "mse_vs_base" not in base
    assert new["mse_vs_base"] == 0.5  # per-seed ratios 0.5, 0.25, 1: the median
    assert new["mse_vs_base_p10"] == pytest.approx(0.3) and new["mse_vs_base_p90"] == pytest.approx(0.9)
    assert ratio_cell(new, "mse_vs_base") == "0.50x (0.30-0.90)" and ratio_cell(base, "mse_vs_base") == "1"
    assert range_cell(base, "mse", ".1f") == "2.3 (1.0-4.0)"
    curve = [(r["method"], r["step"], r["mse"]) for r in rows if r["kind"] == "curve"]
    assert curve == [("base", 0, 5.0), ("base", 10, 7 / 3), ("new", 0, 5.0), ("new", 10, 1.0)]


def test_verdicts_follow_the_spread_over_seeds():
    """A ratio (lower is better) costs quality only when its whole p10-p90 spread lies above 1."""
    assert verdict(1.01, 1.2, 3) == "costs quality" and verdict(0.8, 0.99, 3) == "better"
    assert verdict(0.9, 1.1, 3) == verdict(1.0, 1.3, 3) == verdict(0.7, 1.0, 3) == "no difference 3 seeds can see"
    assert [verdict(a, b, 0, SPEED) for a, b in ((1.1, 1.2), (0.9, 1.1), (0.5, 0.9))] == list(SPEED[::-1])
    assert QUALITY[2] == "costs quality"


def with_ratios(rows, group, method, reference, metric, label, factors):
    """A copy of ``rows`` where ``method``'s per-seed ``metric`` is ``reference``'s times ``factors`` (one per
    seed), its outcome row's ``{metric}_vs_{label}`` columns recomputed from them: a result of known ratios."""
    rows = copy.deepcopy(rows)
    key, value = group
    seeds = {r["seed"]: r for r in rows if r["kind"] == "seed" and r[key] == value and r["method"] == method}
    ref = {r["seed"]: r[metric] for r in rows if r["kind"] == "seed" and r[key] == value and r["method"] == reference}
    for (seed, row), factor in zip(sorted(seeds.items()), factors, strict=True):
        row[metric] = ref[seed] * factor
    (outcome,) = [r for r in rows if r["kind"] == "outcome" and r[key] == value and r["method"] == method]
    outcome.update(Ratio.of([seeds[s][metric] for s in sorted(seeds)], [ref[s] for s in sorted(seeds)])
                   .columns(f"{metric}_vs_{label}"))
    return rows


def test_chopgrad_outcome_findings_say_which_window_costs_quality(chopgrad_rows):
    """The findings' words follow the ratios: a window whose per-seed MSE ratios to full backpropagation all lie
    above 1 costs quality, one whose spread holds 1 makes no difference the seeds can see, one below trained
    better; each with its ratio and spread."""
    from benchmarks.suites import chopgrad_outcome
    group = ("task", "inpainting")
    rows = with_ratios(chopgrad_rows, group, "chopgrad 1", "pixel full", "mse", "full", (1.2, 1.3))
    rows = with_ratios(rows, group, "chopgrad 2", "pixel full", "mse", "full", (0.9, 1.1))
    rows = with_ratios(rows, group, "chopgrad 4", "pixel full", "mse", "full", (0.8, 0.9))
    text = chopgrad_outcome.report({"rows": rows})
    (inpainting,) = [line for line in text.splitlines() if line.startswith("- **inpainting**")]
    assert ("held-out MSE: window 1 costs quality; window 2: no difference 2 seeds can see; window 4 trained "
            "better;") in inpainting
    assert "on inpainting, window 1 cost held-out quality against full backpropagation (window 1: MSE 1.25x" in text
    assert "- window 1: held-out MSE 1.25x (1.21-1.29): costs quality;" in text
    assert "- window 2: held-out MSE 1.00x (0.92-1.08): no difference 2 seeds can see;" in text
    assert "- window 4: held-out MSE 0.85x (0.81-0.89): better;" in text
    assert "**What the run found**" in text and "Limits: 2 seeds" in text


def test_mobius_outcome_findings_say_whether_a_form_costs_quality(mobius_rows):
    """A form whose per-seed loss ratios to the serial form all lie above 1 costs quality; an option that ends
    exactly where its base form did is said to change what is saved, not the function."""
    from benchmarks.suites import mobius_outcome
    group, rows = ("model", "VideoUNet"), mobius_rows
    for form, *_ in mobius_outcome.UNET_FORMS[1:]:  # the options end exactly where parallel does
        rows = with_ratios(rows, group, form, "serial", "loss", "serial", (1.1, 1.2))
        rows = with_ratios(rows, group, form, "serial", "tdiff", "serial", (1.0, 1.0))
    text = mobius_outcome.report({"rows": rows})
    assert "**In short**: on VideoUNet, `parallel` cost quality against `serial` (held-out loss 1.15x" in text
    assert "- `parallel`: held-out loss 1.15x (1.11-1.19): costs quality; temporal error 1.00x (1.00-1.00): no " \
           "difference 2 seeds can see;" in text
    assert "held-out loss: every form costs quality; temporal error: no form made a difference 2 seeds can see." in text
    (lean,) = [line for line in text.splitlines() if line.startswith("  - `parallel+lean_frozen`")]
    assert "the same final metrics as `parallel` in every seed, to the bit" in lean


def test_chopgrad_outcome_smoke(chopgrad_rows, tmp_path):
    from benchmarks.suites import chopgrad_outcome
    rows = chopgrad_rows
    outcome = {(r["task"], r["method"]): r for r in rows if r["kind"] == "outcome"}
    assert set(outcome) == {(task, method) for task in chopgrad_outcome.TASKS for method in chopgrad_outcome.METHODS}
    assert all(r["seeds"] == chopgrad_outcome.SMOKE_SIZE.seeds for r in outcome.values())
    assert "mse_vs_latent" in outcome["inpainting", "chopgrad 1"] and "mse_vs_full" in outcome["inpainting", "latent"]
    cost = {r["method"]: r for r in rows if r["kind"] == "cost"}
    # at 3 segments, window 1 keeps one segment's activations where full backpropagation keeps all three
    assert cost["chopgrad 1 retain"]["saved_mb"] < 0.75 * cost["pixel full"]["saved_mb"]
    assert cost["chopgrad 1 recompute"]["saved_mb"] < 0.75 * cost["pixel full"]["saved_mb"]
    assert cost["latent"]["saved_mb"] < cost["chopgrad 1 retain"]["saved_mb"]
    # every method starts from the same generator: the same held-out PSNR at step 0
    starts = {(r["task"], r["method"]): r["psnr_db"] for r in rows if r["kind"] == "curve" and r["step"] == 0}
    for task in chopgrad_outcome.TASKS:
        assert len({starts[task, method] for method in chopgrad_outcome.METHODS}) == 1
    text = chopgrad_outcome.report({"rows": rows})
    assert "| chopgrad 4 |" in text and "| chopgrad 2 recompute |" in text
    chopgrad_outcome.plot(rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_mobius_outcome_smoke(mobius_rows, tmp_path):
    from benchmarks.suites import mobius_outcome
    rows = mobius_rows
    forms = {r["model"]: [] for r in rows if r["kind"] == "outcome"}
    for r in rows:
        if r["kind"] == "outcome":
            forms[r["model"]].append(r["method"])
    assert forms["VideoUNet"] == [form[0] for form in mobius_outcome.UNET_FORMS]
    assert forms.get("UNetMotionModel", list(mobius_outcome.MOTION_FORMS)) == list(mobius_outcome.MOTION_FORMS)
    # zero-initialised temporal output projections: every form starts as the same function
    for model in forms:
        starts = [r["loss"] for r in rows if r["kind"] == "curve" and r["model"] == model and r["step"] == 0]
        assert len(starts) == len(forms[model]) and max(starts) - min(starts) < 1e-6 * max(starts)
    # and training moves them (the temporal layers get gradients)
    ends = [r["loss"] for r in rows if r["kind"] == "curve" and r["model"] == "VideoUNet" and r["step"] > 0]
    assert all(end != starts[0] for end in ends)
    cost = {(r["model"], r["method"]): r for r in rows if r["kind"] == "cost"}
    assert all(r["saved_mb"] > 0 and r["step_ms"] > 0 for r in cost.values())
    assert "saved_vs_serial" in cost["VideoUNet", "parallel"] and "time_vs_serial" in cost["VideoUNet", "parallel"]
    text = mobius_outcome.report({"rows": rows})
    assert "| parallel+lean_frozen |" in text
    mobius_outcome.plot(rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_full_size_runs_through_the_runner(monkeypatch, tmp_path):
    """`python -m benchmarks.suites.<suite>` is the full size: the suite's full_run set, the runner called."""
    from benchmarks import outcomes, runner
    from benchmarks.suites import mobius_outcome
    seen = {}
    monkeypatch.setattr(runner, "run_suites", lambda names, device, quick, out, settings: seen.update(
        names=names, device=device, out=out, full=mobius_outcome.full_run))
    monkeypatch.setattr(mobius_outcome, "full_run", False)
    threads = torch.get_num_threads()
    try:
        outcomes.run_full("mobius_outcome", ["--device", "cpu", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert seen == {"names": ["mobius_outcome"], "device": torch.device("cpu"), "out": tmp_path, "full": True}
