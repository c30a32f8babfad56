"""Building and loading the C++/CUDA extension ``pychop._C`` (sources in ``csrc/``).

``load()`` returns the extension: the ahead-of-time build when one is installed (``PYCHOP_BUILD_EXTENSION=1
pip install .``), else a just-in-time build with ninja through ``torch.utils.cpp_extension.load``, cached in
``$PYCHOP_BUILD_DIR`` or ``~/.cache/pychop/<torch>-<cuda or cpu>-<python>-<hash of csrc/>``: compiled on first
use (a message on stderr says so), reused afterwards; checkouts with other sources build in other folders. A
build or load holds ``<build folder>/pychop.lock`` (``BuildLock``): the kernel releases it when its owner dies,
so a killed build blocks nothing; a live owner is waited on, with a message, for at most
``$PYCHOP_BUILD_LOCK_TIMEOUT`` seconds (default 1800). The CUDA kernels are built when torch is a CUDA build
and nvcc is found; otherwise the CPU kernels alone, and ``cuda_missing_reason()`` says why.
``ExtensionBuildError`` carries the reason a build is impossible or failed. This module imports only torch;
setup.py uses ``extension_kwargs()``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: torch's own lock alone
    fcntl = None

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
BUILD_DIR_ENV = "PYCHOP_BUILD_DIR"
LOCK_TIMEOUT_ENV = "PYCHOP_BUILD_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 1800.0
JIT_NAME = "pychop_C"

# -fopenmp: at::parallel_for is an inline OpenMP loop, serial without it (torch's libgomp runs it);
# -Wno-psabi: notes on 64-byte vector arguments of inlined helpers.
CXX_FLAGS = ["-O3", "-fopenmp", "-Wno-psabi"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3"]


class ExtensionBuildError(RuntimeError):
    """pychop._C cannot be built or loaded here; the message says why."""


class BuildLockTimeout(ExtensionBuildError):
    """Another live process held the build folder's lock for longer than the wait allowed."""


def cpp_sources() -> List[str]:
    return [str(CSRC / "attention" / "binding.cpp"), str(CSRC / "attention" / "cpu" / "attention_cpu.cpp")]


def cuda_sources() -> List[str]:
    return sorted(str(path) for path in (CSRC / "attention" / "cuda").glob("*.cu"))


def cuda_missing_reason() -> Optional[str]:
    """None when the CUDA kernels can be built here, else why not."""
    import torch
    from torch.utils import cpp_extension

    if _cuda_build_error is not None:
        return _cuda_build_error
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA"
    if cpp_extension.CUDA_HOME is None:
        return "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    home = Path(cpp_extension.CUDA_HOME)
    if not (home / "bin" / "nvcc").exists():
        return f"nvcc was not found at {home / 'bin' / 'nvcc'} (set CUDA_HOME to the CUDA toolkit)"
    if not any((home / lib / "libcudart.so").exists() for lib in ("lib64", "lib")):
        # torch takes the toolkit to be two levels above the nvcc on PATH, which may be a wrapper script
        return (f"the CUDA runtime library was not found in {home / 'lib64'} or {home / 'lib'} "
                f"(set CUDA_HOME to the CUDA toolkit, the folder holding bin/nvcc and lib64/libcudart.so)")
    return None


def cuda_arch_flags() -> List[str]:
    """nvcc's target flags: none (torch's own choice) when TORCH_CUDA_ARCH_LIST is set or a GPU is visible,
    else sm_80 (the first with bf16 tensor-core fragments) and sm_90 with its PTX, so that a machine without
    a GPU (a container build, a login node) builds too."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.device_count() > 0:
        return []
    return ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90"]


def extension_kwargs(with_cuda: bool) -> Dict[str, object]:
    """Sources, include dirs and flags of pychop._C, for setup.py and the JIT build alike."""
    defines = ["-DPYCHOP_WITH_CUDA"] if with_cuda else []
    kwargs: Dict[str, object] = {
        "sources": cpp_sources() + (cuda_sources() if with_cuda else []),
        "extra_include_paths": [str(CSRC)],
        "extra_cflags": CXX_FLAGS + defines,
        "extra_ldflags": list(LD_FLAGS),  # torch appends its libraries to the list it is given
    }
    if with_cuda:
        kwargs["extra_cuda_cflags"] = NVCC_FLAGS + defines + cuda_arch_flags()
    return kwargs


def sources_hash() -> str:
    """A short hash of every file under csrc/ (names and contents): the identity of the sources a build is of."""
    digest = hashlib.sha256()
    for path in sorted(p for p in CSRC.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(CSRC)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def build_dir() -> Path:
    if os.environ.get(BUILD_DIR_ENV):
        return Path(os.environ[BUILD_DIR_ENV]).expanduser()
    import torch
    flavour = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    tag = (f"torch{torch.__version__.split('+')[0]}-{flavour}-py{sys.version_info[0]}{sys.version_info[1]}-"
           f"{sources_hash()}")
    return Path.home() / ".cache" / "pychop" / tag


class BuildLock:
    """``with BuildLock(directory):`` holds ``directory/pychop.lock`` for one process at a time, across processes.

    The lock is an advisory ``flock`` on the file, which the kernel drops when its owner exits or is killed: a
    dead owner's file holds nothing and is taken over at once. The file names its owner's PID, for the message
    printed while a live owner is waited on; past ``timeout`` seconds (``$PYCHOP_BUILD_LOCK_TIMEOUT``, default
    1800) the wait ends with an ``ExtensionBuildError``. Held, it also removes the baton ``directory/lock`` of
    ``torch.utils.cpp_extension``, which only a build killed inside it can have left (every build of this
    folder holds this lock first), and on which torch would otherwise wait forever."""

    POLL_S = 0.2

    def __init__(self, directory: Path, timeout: Optional[float] = None):
        self.directory = Path(directory)
        self.path = self.directory / "pychop.lock"
        self.timeout = float(os.environ.get(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT_S)) if timeout is None else timeout
        self._file = None

    def owner(self) -> Optional[int]:
        """The PID written in the lock file (its holder's while it is held), None when there is none."""
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _holder(self) -> str:
        pid = self.owner()
        return "another process" if pid is None else f"process {pid}"

    def __enter__(self) -> "BuildLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = open(self.path, "a+")
        if fcntl is not None:
            start, announced = time.monotonic(), False
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waited = time.monotonic() - start
                    if waited >= self.timeout:
                        lock.close()
                        raise BuildLockTimeout(
                            f"waited {self.timeout:g} s for {self._holder()}, which holds {self.path} while it "
                            f"builds or loads pychop._C; raise {LOCK_TIMEOUT_ENV} to wait longer, or end that "
                            "process") from None
                    if not announced:
                        print(f"pychop: waiting for {self._holder()}, which builds or loads pychop._C in "
                              f"{self.directory} (at most {self.timeout:g} s) ...", file=sys.stderr, flush=True)
                        announced = True
                    time.sleep(min(self.POLL_S, self.timeout - waited))
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._file = lock
        (self.directory / "lock").unlink(missing_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()  # closing drops the flock; the file stays, naming its last holder
        self._file = None


def _up_to_date(directory: Path, sources: List[str]) -> bool:
    built = list(directory.glob(f"{JIT_NAME}*.so"))
    if not built:
        return False
    newest_build = max(path.stat().st_mtime for path in built)
    headers = [str(path) for pattern in ("*.h", "*.cuh") for path in CSRC.rglob(pattern)]
    return all(os.path.getmtime(path) <= newest_build for path in sources + headers)


def _check_toolchain() -> None:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise ExtensionBuildError(
            f"no C++ compiler found to build pychop._C (looked for {compiler!r}; install g++ or set CXX)")
    if not cpp_extension.is_ninja_available():
        raise ExtensionBuildError("ninja is needed to build pychop._C (pip install ninja)")


def _jit_build(with_cuda: bool, directory: Path) -> ModuleType:
    from torch.utils import cpp_extension

    kwargs = extension_kwargs(with_cuda)
    directory.mkdir(parents=True, exist_ok=True)
    building = not _up_to_date(directory, kwargs["sources"])
    if building:
        what = "CPU and CUDA" if with_cuda else "CPU"
        print(f"pychop: building the extension pychop._C ({what} kernels) in {directory}; "
              f"this takes a minute or two, once ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        with BuildLock(directory):
            module = cpp_extension.load(name=JIT_NAME, build_directory=str(directory), with_cuda=with_cuda,
                                        verbose=False, **kwargs)
    except BuildLockTimeout:
        raise
    except (RuntimeError, OSError, ImportError) as error:
        tail = "\n".join(str(error).strip().splitlines()[-25:])
        raise ExtensionBuildError(f"building pychop._C failed (in {directory}):\n{tail}") from error
    if building:
        print(f"pychop: built pychop._C in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return module


_cuda_build_error: Optional[str] = None  # why the CUDA kernels failed to build here, if they did


@functools.lru_cache(maxsize=None)
def load() -> ModuleType:
    """The extension module pychop._C, built first if needed; raises ExtensionBuildError. When the CUDA
    kernels fail to build, the CPU kernels are built alone (cuda_missing_reason() then gives the error)."""
    global _cuda_build_error
    try:
        return importlib.import_module("pychop._C")  # an ahead-of-time build
    except ImportError:
        pass
    if not CSRC.is_dir():
        raise ExtensionBuildError(f"pychop._C is not installed and its sources ({CSRC}) are not at hand")
    _check_toolchain()
    directory = build_dir()
    if cuda_missing_reason() is None:
        try:
            module = _jit_build(True, directory)
        except BuildLockTimeout:
            raise  # nothing failed to build: another process is building
        except ExtensionBuildError as error:
            _cuda_build_error = str(error)
            print(f"pychop: the CUDA kernels failed to build; building the CPU kernels alone\n{error}",
                  file=sys.stderr, flush=True)
            module = _jit_build(False, directory / "cpu-only")
    else:
        module = _jit_build(False, directory)
    sys.modules.setdefault("pychop._C", module)
    return module
