"""The GPU check's runbook, rehearsed on the CPU: every stage of each call runs (at tiny sizes, Triton in its
interpreter, cpp for the extension), writes its results the moment it ends, and the files fit what can come back
from the GPU machine (at most 8 files of at most 16 MiB, no more than two folders below $OUT). A stage cut off
by its limit says so, and the next one still runs."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2 ** 20


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def files_below(folder: Path):
    return [path for path in folder.rglob("*") if path.is_file()]


def test_each_call_fits_its_window(gpu_check):
    """Stage budgets add up to at most the call's budget: 7 minutes for the first call, 5 for the second, under the
    10 a command may run."""
    for call, minutes in (("first", 7), ("second", 5)):
        assert sum(stage.budget_s for stage in gpu_check.PLAN[call]) <= gpu_check.CALL_BUDGET_S[call] <= minutes * 60


def test_a_stage_cut_off_says_so_and_the_next_runs(gpu_check, tmp_path, monkeypatch):
    # the correctness stage takes many seconds even at rehearsal sizes (torch, the interpreter): surely cut off
    plan = [gpu_check.Stage("triton-correctness", 1, "cut off after 1 s"),
            gpu_check.Stage("environment", 60, "then this")]
    monkeypatch.setitem(gpu_check.PLAN, "first", plan)
    report = gpu_check.run_call("first", rehearse=True, out=tmp_path)
    assert report["stages"]["triton-correctness"]["status"] == "cut off by its 1 s limit"
    assert report["stages"]["environment"]["status"] == "done"
    assert report["stages"]["environment"]["results"]["commit"]
    written = json.loads((tmp_path / "first.json").read_text())
    assert list(written["stages"]) == ["triton-correctness", "environment"]
    log = (tmp_path / "first.log").read_text()
    assert "== triton-correctness" in log and "== environment" in log
    assert "cut off" in gpu_check.summary(tmp_path)


def test_gpu_test_selection(gpu_check):
    """On the CPU every gpu test is skipped, so the rehearsal cannot see what the selection leaves out: collect it
    (the cuda cases of the conformance suite are collected here too) and check bf16 and float32 are in, fp16 out,
    and the largest head dims are run in bf16."""
    import subprocess

    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-k",
               gpu_check.GPU_TEST_SELECTION, *gpu_check.GPU_TEST_FILES]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    conformance = [test_id for test_id in ids if test_id.startswith("tests/test_attention_conformance.py")]
    assert any("cuda" in i and "-bf16]" in i for i in conformance), result.stdout[-2000:]
    assert any("cuda" in i and "-fp32]" in i for i in conformance)
    assert not any("fp16" in i or "benchmark_shapes" in i or "sanitizer" in i for i in ids)
    for path in ("sdpa", "kernel"):
        assert f"tests/test_attention_conformance.py::test_head_dims[cuda-{path}-256-bf16]" in ids
    assert any(i.startswith("tests/test_chopgrad_gpu.py") for i in ids)


@pytest.mark.slow
@pytest.mark.parametrize("call", ["first", "second"])
def test_rehearsal(gpu_check, call, tmp_path):
    """Both calls end to end on the CPU: every stage done, each well under its GPU budget here at tiny sizes."""
    report = gpu_check.run_call(call, rehearse=True, out=tmp_path)
    for stage in gpu_check.PLAN[call]:
        entry = report["stages"][stage.name]
        log = (tmp_path / f"{call}.log").read_text()
        assert entry["status"] == "done", f"{stage.name}: {entry['status']}\n{log[-3000:]}"
    if call == "first":
        for stage in ("triton-correctness", "cuda-correctness"):
            results = report["stages"][stage]["results"]
            assert results["passed"], results
            assert {case["spatial_path"] for case in results["cases"]} == {"sdpa", "kernel", "auto"}
        assert report["stages"]["check"]["results"]["check_passed"], report["stages"]["check"]["results"]
        rows = report["stages"]["attention-suite"]["results"]["rows"]
        ops = {row["impl"] for row in rows if row.get("comparison") == "op"}
        assert {"diffusers default", "triton sdpa", "triton kernel", "cpp sdpa", "cpp kernel"} <= ops
        assert any(impl.startswith("best unfused") for impl in ops)
    else:
        tests = report["stages"]["gpu-tests"]["results"]
        assert tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0
    files = files_below(tmp_path)
    assert len(files) <= MAX_FILES and all(path.stat().st_size <= MAX_FILE_BYTES for path in files)
    assert all(len(path.relative_to(tmp_path).parts) <= 3 for path in files)
    assert {f"{call}.log", f"{call}.json"} <= {path.name for path in files}
    print(gpu_check.summary(tmp_path), file=sys.stderr)
