"""Builds tests/csrc/attention_cuda_sim.cpp: the CUDA kernels of csrc/attention/cuda, their own source, compiled by
the host C++ compiler against the stand-in headers of tests/csrc/cuda_sim/ and run on the CPU.

Three spellings of CUDA C++ have no host-compiler equivalent that a header could supply, and are rewritten in a
copy of the sources (every rewrite must apply at least once, and nothing CUDA-only may be left):

- ``kernel<<<grid, threads, shared_bytes, stream>>>(args)`` becomes ``::sim::launch(kernel, grid, threads,
  shared_bytes, stream)(args)``;
- ``extern __shared__ ... unsigned char smem[];`` becomes a pointer to the simulated block's shared memory;
- the two inline-PTX statements of tile_io.cuh (``cp.async.cg.shared.global`` and ``cp.async.wait_all``) become
  calls of the simulator's cp.async, which takes the same shared-window address the PTX takes.

The copy is compiled with ``__CUDA_ARCH__`` 900, so the device branches (cp.async) are the ones that run.

``python -m tests.cuda_sim [DIR]`` removes each synchronisation statement of the two kernel files in turn and
prints what the simulation reports for each copy (how sharp it is; docs/design.md, the CUDA section).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from pychop import _build

CSRC_TESTS = Path(__file__).parent / "csrc"
KERNEL_DIR = Path(_build.CSRC) / "attention" / "cuda"
SOURCES = ("attention_fwd.cu", "attention_bwd.cu", "launch.cu")

REWRITES = (
    (re.compile(r"([\w:]+(?:<[\w, ]+>)?)<<<(.*?)>>>"), r"::sim::launch(\1, \2)"),
    (re.compile(r"extern __shared__ (?:__align__\(\d+\) )?unsigned char (\w+)\[\];"),
     r"unsigned char* const \1 = ::sim::shared_memory();"),
    (re.compile(r'asm volatile\("cp\.async\.cg\.shared\.global \[%0\], \[%1\], 16;\\n" '
                r'::"r"\((\w+)\), "l"\((\w+)\)\);'), r"::sim::cp_async_shared(\1, \2);"),
    (re.compile(r'asm volatile\("cp\.async\.wait_all;\\n" ::\);'), r"::sim::cp_async_wait_all();"),
)
LEFT_OVER = re.compile(r"<<<|>>>|\basm\b|__shared__")


def translate(text: str, counts: list[int]) -> str:
    """`text` with REWRITES applied; counts[i] += how often rewrite i applied."""
    for i, (pattern, replacement) in enumerate(REWRITES):
        text, n = pattern.subn(replacement, text)
        counts[i] += n
    return text


def build(workdir: Path, edits: dict[str, tuple[str, str]] | None = None, reuse: Path | None = None) -> Path | None:
    """Compiles the simulation into `workdir`; its executable, or None when there is no C++ compiler.

    `edits` maps a kernel file name to (old, new): a deliberate change to the copy (old must occur exactly once),
    with which a test shows that the simulation catches a broken kernel. `reuse`: the directory of an earlier
    build without edits, whose objects are taken for the sources that no edit touches."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        return None
    edits = edits or {}
    copy = workdir / "attention" / "cuda"
    copy.mkdir(parents=True)
    counts = [0] * len(REWRITES)
    for path in sorted(KERNEL_DIR.iterdir()):
        text = path.read_text()
        if path.name in edits:
            old, new = edits[path.name]
            assert text.count(old) == 1, f"{path.name}: {old!r} occurs {text.count(old)} times"
            text = text.replace(old, new)
        text = translate(text, counts)
        left = LEFT_OVER.search(text)
        assert left is None, f"{path.name}: CUDA-only {left.group()!r} left after the rewrites"
        (copy / path.name).write_text(text)
    assert all(counts), f"a rewrite found nothing to rewrite (counts {counts}): update tests/cuda_sim.py"
    flags = ["-std=c++17", "-O2", "-Wall", "-Werror", "-Wno-unknown-pragmas", "-U_FORTIFY_SOURCE",
             "-D__CUDA_ARCH__=900", f"-I{CSRC_TESTS / 'cuda_sim'}", f"-I{CSRC_TESTS}", f"-I{workdir}",
             f"-I{_build.CSRC}"]
    headers_edited = any(not name.endswith(".cu") for name in edits)
    sources = [copy / name for name in SOURCES] + [CSRC_TESTS / "attention_cuda_sim.cpp"]
    objects, jobs = [], []
    for source in sources:
        obj = workdir / (source.stem + ".o")
        objects.append(obj)
        if reuse is not None and not headers_edited and source.name not in edits:
            shutil.copy(reuse / obj.name, obj)
            continue
        nvcc_like = ["-x", "c++", "-include", "cuda_runtime.h"] if source.suffix == ".cu" else []  # as nvcc does
        jobs.append((source, subprocess.Popen([compiler, *flags, *nvcc_like, "-c", str(source), "-o", str(obj)],
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for source, job in jobs:
        output = job.communicate()[0]
        assert job.returncode == 0, f"{source.name}:\n{output[-4000:]}"
    executable = workdir / "attention_cuda_sim"
    link = subprocess.run([compiler, *map(str, objects), "-o", str(executable)], capture_output=True, text=True)
    assert link.returncode == 0, link.stderr[-3000:]
    return executable


def run(executable: Path, *args: str) -> subprocess.CompletedProcess:
    """Runs a build's executable; its stdout holds one line per case, then "ok", or the first failure."""
    return subprocess.run([str(executable), *args], capture_output=True, text=True, timeout=1200)


def run_sharded(executable: Path, shards: int, *args: str) -> list[subprocess.CompletedProcess]:
    """run(), the cases shared out over `shards` processes at once (the executable's --shard k/n)."""
    jobs = [subprocess.Popen([str(executable), *args, "--shard", f"{k}/{shards}"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for k in range(shards)]
    results = []
    for job in jobs:
        stdout = job.communicate(timeout=1200)[0]
        results.append(subprocess.CompletedProcess(job.args, job.returncode, stdout, ""))
    return results


SYNCHRONISATION = re.compile(r"__syncthreads\(\);|__syncwarp\(\);|wait_async_copies\(\);")


def without_statement(text: str, line: int) -> tuple[str, str]:
    """(old, new) for build's edits: `text` with line `line` (1-based) blanked, old as many lines around it as make
    it occur once."""
    lines = text.split("\n")
    for context in range(1, len(lines)):
        around = lines[max(line - 1 - context, 0):line + context]
        old = "\n".join(around)
        if text.count(old) == 1:
            blanked = line - 1 - max(line - 1 - context, 0)
            return old, "\n".join(around[:blanked] + [""] + around[blanked + 1:])
    raise AssertionError("no unique context")


def main(workdir: Path) -> None:
    """Each barrier, __syncwarp and cp.async wait of the two kernel files removed in turn, the quick set run on
    the copy: one line per removal, with what the simulation reported (docs/design.md, the CUDA section)."""
    good = build(workdir / "sources")
    for name in ("attention_fwd.cu", "attention_bwd.cu"):
        text = (KERNEL_DIR / name).read_text()
        for number, line in enumerate(text.split("\n"), 1):
            if SYNCHRONISATION.search(line):
                broken = build(workdir / f"{name}-{number}", {name: without_statement(text, number)},
                               reuse=good.parent)
                last = run(broken).stdout.splitlines()[-1]
                print(f"{name}:{number} {line.strip()}: {'passes' if last == 'ok' else 'fails: ' + last}", flush=True)


if __name__ == "__main__":
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(directory))
