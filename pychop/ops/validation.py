"""Input validation shared by every backend of the attention ops.

Every check raises a ``ValueError`` or ``TypeError`` that names the argument and what was expected, before
any kernel runs: no backend ever sees an input it cannot handle.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from typing import Dict, Mapping, Optional

import torch

from pychop.kernels.limits import MAX_HEAD_DIM

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = SUPPORTED_DTYPES + (torch.float64,)  # the torch backend also runs float64
LAYOUT = "(B, T, S, H, D)"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_attention_inputs(tensors: Mapping[str, torch.Tensor]) -> None:
    """Checks a group of attention inputs of layout (B, T, S, H, D) against each other.

    ``tensors`` maps argument names to tensors, in the order they were given; the first is the one the others
    are compared with.
    """
    first_name, first = None, None
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {LAYOUT}, got {type(x).__name__}")
        if x.dim() != 5:
            raise ValueError(
                f"{name} must have shape {LAYOUT} (batch, frames, spatial tokens, heads, head dim), "
                f"got {x.dim()} dimensions {tuple(x.shape)}")
        if x.dtype not in REFERENCE_DTYPES:
            raise TypeError(f"{name} has dtype {_dtype_name(x.dtype)}; supported dtypes are float16, bfloat16 "
                            f"and float32 (and float64 on the torch backend)")
        if first is None:
            first_name, first = name, x
            B, T, S, H, D = x.shape
            for dim_name, size in zip("BTSHD", x.shape):
                if size < 1:
                    raise ValueError(f"{name} has {dim_name} = {size} in shape {tuple(x.shape)}; "
                                     f"every dimension of {LAYOUT} must be at least 1")
            if D > MAX_HEAD_DIM:
                raise ValueError(f"{name} has head dim D = {D}; head dims up to {MAX_HEAD_DIM} are supported")
        else:
            if x.shape != first.shape:
                raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(first.shape)} "
                                 f"like {first_name}")
            if x.dtype != first.dtype:
                raise TypeError(f"{name} has dtype {_dtype_name(x.dtype)}, expected "
                                f"{_dtype_name(first.dtype)} like {first_name}")
            if x.device != first.device:
                raise ValueError(f"{name} is on device {x.device}, expected {first.device} like {first_name}")
        if x.stride(-1) != 1:
            raise ValueError(
                f"{name} must have a last-dimension (D) stride of 1, got stride {x.stride(-1)}; views of a "
                f"packed projection (B, T, S, n, H, D) work as they are, other layouts need .contiguous()")


def check_kernel_dtype(name: str, dtype: torch.dtype, backend: str) -> None:
    """Fused kernels take float16, bfloat16 and float32; float64 is for the torch backend alone."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {_dtype_name(dtype)}; backend {backend!r} supports float16, bfloat16 "
                        f"and float32 (use backend='torch' for {_dtype_name(dtype)})")


def check_scale(scale, head_dim: int) -> float:
    """Returns the softmax scale as a float, ``head_dim ** -0.5`` when ``scale`` is None. A scale is a finite
    real number: a Python or numpy int or float, or a 0-d real tensor that does not require grad (the scale is a
    constant of the ops: no gradient flows to it)."""
    if scale is None:
        return head_dim ** -0.5
    expected = "a finite real number (int, float, numpy scalar or 0-d real tensor) or None"
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0:
            raise TypeError(f"scale must be {expected}, got a tensor of shape {tuple(scale.shape)}")
        if scale.dtype == torch.bool or scale.is_complex():
            raise TypeError(f"scale must be {expected}, got a 0-d {_dtype_name(scale.dtype)} tensor")
        if scale.requires_grad:
            raise ValueError("scale is a tensor that requires grad, but the ops take the scale as a constant and "
                             "pass no gradient to it; pass scale.detach()")
        scale = scale.item()
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be {expected}, got {scale!r} ({type(scale).__name__})")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


def check_flag(name: str, value) -> bool:
    """An on/off option is a bool, Python's or numpy's; anything else is refused rather than taken for its truth."""
    numpy = sys.modules.get("numpy")  # a numpy bool exists only once numpy is imported
    if not (isinstance(value, bool) or (numpy is not None and isinstance(value, numpy.bool_))):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_window(name: str, window: Optional[int]) -> Optional[int]:
    """A frame window is None (no limit) or an integer >= 1."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"{name} must be an int >= 1 or None, got {window!r}")
    if window < 1:
        raise ValueError(f"{name} must be at least 1 (a frame always attends to itself), got {window}")
    return window


SPATIAL_PATHS = ("auto", "sdpa", "kernel")


def check_spatial_path(spatial_path: str) -> None:
    """How a fused backend runs the spatial branch: one of SPATIAL_PATHS (see pychop.ops.spatial_paths)."""
    if not isinstance(spatial_path, str) or spatial_path not in SPATIAL_PATHS:
        raise ValueError(f"spatial_path must be one of {SPATIAL_PATHS} ('sdpa': scaled_dot_product_attention's "
                         f"kernel, 'kernel': the backend's own, 'auto': chosen per device and shape), got "
                         f"{spatial_path!r}")


COMBINE_MODES = ("sum", "stack")


def check_combine(combine: str) -> bool:
    """How parallel attention returns its branches: True for ``"stack"``, False for ``"sum"``."""
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {COMBINE_MODES} ('sum': o_s + o_t as (B, T, S, H, D); 'stack': "
                         f"the branches apart as (B, T, S, 2, H, D)), got {combine!r}")
    return combine == "stack"


# Backends whose backward is not deterministic, each with the reason (none today: the cuda backend's dq has no
# atomics); check_deterministic refuses them under torch.use_deterministic_algorithms, and "auto" skips them.
NONDETERMINISTIC_BACKWARD: Dict[str, str] = {}


def check_deterministic(backend: str, spatial: bool) -> None:
    """Called as a backward starts: under ``torch.use_deterministic_algorithms(True)``, a backend whose spatial
    backward is not deterministic raises (warns with ``warn_only=True``), as torch's own nondeterministic
    ops do when they run."""
    if not (spatial and backend in NONDETERMINISTIC_BACKWARD and torch.are_deterministic_algorithms_enabled()):
        return
    message = (f"backend {backend!r} {NONDETERMINISTIC_BACKWARD[backend]}, so its backward is not deterministic, "
               f"and torch.use_deterministic_algorithms(True) is set; use backend='triton' (deterministic), or "
               f"backend='auto', which then skips {backend!r}, or turn the setting off")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=2)
    else:
        raise RuntimeError(message)
