"""Benchmark output a person reads, and docs that cannot drift from the results: the machine record in every
suite JSON, tables without empty columns (one per comparison), plots that say when a panel has no data, and
docs/benchmarks.md equal to what ``python -m benchmarks.report`` generates from the committed results."""

import json
import pathlib
import types

import pytest
import torch

from benchmarks import machine, report, runner
from benchmarks.suites import attention_sweep, chopgrad, mobius
from benchmarks.tables import Table, format_table, markdown, markdown_table
from benchmarks.timing import Ratio

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*/*.json"))


def test_docs_benchmarks_is_what_the_report_generates():
    """docs/benchmarks.md is generated from benchmarks/results: edit a result or the report code, regenerate."""
    assert RESULTS, "no committed results in benchmarks/results/<machine>/"
    generated = report.generate()
    assert (ROOT / "docs" / "benchmarks.md").read_text() == generated, "run: python -m benchmarks.report"
    assert report.main(["--check"]) == 0


@pytest.mark.parametrize("path", RESULTS, ids=[f"{p.parent.name}/{p.name}" for p in RESULTS])
def test_committed_results_name_their_machine_command_and_date(path):
    record = json.loads(path.read_text())["machine"]
    assert record["command"].startswith("python -m benchmarks")
    assert record["cpu"] and record["cpu_capability"] and record["date"] and record["torch"]
    ((name, result),) = report.results_in(path)
    section = report.section(name, result, path.parent)
    assert record["command"] in section and record["date"] in section and machine.describe(record) in section


def test_a_result_without_machine_record_is_refused(tmp_path):
    folder = tmp_path / "some-machine"
    folder.mkdir()
    (folder / "chopgrad.json").write_text(json.dumps({"suite": "chopgrad", "rows": []}))
    with pytest.raises(SystemExit, match="no machine record"):
        report.generate(tmp_path)


def test_a_gpu_check_call_gives_a_section_per_suite(tmp_path):
    """scripts/gpu_check.py's <call>.json, committed as it comes back: each suite stage's result is a section,
    with the PNG the check copied beside it."""
    folder = tmp_path / "NVIDIA H200"
    folder.mkdir()
    record = dict(machine.machine_record(torch.device("cpu"), ["python", "-m", "benchmarks", "--suite",
                                                               "attention_sweep"]), gpu="NVIDIA H200")
    call = {"stages": {"environment": {"status": "done", "results": {"gpu": "NVIDIA H200"}},
                       "attention-sweep": {"status": "done", "results": {"suite": "attention_sweep",
                                                                         "machine": record, "rows": sweep_rows()}},
                       "attention-suite": {"status": "cut off by its 60 s limit", "results": None}}}
    (folder / "first.json").write_text(json.dumps(call))
    (folder / "attention_sweep.png").write_bytes(b"png")
    text = report.generate(tmp_path, tmp_path / "benchmarks.md")
    assert text.count("\n## ") == 1 and "## NVIDIA H200: attention_sweep" in text
    assert "Machine: NVIDIA H200" in text and "| triton | 1 |" in text
    assert "![attention_sweep](NVIDIA%20H200/attention_sweep.png)" in text


def test_check_fails_when_the_doc_is_stale(tmp_path):
    folder = tmp_path / "results" / "cpu-x"
    folder.mkdir(parents=True)
    payload = {"suite": "attention_sweep", "machine": machine.machine_record(torch.device("cpu"), ["python", "-m",
                                                                                                 "benchmarks"]),
               "rows": [{"sweep": "T x grad window", "note": "skipped"}]}
    (folder / "attention_sweep.json").write_text(json.dumps(payload))
    doc = tmp_path / "benchmarks.md"
    assert report.main(["--results", str(tmp_path / "results"), "--out", str(doc), "--check"]) == 1
    assert report.main(["--results", str(tmp_path / "results"), "--out", str(doc)]) == 0
    assert report.main(["--results", str(tmp_path / "results"), "--out", str(doc), "--check"]) == 0
    doc.write_text(doc.read_text().replace("skipped", "typed by hand"))
    assert report.main(["--results", str(tmp_path / "results"), "--out", str(doc), "--check"]) == 1


def test_machine_record_names_cpu_capability_command_and_load():
    record = machine.finish(machine.machine_record(torch.device("cpu"), ["python", "-m", "benchmarks", "--out",
                                                                         "a b"]))
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["command"] == "python -m benchmarks --out 'a b'" and record["gpu"] is None
    assert {"cpu", "cpu_count", "torch_threads", "torch", "triton", "python", "date", "load_start",
            "load_end"} <= set(record)
    line = machine.describe(record)
    assert record["cpu"] in line and record["cpu_capability"] in line and f"{record['cpu_count']} cores" in line
    gpu = dict(record, gpu="NVIDIA H200")
    assert machine.describe(gpu).startswith("NVIDIA H200")


def test_tables_leave_out_empty_columns_and_show_ratios_as_one_cell():
    rows = [{"impl": "a", "peak_mb": None, "ms": 2.0, "unused": None},
            {"impl": "b", "ms": 1.0, "peak_mb": None, **Ratio(2.0, 1.9, 2.1, 5).columns("speedup")}]
    header = format_table(rows).splitlines()[0].split()
    assert header == ["impl", "ms", "speedup"]
    lines = markdown_table(rows).splitlines()
    assert lines[:2] == ["| impl | ms | speedup |", "|---|---|---|"]
    assert lines[2] == "| a | 2 | - |" and lines[3] == "| b | 1 | 2.00x (1.90-2.10) |"
    assert "straddles 1.0" in lines[-1]
    assert markdown(Table("title", [{"a|b": "x"}], "a note")).split("\n\n") == ["### title", "a note",
                                                                                "| a\\|b |\n|---|\n| x |"]


class PrintingSuite:
    """A suite that prints its one table as it measures it (as the GPU check's suites must)."""

    __name__ = "benchmarks.suites.printing"
    DESCRIPTION = "prints as it goes"

    @staticmethod
    def run(ctx):
        rows = [{"impl": "x", "ms": 1.0}]
        ctx.print_rows(rows, "as it goes")
        return rows


class GroupedSuite:
    """A suite whose rows the runner prints as two tables, one per comparison."""

    __name__ = "benchmarks.suites.grouped"
    DESCRIPTION = "two comparisons"

    @staticmethod
    def run(ctx):
        return [{"group": 1, "ms": 1.0, "peak_mb": None}, {"group": 2, "ms": 2.0, "peak_mb": None}]

    @staticmethod
    def tables(rows):
        return [Table(f"comparison {g}", [r for r in rows if r["group"] == g]) for g in (1, 2)]


def test_runner_writes_the_machine_record_and_prints_each_table_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(runner, "discover", lambda: {"printing": PrintingSuite, "grouped": GroupedSuite})
    command = ["python", "-m", "benchmarks", "--device", "cpu"]
    runner.run_suites([], torch.device("cpu"), quick=True, out_dir=tmp_path, command=command)
    out = capsys.readouterr().out
    assert out.count("-- as it goes") == 1 and out.count("impl") == 1  # printed by the suite, not again
    assert out.count("-- comparison 1") == 1 and out.count("-- comparison 2") == 1
    assert "peak_mb" not in out  # an empty column says nothing
    for name in ("printing", "grouped"):
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        assert payload["machine"]["command"] == "python -m benchmarks --device cpu"
        assert payload["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_summary_prints_a_results_folder_by_comparison(monkeypatch, tmp_path, capsys):
    from benchmarks import summary

    monkeypatch.setattr(runner, "discover", lambda: {"grouped": GroupedSuite})
    monkeypatch.setattr(summary, "discover", lambda: {"grouped": GroupedSuite})
    runner.run_suites([], torch.device("cpu"), quick=True, out_dir=tmp_path)
    capsys.readouterr()
    summary.main(tmp_path)
    out = capsys.readouterr().out
    assert "grouped on " in out and out.count("-- comparison") == 2


def sweep_rows():
    """attention_sweep rows as a GPU writes them (two frame counts, two backends)."""
    rows = []
    for T in (8, 16):
        for impl in ("triton", "torch"):
            for k in (1, "T"):
                row = {"sweep": "T x grad window", "impl": impl, "T": T, "k": k, "fwd_ms": 1.0, "bwd_ms": 2.0 * T,
                       "fwdbwd_ms": 3.0, "peak_mb": 10.0}
                if impl == "triton":
                    row.update(Ratio(1.5, 1.4, 1.6, 20).columns("fwdbwd_speedup"), bwd_dq_kernel_ms=0.5,
                               bwd_dkdv_kernel_ms=0.7)
                rows.append(row)
    return rows


def test_attention_sweep_tables_and_plot(tmp_path):
    tables = attention_sweep.tables(sweep_rows())
    assert [t.title.split(",")[1].strip() for t in tables] == ["T = 8", "T = 16"]
    assert all(len(t.rows) == 4 and "T" not in t.rows[0] and "sweep" not in t.rows[0] for t in tables)
    assert "| triton | 1 |" in attention_sweep.report({"rows": sweep_rows()})
    skipped = attention_sweep.run(runner.Context(torch.device("cpu"), quick=True))
    assert [t.title for t in attention_sweep.tables(skipped)] == ["skipped"]
    for rows, name in ((sweep_rows(), "gpu.png"), (skipped, "cpu.png")):
        attention_sweep.plot(rows, tmp_path / name)
        assert (tmp_path / name).stat().st_size > 0


def test_no_data_note_is_written_in_the_panel():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.plots import no_data

    fig, ax = plt.subplots()
    no_data(ax, "needs a GPU")
    assert [text.get_text() for text in ax.texts] == ["no data:\nneeds a GPU"]
    plt.close(fig)


def test_chopgrad_and_mobius_tables_from_committed_results(tmp_path):
    """One table per comparison, none wider than a wide terminal, the fidelity rows their own tables."""
    found = {path.stem: json.loads(path.read_text()) for path in RESULTS if path.parent.name == "cpu-epyc-avx2"}
    assert {"chopgrad", "mobius"} <= set(found)
    tables = chopgrad.tables(found["chopgrad"]["rows"])
    titles = [t.title for t in tables]
    assert sum("gradient against full backpropagation" in title for title in titles) == 1
    assert sum("per segment" in title for title in titles) == 2
    mobius_tables = mobius.tables(found["mobius"]["rows"])
    for table in tables + mobius_tables:
        assert max(map(len, format_table(table.rows).splitlines())) <= 160, table.title
    chopgrad.plot(found["chopgrad"]["rows"], tmp_path / "chopgrad.png")
    mobius.plot(found["mobius"]["rows"], tmp_path / "mobius.png")
    assert (tmp_path / "chopgrad.png").stat().st_size > 0 and (tmp_path / "mobius.png").stat().st_size > 0


def test_suite_tables_default_to_one_table():
    module = types.SimpleNamespace(__name__="benchmarks.suites.plain")
    (table,) = runner.suite_tables(module, [{"a": 1}])
    assert table.title == "plain" and table.rows == [{"a": 1}]


def test_floors_says_what_the_shapes_are(capsys):
    from benchmarks import floors

    floors.main([])
    out = capsys.readouterr().out
    assert "batch, frames, tokens per frame" in out
    for name, shape in floors.DESIGN_SHAPES.items():
        assert f"{name:<3}{str(shape):<24}{floors.SHAPE_NOTES[name]}" in out


@pytest.mark.slow  # runs the prediction suite: seconds
def test_frame_scaling_prediction_suite_reports_a_table_per_gpu():
    """The NVLink prediction comes to docs/benchmarks.md from its suite's result: one table per GPU, the one-GPU
    row of each frame count the reference of its speed-up."""
    from benchmarks.floors import GPUS
    from benchmarks.suites import frame_scaling_prediction
    ctx = runner.Context(torch.device("cpu"), quick=False, smoke=True)
    rows = frame_scaling_prediction.run(ctx)
    assert {row["gpu"] for row in rows} == {ceilings.name for ceilings in GPUS.values()}
    assert all(row["speed_up"] == 1.0 for row in rows if row["ranks"] == 1)
    sharded = [row for row in rows if row["ranks"] > 1]
    assert sharded and all(row["sent_GB"] > 0 and row["collectives"] > 0 for row in sharded)
    text = frame_scaling_prediction.report({"rows": rows})
    assert text.count("| frames | GPUs |") == len(GPUS) and "A prediction, not a measurement" in text
    assert [table.rows for table in frame_scaling_prediction.tables(rows)] == frame_scaling_prediction.by_gpu(rows)
