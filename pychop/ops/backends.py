"""Backend selection for pychop's fused ops.

Backends: ``"torch"`` (pure PyTorch, the reference semantics, always available), ``"triton"`` (the Triton
kernels in ``pychop.kernels``), ``"cuda"`` and ``"cpp"`` (the GPU and CPU kernels of the extension
``pychop._C``), and ``"auto"``, which takes the first available backend of the preference list for the
tensors' device type (skipping those whose backward is not deterministic while
``torch.use_deterministic_algorithms(True)`` is set). The environment variable ``PYCHOP_BACKEND`` replaces
``"auto"`` (an explicit ``backend=`` argument always wins). Asking for a backend that cannot run raises
``BackendUnavailable`` with the reason.

``auto`` never fails where the torch backend runs: a fused backend that loads but cannot compile or launch its
kernels for the inputs (``launch_failure``: Triton's OutOfResources or compile errors, a GPU architecture the
extension was not built for, a launch configuration the GPU cannot take) is recorded for that kind of input
(``record_failure``: one warning naming the reason), and the call goes on with the next backend of
``fallbacks``, the torch backend last. An explicitly named backend raises instead.

A fused backend is a module with the kernel interface of ``pychop.ops.attention``: ``forward(...)`` and
``backward(...)`` on the (B, T, S, H, D) layout.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType
from typing import Callable, Dict, Hashable, List, Optional, Tuple, Union

import torch

from pychop.ops.validation import NONDETERMINISTIC_BACKWARD

BACKENDS = ("torch", "triton", "cuda", "cpp")
ENV_VAR = "PYCHOP_BACKEND"

# Fastest first, per device type. Device types not listed get the torch backend.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpp", "torch"),
}


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why."""


def _import_if_present(module_name: str, backend: str) -> ModuleType:
    if importlib.util.find_spec(module_name) is None:
        raise BackendUnavailable(f"backend {backend!r}: {module_name} is not part of this installation")
    return importlib.import_module(module_name)


def _load_triton(device: torch.device) -> ModuleType:
    if importlib.util.find_spec("triton") is None:
        raise BackendUnavailable("backend 'triton': Triton is not installed (pip install triton)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailable(
            f"backend 'triton': Triton kernels need CUDA tensors, these are on {device.type} (set "
            f"TRITON_INTERPRET=1 before Triton is imported to run them, slowly, in Triton's CPU interpreter)")
    return _import_if_present("pychop.kernels.parallel_st_attention", "triton")


def _load_extension(device: torch.device, backend: str) -> ModuleType:
    wanted = "cuda" if backend == "cuda" else "cpu"
    if device.type != wanted:
        raise BackendUnavailable(f"backend {backend!r} runs on {wanted} tensors, these are on {device.type}")
    if backend == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("backend 'cuda': no CUDA GPU is available")
    module = _import_if_present("pychop.ops.extension_attention", backend)
    module.ensure_available(backend)  # builds or loads pychop._C; raises BackendUnavailable with the reason
    return module


_LOADERS: Dict[str, Callable[[torch.device], ModuleType]] = {
    "triton": _load_triton,
    "cuda": lambda device: _load_extension(device, "cuda"),
    "cpp": lambda device: _load_extension(device, "cpp"),
}

# (backend, device type) -> kernel module, or the BackendUnavailable raised while loading it.
_cache: Dict[Tuple[str, str], object] = {}


def load(backend: str, device: torch.device) -> Optional[ModuleType]:
    """The kernel module of a fused backend (None for ``"torch"``); raises ``BackendUnavailable``."""
    if backend == "torch":
        return None
    key = (backend, device.type)
    if key not in _cache:
        try:
            _cache[key] = _LOADERS[backend](device)
        except BackendUnavailable as error:
            _cache[key] = error
    found = _cache[key]
    if isinstance(found, BackendUnavailable):
        raise found
    return found


@torch.compiler.assume_constant_result
def requested(backend: str) -> str:
    """A ``backend=`` argument checked, ``"auto"`` replaced by ``PYCHOP_BACKEND`` where that is set: the backend
    asked for, or ``"auto"``."""
    if not isinstance(backend, str) or backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        if backend not in BACKENDS + ("auto",):
            raise ValueError(f"{ENV_VAR} must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return backend


@torch.compiler.assume_constant_result
def resolve(backend: str, device: torch.device) -> str:
    """Maps a ``backend=`` argument to the name of the backend that runs tensors on ``device``, its kernels
    loaded (``load`` then returns them at once). Under torch.compile it runs once, while tracing, and its
    answer is a constant of the graph."""
    backend = requested(backend)
    if backend != "auto":
        load(backend, device)
        return backend
    for candidate in AUTO_ORDER.get(device.type, ("torch",)):
        if candidate in NONDETERMINISTIC_BACKWARD and torch.are_deterministic_algorithms_enabled():
            continue
        try:
            load(candidate, device)
            return candidate
        except BackendUnavailable:
            continue
    raise AssertionError("unreachable: the torch backend is always available")


def available(device: Union[str, torch.device]) -> Dict[str, Optional[str]]:
    """Which backends can run on a device, and why the others cannot.

    Args:
        device: a ``torch.device`` or a string such as ``"cpu"`` or ``"cuda:0"``.

    Returns a dict from each name in ``BACKENDS`` (``"torch"``, ``"triton"``, ``"cuda"``, ``"cpp"``) to None
    when it can run on ``device``, else the reason it cannot (no GPU, Triton not installed, the extension not
    built, ...). Loading a backend to find out may build the extension ``pychop._C`` on first use.
    """
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError as error:
            message = f"device must name a torch device such as 'cpu' or 'cuda', got {device!r}: {error}"
            raise ValueError(message) from None
    elif not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device or a string such as 'cpu', got {device!r}")
    reasons: Dict[str, Optional[str]] = {}
    for name in BACKENDS:
        try:
            load(name, device)
            reasons[name] = None
        except BackendUnavailable as error:
            reasons[name] = str(error)
    return reasons


# ----------------------------------------------------------------------------------------------------------
# Launch failures: what makes ``auto`` go on with the next backend.
# ----------------------------------------------------------------------------------------------------------

# Errors of a launch that leave the device usable (the launch never ran): configurations the GPU cannot take,
# kernels built for other architectures (as CUDA words them; the extension's launch errors quote CUDA's). Not
# out-of-memory (the torch backend needs more), nor faults such as an illegal address (the device is lost).
LAUNCH_FAILURE_MESSAGES = ("no kernel image is available", "invalid device function", "too many resources requested",
                           "unsupported gpu architecture", "named symbol not found")
TRITON_FAILURES = ("OutOfResources", "CompilationError", "PTXASError")

# (backend, kind of input) -> the reason its kernels failed there.
_failures: Dict[Tuple[str, Hashable], str] = {}


def launch_failure(error: BaseException) -> Optional[str]:
    """The reason, when `error` says a fused backend cannot compile or launch its kernels for some inputs (so the
    next backend can run them); None for any other error."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return None
    triton_failure = any(cls.__module__.startswith("triton") and cls.__name__ in TRITON_FAILURES
                         for cls in type(error).__mro__)
    if (isinstance(error, BackendUnavailable) or triton_failure
            or (isinstance(error, RuntimeError) and any(text in str(error) for text in LAUNCH_FAILURE_MESSAGES))):
        message = " ".join(str(error).split())
        return f"{type(error).__name__}: {message[:300]}"
    return None


def record_failure(backend: str, kind: Hashable, reason: str, replacement: str) -> None:
    """Remembers that `backend` cannot run inputs of this kind and warns, once, naming the reason."""
    _failures[(backend, kind)] = reason
    warnings.warn(f"pychop: backend {backend!r} cannot run these inputs ({reason}); backend='auto' uses "
                  f"{replacement!r} for them from now on", RuntimeWarning, stacklevel=3)


def fallbacks(backend: str, device: torch.device, kind: Hashable) -> List[str]:
    """The backends that run inputs of this kind in place of `backend`, in order: `backend` itself unless it
    failed there, then each later backend of the device's auto order that loads and has not failed, then torch."""
    order = AUTO_ORDER.get(device.type, ("torch",))
    later = order[order.index(backend) + 1:] if backend in order else ()
    names = []
    for name in (backend, *later):
        if name == "torch" or (name, kind) in _failures:
            continue
        try:
            load(name, device)
        except BackendUnavailable:
            continue
        names.append(name)
    return names + ["torch"]
