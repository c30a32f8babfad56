"""The training-outcome suites at their smoke sizes (every code path, seconds) and their shared bookkeeping."""

import json

import pytest
import torch

from benchmarks.outcomes import range_cell, ratio_cell, summary_rows
from benchmarks.runner import Context
from benchmarks.synthetic_video import moving_shapes
from benchmarks.timing import Settings

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
