"""Bad input gets an error that names the argument and what was expected, on every backend."""

import numpy as np
import pytest
import torch

import pychop
from pychop.kernels.limits import MAX_HEAD_DIM
from pychop.ops import BACKENDS, backends, validation
from pychop.ops.validation import check_deterministic

SHAPE = (1, 3, 4, 2, 8)


def six(**overrides):
    tensors = {name: torch.randn(SHAPE) for name in ("q_s", "k_s", "v_s", "q_t", "k_t", "v_t")}
    tensors.update(overrides)
    return tensors


@pytest.mark.parametrize("backend", ("auto",) + BACKENDS)
@pytest.mark.parametrize("overrides, error, pattern", [
    ({"k_t": torch.randn(1, 3, 4, 2)}, ValueError, r"k_t must have shape \(B, T, S, H, D\).*4 dimensions"),
    ({"v_s": torch.randn(1, 3, 5, 2, 8)}, ValueError, r"v_s has shape \(1, 3, 5, 2, 8\), expected \(1, 3, 4, 2, 8\)"),
    ({"q_t": torch.randn(SHAPE, dtype=torch.float16)}, TypeError, r"q_t has dtype float16, expected float32"),
    ({"k_s": torch.randn(SHAPE).to(torch.int32)}, TypeError, r"k_s has dtype int32; supported dtypes"),
    ({"v_t": torch.randn(1, 3, 4, 8, 2).transpose(-1, -2)}, ValueError,
     r"v_t must have a last-dimension \(D\) stride of 1"),
    ({"q_s": [1.0]}, TypeError, r"q_s must be a torch.Tensor"),
    ({k: torch.randn(1, 3, 4, 2, MAX_HEAD_DIM + 1) for k in ("q_s", "k_s", "v_s", "q_t", "k_t", "v_t")}, ValueError,
     rf"q_s has head dim D = {MAX_HEAD_DIM + 1}; head dims up to {MAX_HEAD_DIM}"),
    ({k: torch.randn(1, 0, 4, 2, 8) for k in ("q_s", "k_s", "v_s", "q_t", "k_t", "v_t")}, ValueError,
     r"q_s has T = 0 .* must be at least 1"),
], ids=["rank", "shape", "mixed-dtype", "int-dtype", "stride", "not-tensor", "head-dim", "no-frames"])
def test_bad_tensors(backend, overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        pychop.parallel_st_attention(**six(**overrides), backend=backend)


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"temporal_window": 0}, ValueError, r"temporal_window must be at least 1"),
    ({"temporal_grad_window": -2}, ValueError, r"temporal_grad_window must be at least 1"),
    ({"temporal_window": 2.5}, TypeError, r"temporal_window must be an int >= 1 or None"),
    ({"scale": float("nan")}, ValueError, r"scale must be a finite number"),
    ({"backend": "fastest"}, ValueError, r"backend must be one of"),
    ({"combine": "concat"}, ValueError, r"combine must be one of \('sum', 'stack'\)"),
])
def test_bad_options(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        pychop.parallel_st_attention(**six(), **kwargs)


def test_single_branch_errors_use_their_own_argument_names():
    q, k, v = (torch.randn(SHAPE) for _ in range(3))
    with pytest.raises(ValueError, match=r"^window must be at least 1"):
        pychop.temporal_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match=r"^v has shape"):
        pychop.spatial_attention(q, k, torch.randn(1, 3, 4, 2, 4))


@pytest.mark.gpu
def test_mixed_devices():
    with pytest.raises(ValueError, match=r"k_t is on device cuda:0, expected cpu like q_s"):
        pychop.parallel_st_attention(**six(k_t=torch.randn(SHAPE, device="cuda")))


def test_float64_only_on_torch_backend():
    tensors = {k: v.double() for k, v in six().items()}
    assert pychop.parallel_st_attention(**tensors).dtype == torch.float64  # auto picks torch for float64
    with pytest.raises(TypeError, match=r"backend 'triton' supports float16, bfloat16 and float32"):
        pychop.parallel_st_attention(**tensors, backend="triton")


def test_nondeterministic_backward_refused_under_deterministic_algorithms(deterministic_setting, monkeypatch):
    """A backend listed in NONDETERMINISTIC_BACKWARD (none is today; cuda's dq has no atomics) raises as its
    spatial backward starts under torch.use_deterministic_algorithms (warns with warn_only); the other backends
    pass, and "auto" skips a nondeterministic backend. cpp stands in for a nondeterministic backend."""
    assert validation.NONDETERMINISTIC_BACKWARD == {}
    torch.use_deterministic_algorithms(True)
    for backend in ("torch", "triton", "cpp", "cuda"):
        check_deterministic(backend, spatial=True)
    monkeypatch.setitem(validation.NONDETERMINISTIC_BACKWARD, "cpp", "adds up floats in any order (pretend)")
    with pytest.raises(RuntimeError, match=r"backend 'cpp' adds up floats in any order \(pretend\), so its backward "
                                           r"is not deterministic.*use backend='triton'"):
        check_deterministic("cpp", spatial=True)
    check_deterministic("cpp", spatial=False)  # the check is for the spatial backward
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="not deterministic"):
        check_deterministic("cpp", spatial=True)
    torch.use_deterministic_algorithms(False)
    check_deterministic("cpp", spatial=True)

    if pychop.available_backends(torch.device("cpu"))["cpp"] is not None:
        pytest.skip("the rest needs the cpp backend")
    torch.use_deterministic_algorithms(True)
    assert backends.resolve("auto", torch.device("cpu")) == "torch"
    inputs = {name: x.requires_grad_() for name, x in six().items()}
    out = pychop.parallel_st_attention(**inputs, backend="cpp", spatial_path="kernel")  # a deterministic forward
    with pytest.raises(RuntimeError, match="backend 'cpp' adds up floats"):
        out.sum().backward()


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "torch"])
def test_double_backward_through_a_fused_backend_is_refused(backend):
    """The kernels' gradients carry no graph: create_graph=True would silently drop second-order terms."""
    if pychop.available_backends(torch.device("cpu"))[backend] is not None:
        pytest.skip(f"backend {backend!r} does not run here")
    q, k, v = (torch.randn(SHAPE, requires_grad=True) for _ in range(3))
    out = pychop.spatial_attention(q, k, v, backend=backend)
    with pytest.raises(RuntimeError, match=rf"backend '{backend}' is differentiable once.*backend='torch'"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)


# --------------------------------------------------------------------------------------------------------------
# Numbers and flags as users write them.
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5).double()],
                         ids=["np.float32", "np.float64", "tensor", "tensor-float64"])
def test_numpy_and_0d_tensor_scales_are_numbers(scale):
    tensors = six()
    expected = pychop.parallel_st_attention(**tensors, scale=0.5, backend="torch")
    assert torch.equal(pychop.parallel_st_attention(**tensors, scale=scale, backend="torch"), expected)
    assert validation.check_scale(np.int64(2), head_dim=8) == 2.0


@pytest.mark.parametrize("scale, error, pattern", [
    (torch.tensor([0.5, 0.5]), TypeError, r"scale must be a finite real number .* got a tensor of shape \(2,\)"),
    (torch.tensor(True), TypeError, r"scale must be a finite real number .* got a 0-d bool tensor"),
    (torch.tensor(0.5 + 0j), TypeError, r"got a 0-d complex64 tensor"),
    (torch.tensor(0.5, requires_grad=True), ValueError, r"scale is a tensor that requires grad.*scale.detach\(\)"),
    (np.float32("inf"), ValueError, r"scale must be a finite number or None, got .*inf"),
    (torch.tensor(float("nan")), ValueError, r"scale must be a finite number or None, got nan"),
    ("0.5", TypeError, r"scale must be a finite real number .* got '0.5' \(str\)"),
    (np.bool_(True), TypeError, r"scale must be a finite real number .* \(bool"),
], ids=["two-elements", "bool-tensor", "complex-tensor", "requires-grad", "np-inf", "tensor-nan", "str", "np-bool"])
def test_bad_scales(scale, error, pattern):
    with pytest.raises(error, match=pattern):
        pychop.parallel_st_attention(**six(), scale=scale)


def test_flags_must_be_bools():
    """A non-bool flag is refused rather than taken for its truth ("no" would mean causal)."""
    for value in ("yes", "no", 1, None):
        with pytest.raises(TypeError, match=rf"^temporal_causal must be a bool, got {value!r}"):
            pychop.parallel_st_attention(**six(), temporal_causal=value)
    q, k, v = (torch.randn(SHAPE) for _ in range(3))
    with pytest.raises(TypeError, match=r"^causal must be a bool, got 'yes' \(str\)"):
        pychop.temporal_attention(q, k, v, causal="yes")
    tensors = six()
    for flag in (True, False):
        expected = pychop.parallel_st_attention(**tensors, temporal_causal=flag, backend="torch")
        got = pychop.parallel_st_attention(**tensors, temporal_causal=np.bool_(flag), backend="torch")
        assert torch.equal(got, expected)


# --------------------------------------------------------------------------------------------------------------
# The largest head dim: one number per language, the same in both.
# --------------------------------------------------------------------------------------------------------------

def test_max_head_dim_agrees_across_python_triton_and_the_extension():
    from pychop import _build
    from pychop.kernels import limits, tiles

    assert validation.MAX_HEAD_DIM is limits.MAX_HEAD_DIM
    assert tiles.HEAD_DIM_BUCKETS[-1] == limits.MAX_HEAD_DIM  # the Triton launch tables' last row
    try:
        extension = _build.load()
    except _build.ExtensionBuildError as error:
        pytest.skip(f"pychop._C cannot be built here: {error}")
    assert extension.MAX_HEAD_DIM == limits.MAX_HEAD_DIM
