"""The benchmark runner's timing method (benchmarks.timing, Context.compare, the table): interleaving, warm-up,
paired spreads computed from the samples, straddling ratios flagged. A fake clock makes it exact; nothing here
measures speed."""

import itertools
import json
import math

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import runner
from benchmarks.runner import Context, format_table
from benchmarks.suites import attention
from benchmarks.timing import MIN_ROUNDS, Comparison, Ratio, Settings, format_ratio, measure


class FakeClock:
    """Each call of a candidate takes cost[name] virtual milliseconds (in order, cycling); now() is virtual time."""

    def __init__(self, costs):
        self.costs = {name: itertools.cycle(values) for name, values in costs.items()}
        self.elapsed_ms = 0.0

    def now(self):
        return self.elapsed_ms / 1e3

    def time_ms(self, fn, calls):
        total = 0.0
        for _ in range(calls):
            total += next(self.costs[fn()])
        self.elapsed_ms += total
        return total


def recording(log, *names):
    """Candidates that log their name when called and return it (for FakeClock)."""
    def candidate(name):
        def call():
            log.append(name)
            return name
        return call
    return {name: candidate(name) for name in names}


def runs(log):
    return [(name, len(list(group))) for name, group in itertools.groupby(log)]


def test_candidates_interleave_after_warmup():
    log = []
    clock = FakeClock({"a": [2.0], "b": [5.0], "c": [30.0]})
    result = measure(recording(log, "a", "b", "c"), Settings(repeats=4, warmup=2, min_sample_ms=10), clock)
    calls = {"a": 5, "b": 2, "c": 1}  # enough calls for 10 ms per sample
    expected = [("a", 1), ("b", 1), ("c", 1)] * 2  # the first call of each, then one timed call (calibration)
    expected += [(name, calls[name]) for _ in range(2 + 4) for name in "abc"]  # warm-up rounds, timed rounds
    assert runs(log) == expected
    assert result.calls_per_sample == calls
    assert result.samples == {"a": [2.0] * 4, "b": [5.0] * 4, "c": [30.0] * 4}
    assert result.rounds == 4 and result.ms == {"a": 2.0, "b": 5.0, "c": 30.0}


def test_spread_is_computed_from_paired_rounds():
    samples = {"reference": [10.0, 10.0, 10.0, 10.0, 10.0], "new": [5.0, 8.0, 10.0, 4.0, 20.0]}
    comparison = Comparison(samples, baseline="reference")
    # per-round reference / new: 2, 1.25, 1, 2.5, 0.5 -> sorted 0.5, 1, 1.25, 2, 2.5
    speedup = comparison.speedup("new")
    assert speedup.median == pytest.approx(1.25)
    assert speedup.p10 == pytest.approx(0.5 + 0.4 * 0.5)  # position 0.4 between 0.5 and 1
    assert speedup.p90 == pytest.approx(2.0 + 0.6 * 0.5)  # position 3.6 between 2 and 2.5
    assert speedup.rounds == 5
    assert comparison.ms == {"reference": 10.0, "new": 8.0}
    inverse = comparison.ratio("new", "reference")  # time ratio: new / reference, per round
    assert inverse.median == pytest.approx(0.8)


def test_ratio_pairs_samples_of_the_same_round():
    """Both candidates slow down together in round 2: the paired ratio does not move, unpaired ones would."""
    comparison = Comparison({"reference": [10.0, 40.0, 20.0], "new": [5.0, 20.0, 10.0]}, baseline="reference")
    speedup = comparison.speedup("new")
    assert (speedup.median, speedup.p10, speedup.p90) == (2.0, 2.0, 2.0)


def test_straddling_ratio_is_flagged_and_a_clear_winner_is_not():
    noisy = Comparison({"reference": [10.0] * 5, "new": [9.0, 11.0, 9.5, 10.5, 9.8]}, baseline="reference")
    straddling = noisy.speedup("new")
    assert straddling.p10 < 1.0 < straddling.p90 and not straddling.clear
    assert format_ratio(straddling.median, straddling.p10, straddling.p90).endswith(", ~)")
    winner = Comparison({"reference": [10.0] * 5, "new": [6.0, 6.5, 7.0, 6.2, 6.8]}, baseline="reference")
    clear = winner.speedup("new")
    assert clear.clear and clear.p10 > 1.0
    assert "~" not in format_ratio(clear.median, clear.p10, clear.p90)
    assert format_ratio(1.52, 1.41, 1.6) == "1.52x (1.41-1.60)"
    assert format_ratio(1.04, 0.93, 1.12) == "1.04x (0.93-1.12, ~)"
    assert format_ratio(0.8, 0.7, 0.9) == "0.80x (0.70-0.90)"  # clearly slower is a difference too


def test_table_shows_a_ratio_and_its_spread_as_one_cell():
    rows = [{"impl": "reference", "ms": 10.0},
            {"impl": "new", "ms": 8.0, **Ratio(1.25, 0.7, 2.3, 5).columns("speedup")},
            {"impl": "old", "ms": 5.0, **Ratio(2.0, 1.9, 2.1, 5).columns("speedup")}]
    table = format_table(rows)
    header, _, reference, new, old, legend = table.splitlines()
    assert header.split() == ["impl", "ms", "speedup"]
    assert reference.split()[-1] == "-"
    assert new.strip().endswith("1.25x (0.70-2.30, ~)")
    assert old.strip().endswith("2.00x (1.90-2.10)")
    assert "straddles 1.0" in legend
    lone = format_table([{"a": 1.0, "a_p10": 0.5}])  # not both companions: plain columns, no legend
    assert lone.splitlines()[0].split() == ["a", "a_p10"] and "ratios" not in lone


def test_budget_stops_rounds_but_keeps_a_minimum():
    clock = FakeClock({"a": [100.0], "b": [100.0]})  # 200 ms per round
    short = measure(recording([], "a", "b"), Settings(repeats=20, warmup=0, min_sample_ms=1, budget_s=0.05), clock)
    assert short.rounds == MIN_ROUNDS
    clock = FakeClock({"a": [100.0], "b": [100.0]})
    cut = measure(recording([], "a", "b"), Settings(repeats=20, warmup=0, min_sample_ms=1, budget_s=1.0), clock)
    assert cut.rounds == 5 and cut.seconds == pytest.approx(1.0)  # stops once a round spends the budget
    clock = FakeClock({"a": [100.0], "b": [100.0]})
    full = measure(recording([], "a", "b"), Settings(repeats=6, warmup=0, min_sample_ms=1, budget_s=None), clock)
    assert full.rounds == 6


def test_bad_settings_and_candidates_say_what_is_wrong():
    with pytest.raises(ValueError, match="repeats"):
        Settings(repeats=0)
    with pytest.raises(ValueError, match="budget_s"):
        Settings(budget_s=0)
    with pytest.raises(ValueError, match="baseline 'x'"):
        measure({"a": lambda: "a"}, Settings(), FakeClock({"a": [1.0]}), baseline="x")
    with pytest.raises(ValueError, match="same number"):
        Comparison({"a": [1.0, 2.0], "b": [1.0]})
    with pytest.raises(ValueError, match="over"):
        Comparison({"a": [1.0], "b": [1.0]}).speedup("a")


def test_context_compare_records_threads_and_rounds():
    ctx = Context(torch.device("cpu"), quick=True, settings=Settings(repeats=3, warmup=0, min_sample_ms=0.05))
    result = ctx.compare({"sum": lambda: sum(range(100)), "sorted": lambda: sorted(range(100))}, baseline="sum")
    assert result.threads == torch.get_num_threads() and result.rounds == 3
    assert all(len(values) == 3 and all(v > 0 for v in values) for values in result.samples.values())
    (record,) = ctx.comparisons
    assert record["rounds"] == 3 and set(record["candidates"]) == {"sum", "sorted"}
    json.dumps(record)
    assert f"CPU threads: {torch.get_num_threads()}" in ctx.timing_summary()


def test_attention_rows_carry_speedups_with_spread():
    """The attention suite's rows from one fast comparison (torch ops, tiny sizes): medians and ratio columns."""
    ctx = Context(torch.device("cpu"), quick=True, settings=Settings(repeats=3, warmup=0, min_sample_ms=0.05))
    x = [torch.randn(1, 2, 3, 1, 8, requires_grad=True) for _ in range(6)]
    flops = attention.attention_flops(1, 2, 3, 1, 8)
    ops = {"reference": (lambda *a: attention.pychop.parallel_st_attention(*a, backend="torch"), x, flops),
           "again": (lambda *a: attention.pychop.parallel_st_attention(*a, backend="torch"), x, flops)}
    reference, again = attention.timed_rows(ctx, ops, {"ref": "reference"})
    assert reference["fwd_vs_ref"] is None and len(ctx.comparisons) == 2
    for key in ("fwd_vs_ref", "fwdbwd_vs_ref"):
        assert again[f"{key}_p10"] <= again[key] <= again[f"{key}_p90"]
    assert all(math.isfinite(again[key]) and again[key] > 0 for key in ("fwd_ms", "fwdbwd_ms"))


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cli_options_reach_the_settings(monkeypatch, restore_threads, tmp_path):
    seen = {}
    monkeypatch.setattr(cli, "run_suites", lambda names, device, quick, out, settings, smoke, command: seen.update(
        names=names, settings=settings, smoke=smoke, threads=torch.get_num_threads(), command=command))
    cli.main(["--device", "cpu", "--suite", "attention", "--repeats", "5", "--warmup", "0", "--budget", "0",
              "--threads", "1", "--out", str(tmp_path)])
    assert seen["names"] == ["attention"] and seen["threads"] == 1
    assert seen["command"] == ["python", "-m", "benchmarks", "--device", "cpu", "--suite", "attention", "--repeats",
                               "5", "--warmup", "0", "--budget", "0", "--threads", "1", "--out", str(tmp_path)]
    assert seen["settings"] == Settings(repeats=5, warmup=0, min_sample_ms=10.0, budget_s=None)
    cli.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    assert seen["settings"] == runner.default_settings(torch.device("cpu"), quick=True) and not seen["smoke"]
    cli.main(["--device", "cpu", "--smoke", "--out", str(tmp_path)])
    assert seen["settings"] == runner.default_settings(torch.device("cpu"), smoke=True) and seen["smoke"]
    with pytest.raises(SystemExit):
        cli.main(["--device", "cpu", "--repeats", "0", "--out", str(tmp_path)])


def test_attention_suite_prints_one_table_per_comparison_once(monkeypatch, tmp_path, capsys):
    """The suite at its smoke size (the cpp backend only: Triton's interpreter is slow): its tables (spatial,
    temporal, the op against both references, auto against the torch backend) printed once each, no empty column;
    report() makes one Markdown table per comparison from the JSON."""
    if attention.pychop.available_backends("cpu")["cpp"] is not None:
        pytest.skip("needs the cpp backend")
    monkeypatch.setattr(attention, "fused_backends", lambda ctx: ["cpp"])
    settings = Settings(repeats=MIN_ROUNDS, warmup=0, min_sample_ms=0.05, budget_s=0.2)
    runner.run_suites(["attention"], torch.device("cpu"), quick=False, out_dir=tmp_path, settings=settings, smoke=True)
    printed = capsys.readouterr().out
    for title in attention.TITLES.values():
        if "Triton" not in title:
            assert printed.count(title) == 1, title
    result = json.loads((tmp_path / "attention.json").read_text())
    comparisons = {row["comparison"] for row in result["rows"]}
    assert comparisons == {"spatial", "temporal", "op", "auto"}
    ops = {row["impl"] for row in result["rows"] if row["comparison"] == "op"}
    assert {"diffusers default", "torch backend", "cpp sdpa", "cpp kernel"} <= ops
    assert any(impl.startswith("best unfused (") for impl in ops)
    (auto,) = [row for row in result["rows"] if row["comparison"] == "auto"]
    assert "cpp, spatial branch through SDPA" in auto["takes"] and isinstance(auto["no_slower"], bool)
    assert auto["fwdbwd_vs_torch_p10"] <= auto["fwdbwd_vs_torch"] <= auto["fwdbwd_vs_torch_p90"]
    markdown = attention.report(result)
    assert markdown.count("\n### ") + markdown.startswith("### ") == 4  # a heading per table
    tables = [block for block in markdown.split("\n\n") if block.startswith("|")]
    assert len(tables) == 4
    for block in tables:
        header, _, *cells = block.splitlines()
        columns = list(zip(*[line.strip("|").split(" | ") for line in cells]))
        assert len(columns) == header.count("|") - 1
        assert all(any(value.strip() != "-" for value in column) for column in columns), block
