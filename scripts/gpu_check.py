"""The GPU check: what one short GPU window (15 minutes, its start included; 10 minutes a command) must bring
back, in order of value, in two calls. Run through scripts/gpu_check.sh (see its header for the plan).

    python scripts/gpu_check.py first|second [--rehearse] [--out DIR]

Each stage runs in its own process under its own time limit (shrunk to what is left of the call's budget). The
moment a stage ends, cut off or not, its results go into DIR/<call>.json and its output into DIR/<call>.log; a
stage cut off by its limit says so and the next one runs. The summary table prints last. Files: <call>.log,
<call>.json and the suites' PNGs (first: attention.png, attention_sweep.png; second: chopgrad.png, mobius.png),
8 files in all, directly in DIR.

With --rehearse the same stages run at tiny sizes on the CPU (Triton in its interpreter, the extension's cpp
kernels in place of its cuda ones), so that the stage logic, the limits and the files are tested without a GPU;
each stage prints its wall time against its GPU budget.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parent.parent
CALL_BUDGET_S = {"first": 420, "second": 300}


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int
    purpose: str


ENVIRONMENT = Stage("environment", 20, "GPU, driver, torch, triton, commit")
INSTALL = "pip install --no-deps --no-build-isolation -e . (no downloads)"
PLAN: Dict[str, List[Stage]] = {
    "first": [
        ENVIRONMENT,
        Stage("install", 25, INSTALL),
        Stage("triton-correctness", 130, "triton at shapes A-F, bf16 on both spatial paths and fp16 on auto's: out "
                                         "and six gradients vs float32 torch"),
        Stage("cuda-correctness", 45, "cuda (after its build), the same cases, vs float32 torch"),
        Stage("check", 45, "python -m pychop.check: every backend on both spatial paths, bf16 and float32, vs float64, "
                           "times, the path auto takes"),
        Stage("attention-suite", 115, "fused backends per spatial path vs diffusers' default and the best unfused "
                                      "composition, the branches per SDPA backend, auto vs torch; fwd and fwd+bwd"),
        Stage("attention-sweep", 40, "the temporal branch over T = 8 ... 256 and grad window k in {1, 4, T}"),
    ],
    "second": [
        ENVIRONMENT,
        Stage("install", 20, INSTALL),
        Stage("chopgrad-suite", 90, "ChopGrad: peak allocator memory vs frames, step time"),
        Stage("mobius-suite", 60, "Mobius: step time, peak memory, saved bytes of every form, lean_frozen too"),
        Stage("gpu-tests", 60, "the representative gpu tests (conformance scenarios, models, compile, chopgrad)"),
        Stage("sanitizer", 50, "compute-sanitizer memcheck and racecheck on the cuda and triton kernels, bf16"),
    ],
}

# Timing of each suite on the GPU, sized to its stage: the attention kernels run 0.1-20 ms (10 rounds of >= 1 ms
# samples); a chopgrad or mobius step takes 0.1-2 s (3 rounds, at most 5 s of rounds per comparison).
SUITE_SETTINGS = {"attention": ["--repeats", "10"], "attention_sweep": ["--repeats", "5"],
                  "chopgrad": ["--quick", "--repeats", "3", "--budget", "5"],
                  "mobius": ["--repeats", "3", "--budget", "5"]}
# Shapes for correctness: the benchmark shapes on the GPU; on the CPU (rehearsal) a tiny one. Options: every frame
# (what the attention suite times) and a window with a grad window (causal, window and the gradient band).
REHEARSAL_SHAPES = {"tiny": (1, 5, 12, 2, 24)}
CORRECTNESS_OPTIONS = [{}, dict(window=8, grad_window=4)]
# (dtype, spatial paths): bf16 on both paths (SDPA's kernel and the backend's own), fp16 on the one auto takes.
CORRECTNESS_PATHS = [("bfloat16", ("sdpa", "kernel")), ("float16", ("auto",))]
# The representative gpu tests (second call): every scenario of the conformance suite on both GPU backends in bf16
# and float32 (fp16 left out; head dims up to 256 in bf16), the model-level gpu tests, and no sanitizer (its own
# stage).
GPU_TEST_FILES = ["tests/test_attention_conformance.py", "tests/test_chopgrad_gpu.py", "tests/test_compile.py",
                  "tests/test_nn_blocks.py", "tests/test_video_unet.py", "tests/test_attention_cuda.py",
                  "tests/test_validation.py"]
GPU_TEST_SELECTION = "not benchmark_shapes and not sanitizer and not fp16 and not (head_dims and fp32)"


# ----------------------------------------------------------------------------------------------------------
# Stages: each runs in its own process (python scripts/gpu_check.py --stage NAME) and returns a JSON-able dict.
# ----------------------------------------------------------------------------------------------------------

def device_name(rehearse: bool) -> str:
    return "cpu" if rehearse else "cuda"


def run_command(command: List[str], **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT, text=True, **kwargs)


def stage_environment(rehearse: bool) -> dict:
    import torch

    info = {"torch": torch.__version__, "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    commit = run_command(["git", "rev-parse", "HEAD"], capture_output=True)
    info["commit"] = commit.stdout.strip() or "unknown (no git)"
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if not rehearse:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA GPU visible to torch")
        info["gpu"] = torch.cuda.get_device_name()
        smi = run_command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                          capture_output=True)
        info["nvidia_smi"] = smi.stdout.strip()
        info["nvcc"] = shutil.which("nvcc")
    print(json.dumps(info, indent=1))
    return info


def stage_install(rehearse: bool) -> dict:
    result = run_command([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                          "."], capture_output=True)
    print(result.stdout[-2000:], result.stderr[-2000:])
    if result.returncode != 0:
        raise SystemExit(f"pip install failed ({result.returncode})")
    return {"returncode": result.returncode}


def correctness(backend: str, rehearse: bool) -> dict:
    """The parallel op of `backend` at each shape, dtype and option set: every error against its bound."""
    import torch

    from benchmarks.floors import DESIGN_SHAPES
    from pychop.ops import backends
    from tests.checks import float32_torch_errors

    device = "cpu" if rehearse and backend == "cpp" else device_name(rehearse)
    backends.load(backend, torch.device(device))  # waits on the lock of the build started in the background
    shapes = REHEARSAL_SHAPES if rehearse else DESIGN_SHAPES
    cases, worst = [], 0.0
    for name, shape in shapes.items():
        for dtype_name, paths in CORRECTNESS_PATHS:
            dtype = getattr(torch, dtype_name)
            for path in paths:
                for options in CORRECTNESS_OPTIONS:
                    torch.manual_seed(0)
                    start = time.perf_counter()
                    errors = float32_torch_errors(backend, shape, dtype, device, spatial_path=path, **options)
                    ratio = max(e["error"] / e["bound"] for e in errors)
                    worst = max(worst, ratio)
                    cases.append(dict(shape=name, dtype=dtype_name, spatial_path=path, options=options,
                                      worst_error_over_bound=ratio, seconds=time.perf_counter() - start,
                                      errors=errors))
                    print(f"{backend} {name} {dtype_name} spatial {path} {options}: worst error/bound {ratio:.3f} "
                          f"({'ok' if ratio <= 1 else 'FAIL'})", flush=True)
    return {"backend": backend, "passed": worst <= 1.0, "worst_error_over_bound": worst, "cases": cases}


def stage_check(rehearse: bool) -> dict:
    """python -m pychop.check on this machine (in rehearsal its smoke size on the CPU): its rows and verdict."""
    import torch

    from pychop import check

    device = torch.device(device_name(rehearse))
    rows = check.run(device, check.SMOKE_SHAPES if rehearse else check.GPU_SHAPES, check.DTYPES[device.type],
                     repeats=1 if rehearse else 5, warmup=0 if rehearse else 1)
    print(check.format_rows(rows), flush=True)
    return {"check_passed": all(row["passed"] for row in rows), "verdict": check.verdict(rows), "check_rows": rows}


def run_suite(suite: str, rehearse: bool, out: Path) -> dict:
    """python -m benchmarks --suite `suite` into a temporary folder; rows into the JSON, the PNG into `out`."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "benchmarks", "--suite", suite, "--device", device_name(rehearse),
                   "--out", folder, *(["--smoke"] if rehearse else SUITE_SETTINGS[suite])]
        result = run_command(command)
        if result.returncode != 0:
            raise SystemExit(f"suite {suite} failed ({result.returncode})")
        payload = json.loads((Path(folder) / f"{suite}.json").read_text())
        plot = Path(folder) / f"{suite}.png"
        if plot.exists():
            shutil.copy(plot, out / f"{suite}.png")
    return payload


def stage_gpu_tests(rehearse: bool) -> dict:
    """pytest on the representative selection; counts and the failures' messages from its JUnit XML."""
    import xml.etree.ElementTree as ElementTree

    with tempfile.TemporaryDirectory() as folder:
        junit = Path(folder) / "tests.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-k",
                   GPU_TEST_SELECTION, f"--junitxml={junit}", *GPU_TEST_FILES]
        if not rehearse and importlib.util.find_spec("xdist") is not None:
            command[4:4] = ["-n", "8"]  # pytest-xdist: Triton compiles side by side
        result = run_command(command)
        if not junit.exists():
            raise SystemExit(f"pytest wrote no results (exit {result.returncode})")
        root = ElementTree.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root[0]
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failures = [dict(test=f"{case.get('classname')}::{case.get('name')}", message=(problem.get("message") or "")[:500])
                for case in suite.iter("testcase") for problem in case if problem.tag in ("failure", "error")]
    return {"returncode": result.returncode, **counts, "failed": failures}


def stage_sanitizer(rehearse: bool) -> dict:
    """compute-sanitizer memcheck and racecheck over scripts/sanitize_cuda.py (both GPU backends); in rehearsal
    the same calls on the CPU backends, without the sanitizer."""
    results = {}
    script = [sys.executable, str(ROOT / "scripts" / "sanitize_cuda.py"), "--quick"]
    if rehearse:
        result = run_command(script + ["--rehearse"])
        return {"rehearsal": {"returncode": result.returncode}}
    from tests.test_attention_cuda import compute_sanitizer

    budget = next(stage.budget_s for stage in PLAN["second"] if stage.name == "sanitizer")
    per_tool = budget // 2 - 2  # each tool its own share: memcheck cannot starve racecheck
    for tool in ("memcheck", "racecheck"):
        try:
            result = run_command([compute_sanitizer(), "--tool", tool, "--error-exitcode", "1", *script],
                                 timeout=per_tool)
            results[tool] = {"returncode": result.returncode, "clean": result.returncode == 0}
        except subprocess.TimeoutExpired:
            results[tool] = {"clean": None, "note": f"cut off after {per_tool} s"}
        print(f"sanitizer {tool}: {results[tool]}", flush=True)
    return results


def run_stage(name: str, rehearse: bool, out: Path) -> dict:
    stages: Dict[str, Callable[[], dict]] = {
        "environment": lambda: stage_environment(rehearse),
        "install": lambda: stage_install(rehearse),
        "triton-correctness": lambda: correctness("triton", rehearse),
        "cuda-correctness": lambda: correctness("cpp" if rehearse else "cuda", rehearse),
        "check": lambda: stage_check(rehearse),
        "attention-suite": lambda: run_suite("attention", rehearse, out),
        "attention-sweep": lambda: run_suite("attention_sweep", rehearse, out),
        "chopgrad-suite": lambda: run_suite("chopgrad", rehearse, out),
        "mobius-suite": lambda: run_suite("mobius", rehearse, out),
        "gpu-tests": lambda: stage_gpu_tests(rehearse),
        "sanitizer": lambda: stage_sanitizer(rehearse),
    }
    return stages[name]()


# ----------------------------------------------------------------------------------------------------------
# The driver.
# ----------------------------------------------------------------------------------------------------------

def start_extension_build(rehearse: bool, log: Path, env: dict) -> subprocess.Popen:
    """Builds pychop._C (its cpp kernels in rehearsal, with the cuda ones on a GPU) while Triton works."""
    backend, device = ("cpp", "cpu") if rehearse else ("cuda", "cuda")
    code = (f"import torch; from pychop.ops import backends; backends.load({backend!r}, torch.device({device!r})); "
            f"print('extension build: {backend} ready')")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def finish_extension_build(build: subprocess.Popen, wait_s: int = 120) -> None:
    """Lets the build end (a stage that waited on its lock may have ended first); past `wait_s` kills its whole
    process group (ninja, the compilers) and removes its lock, which would otherwise hold every later load."""
    try:
        build.wait(timeout=wait_s)
        return
    except subprocess.TimeoutExpired:
        kill_group(build)
    from pychop._build import build_dir  # the build's environment is this process's, so is its folder

    with contextlib.suppress(OSError):
        (build_dir() / "lock").unlink(missing_ok=True)


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def triton_cache_entries(cache: Path) -> int:
    return sum(1 for _ in cache.iterdir()) if cache.exists() else 0


def run_call(call: str, rehearse: bool, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    if rehearse:
        env.update(TRITON_INTERPRET="1")
    if not env.get("CUDA_HOME") and Path("/usr/local/cuda/bin/nvcc").exists():
        env["CUDA_HOME"] = "/usr/local/cuda"  # torch takes the toolkit to be two folders above nvcc on PATH
    cache = Path(tempfile.mkdtemp(prefix="gpu-check-triton-"))
    env["TRITON_CACHE_DIR"] = str(cache)  # empty: the number of entries a stage adds is its compile count
    log_path, json_path = out / f"{call}.log", out / f"{call}.json"
    report = {"call": call, "rehearsal": rehearse, "budget_s": CALL_BUDGET_S[call], "stages": {}}
    deadline = time.monotonic() + CALL_BUDGET_S[call]
    build_log = Path(tempfile.mkdtemp()) / "build.log"
    build = start_extension_build(rehearse, build_log, env)  # a stage that needs it waits on the build's lock
    with log_path.open("w") as log:
        for stage in PLAN[call]:
            left = deadline - time.monotonic()
            limit = max(1, min(stage.budget_s, int(left)))
            entry = run_stage_process(stage, limit, rehearse, out, log, cache, env)
            entry["budget_s"] = stage.budget_s
            report["stages"][stage.name] = entry
            json_path.write_text(json.dumps(report, indent=1, default=str))
            print(f"[{call}] {stage.name}: {entry['status']} in {entry['wall_s']:.1f} s "
                  f"(budget {stage.budget_s} s, limit {limit} s)", flush=True)
        finish_extension_build(build)
        log.write(f"\n== extension build log\n{build_log.read_text()}")
    report["wall_s"] = sum(stage["wall_s"] for stage in report["stages"].values())
    json_path.write_text(json.dumps(report, indent=1, default=str))
    return report


def run_stage_process(stage: Stage, limit: int, rehearse: bool, out: Path, log, cache: Path, env: dict) -> dict:
    """Runs one stage in its own process group under `limit` seconds; its output goes to the log and the
    terminal."""
    result_file = Path(tempfile.mkstemp(suffix=".json")[1])
    command = [sys.executable, str(Path(__file__).resolve()), "--stage", stage.name, "--result", str(result_file),
               "--out", str(out)] + (["--rehearse"] if rehearse else [])
    log.write(f"\n== {stage.name} ({stage.purpose}); limit {limit} s\n")
    log.flush()
    begins = os.path.getsize(log.name)
    compiles_before = triton_cache_entries(cache)
    start = time.monotonic()
    # the stage writes straight into the log: whatever it printed is there even if it, or this call, is killed
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env=env)
    status = "done"
    try:
        process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        kill_group(process)
        process.wait(timeout=30)
        status = f"cut off by its {limit} s limit"
    wall = time.monotonic() - start
    log.seek(0, os.SEEK_END)
    with open(log.name, "rb") as written:  # echo the stage's output to the terminal
        written.seek(begins)
        sys.stdout.write(written.read()[-4000:].decode(errors="replace"))
    entry = {"status": status, "wall_s": wall, "triton_compiles": triton_cache_entries(cache) - compiles_before}
    if status == "done":
        if process.returncode != 0:
            entry["status"] = f"failed (exit {process.returncode})"
        elif result_file.stat().st_size:
            entry["results"] = json.loads(result_file.read_text())
    result_file.unlink(missing_ok=True)
    return entry


def summary(out: Path) -> str:
    """The table of every call's stages found in `out`, then the headline figures of each."""
    lines = [f"{'call':<7}{'stage':<20}{'status':<34}{'wall s':>8}{'budget s':>10}{'compiles':>10}"]
    for call in PLAN:
        path = out / f"{call}.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        for name, stage in report["stages"].items():
            lines.append(f"{call:<7}{name:<20}{stage['status'][:33]:<34}{stage['wall_s']:>8.1f}{stage['budget_s']:>10}"
                         f"{stage.get('triton_compiles', 0):>10}")
        lines.append(f"{call:<7}{'(call)':<20}{'':<34}{report.get('wall_s', 0):>8.1f}{report['budget_s']:>10}")
        for name, stage in report["stages"].items():
            results = stage.get("results") or {}
            if "check_rows" in results:
                lines.append(f"  {name}: {results['verdict']}")
                lines += [f"    auto at {shape}: {auto}" for shape, auto in
                          dict.fromkeys((f"{row['shape']} ({row['dtype']})", row["auto"])
                                        for row in results["check_rows"])]
            if "worst_error_over_bound" in results:
                lines.append(f"  {name}: worst error / bound {results['worst_error_over_bound']:.3f} over "
                             f"{len(results['cases'])} cases ({'pass' if results['passed'] else 'FAIL'})")
            if "tests" in results:
                passed = results["tests"] - results["failures"] - results["errors"] - results["skipped"]
                lines.append(f"  {name}: {passed} passed, {results['failures'] + results['errors']} failed, "
                             f"{results['skipped']} skipped")
                lines += [f"    FAILED {failure['test']}: {failure['message'][:160]}" for failure in results["failed"]]
            if "rows" in results:
                from benchmarks.summary import headline

                lines += [f"  {line}" for line in headline(results)]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("call", nargs="?", choices=sorted(PLAN))
    parser.add_argument("--rehearse", action="store_true", help="the same stages at tiny sizes on the CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_check")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.stage:
        args.result.write_text(json.dumps(run_stage(args.stage, args.rehearse, args.out), default=str))
        return
    if args.call is None:
        parser.error("say which call: first or second")
    report = run_call(args.call, args.rehearse, args.out)
    print(f"\n== gpu_check {args.call}{' (rehearsal on the CPU)' if args.rehearse else ''}: "
          f"{report['wall_s']:.0f} s of its {report['budget_s']} s budget\n")
    print(summary(args.out))


if __name__ == "__main__":
    main()
