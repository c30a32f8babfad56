"""pychop.nn blocks against a plain float64 composition written here with einsum on the blocks' own weights."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

import pychop
from pychop.nn import ParallelSTBlock, ResConvBlock, SerialSTBlock
from tests.checks import relative_error, runnable_backends

DIM, HEADS = 16, 2
SHAPE = (2, 3, 5, DIM)  # B, T, S, C
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


# --------------------------------------------------------------------------------------------------------------
# The plain composition.
# --------------------------------------------------------------------------------------------------------------

def plain_layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def plain_branch(x, params, prefix, heads, axis, eps=1e-5, causal=False):
    """A(x) of one branch on (B, T, S, C) tokens; attention over S (axis 2) or over T (axis 1, optionally causal)."""
    p = lambda name: params[f"{prefix}.{name}"]
    B, T, S, C = x.shape
    n = plain_layer_norm(x, p("norm.weight"), p("norm.bias"), eps)
    q, k, v = (torch.einsum("btsc,oc->btso", n, p(f"{name}.weight")).reshape(B, T, S, heads, C // heads)
               for name in ("to_q", "to_k", "to_v"))
    scale = (C // heads) ** -0.5
    if axis == 2:
        probs = (torch.einsum("btshd,btzhd->bthsz", q, k) * scale).softmax(-1)
        o = torch.einsum("bthsz,btzhd->btshd", probs, v)
    else:
        scores = torch.einsum("btshd,bushd->bshtu", q, k) * scale
        if causal:  # query frame t sees key frames u <= t
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        probs = scores.softmax(-1)
        o = torch.einsum("bshtu,bushd->btshd", probs, v)
    return torch.einsum("btsc,oc->btso", o.reshape(B, T, S, C), p("to_out.weight")) + p("to_out.bias")


def plain_st(x, params, heads, mode):
    if mode == "serial":
        y = x + plain_branch(x, params, "spatial", heads, 2)
        return y + plain_branch(y, params, "temporal", heads, 1)
    return x + plain_branch(x, params, "spatial", heads, 2) + plain_branch(x, params, "temporal", heads, 1)


def float64_copy(module):
    return {name: p.detach().double().requires_grad_() for name, p in module.named_parameters()}


def run(fn, x, params, dout):
    """Output and the gradients of x and of every parameter (None where none flows)."""
    out = fn(x, params)
    leaves = [x, *params.values()]
    live = [leaf for leaf in leaves if leaf.requires_grad]
    found = iter(torch.autograd.grad(out, live, dout, allow_unused=True))
    return [out.detach(), *(next(found) if leaf.requires_grad else None for leaf in leaves)]


def module_run(block, x, dout):
    params = dict(block.named_parameters())
    return run(lambda x, _: block(x), x, params, dout)


def reference_run(block, mode, x, dout):
    params = float64_copy(block)
    x64 = x.detach().double().requires_grad_()
    return run(lambda x, p: plain_st(x, p, block.heads, mode), x64, params, dout.double())


def names_of(block):
    return ["out", "x", *(name for name, _ in block.named_parameters())]


# --------------------------------------------------------------------------------------------------------------
# Spatial-temporal attention blocks.
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_st_block_float64_matches_plain_composition(mode, seed):
    block = (SerialSTBlock if mode == "serial" else ParallelSTBlock)(DIM, HEADS).double()
    with torch.no_grad():  # non-trivial LayerNorm affine, so that folding it into the projection is exercised
        for branch in (block.spatial, block.temporal):
            branch.norm.weight.uniform_(0.5, 1.5)
            branch.norm.bias.normal_()
    if mode == "parallel":
        block.backend = "torch"
    x = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(SHAPE, dtype=torch.float64)
    for name, actual, expected in zip(names_of(block), module_run(block, x, dout), reference_run(block, mode, x, dout)):
        assert actual is not None, f"{mode}: {name} got no gradient (seed {seed})"
        assert relative_error(actual, expected) < 1e-10, f"{mode}: {name} differs from the composition (seed {seed})"


def test_parallel_block_passes_temporal_options(seed):
    block = ParallelSTBlock(DIM, HEADS, backend="torch", temporal_causal=True).double()
    x = torch.randn(SHAPE, dtype=torch.float64)
    expected = x + plain_branch(x, float64_copy(block), "spatial", HEADS, 2) + plain_branch(
        x, float64_copy(block), "temporal", HEADS, 1, causal=True)
    assert relative_error(block(x).detach(), expected.detach()) < 1e-10


def test_serial_and_parallel_are_different_functions(seed):
    serial, parallel = SerialSTBlock(DIM, HEADS), ParallelSTBlock(DIM, HEADS, backend="torch")
    parallel.load_state_dict(serial.state_dict())
    x = torch.randn(SHAPE)
    assert relative_error(serial(x).double(), parallel(x).double()) > 1e-3


# (device, (B, T, S, C), heads): a small CPU case; on a GPU the benchmark shape B (2, 16, 32x32, H=10, D=64).
GEOMETRY = {"cpu": (SHAPE, HEADS), "cuda": ((2, 16, 32 * 32, 640), 10)}
BACKEND_CASES = [pytest.param("cpu", name, id=f"cpu-{name}") for name in runnable_backends("cpu")] + [
    pytest.param("cuda", name, id=f"cuda-{name}", marks=pytest.mark.gpu)
    for name in (runnable_backends("cuda") if torch.cuda.is_available() else ["torch"])]


@pytest.mark.parametrize("device, backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "autocast"], ids=str)
@pytest.mark.parametrize("freeze_spatial", [False, True])
def test_parallel_block_gradients_every_backend(device, backend, dtype, freeze_spatial, seed):
    """Each available backend against float64, within 3x the torch backend's error in the same dtype
    ("autocast": a float32 block and input under bfloat16 autocast, as mixed-precision training runs it)."""
    autocast = dtype == "autocast"
    if autocast:
        dtype = torch.float32
    shape, heads = GEOMETRY[device]
    block = ParallelSTBlock(shape[-1], heads, backend=backend).to(device, dtype)
    baseline = ParallelSTBlock(shape[-1], heads, backend="torch").to(device, dtype)
    baseline.load_state_dict(block.state_dict())
    if freeze_spatial:
        block.spatial.requires_grad_(False)
        baseline.spatial.requires_grad_(False)
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    dout = torch.randn(shape, dtype=torch.bfloat16 if autocast else dtype, device=device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        actual, base = module_run(block, x, dout), module_run(baseline, x, dout)
        assert actual[0].dtype == SerialSTBlock(shape[-1], heads).to(device, dtype)(x).dtype  # as nn.Linear gives
    reference = reference_run(block, "parallel", x, dout)
    floor = FLOOR[torch.bfloat16 if autocast else dtype]
    names = ["out", "x", *(name for name, p in block.named_parameters())]
    trainable = ["out", "x", *(name for name, p in block.named_parameters() if p.requires_grad)]
    for name, a, b, r in zip(names, actual, base, reference):
        if name not in trainable:
            assert a is None, f"{name} is frozen but got a gradient"
            continue
        assert a is not None and torch.isfinite(a).all(), f"{name}: missing or non-finite ({backend}, seed {seed})"
        assert a.dtype == b.dtype, f"{name}: {a.dtype}, the torch backend's is {b.dtype}"
        bound = 3 * relative_error(b, r) + floor
        assert relative_error(a, r) <= bound, f"{name}: error above {bound:.3g} ({backend}, {dtype}, seed {seed})"


def test_parallel_block_feeds_one_fused_call_views_of_one_packed_projection(monkeypatch):
    """One parallel_st_attention call with both branches stacked, on views of the packed projection."""
    calls = []
    original = pychop.parallel_st_attention

    def spy(*tensors, **options):
        calls.append((tensors, options))
        return original(*tensors, **options)

    monkeypatch.setattr(pychop, "parallel_st_attention", spy)
    block = ParallelSTBlock(DIM, HEADS, backend="torch")
    x = torch.randn(SHAPE)
    block(x)
    assert len(calls) == 1 and calls[0][1]["combine"] == "stack"
    tensors = calls[0][0]
    assert len(tensors) == 6
    storage = tensors[0].untyped_storage().data_ptr()
    B, T, S, C = SHAPE
    for t in tensors:
        assert t._base is not None and t.untyped_storage().data_ptr() == storage, "attention input is a copy"
        assert t.shape == (B, T, S, HEADS, C // HEADS) and t.stride(-1) == 1
        assert t.stride(2) == 6 * C  # a row of the packed (B, T, S, 6, H, D) projection


@pytest.mark.parametrize("backend", runnable_backends("cpu", interpreted=False))
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
def test_recomputed_projection_gives_the_same_gradients_and_keeps_no_projection(backend, autocast, seed):
    """recompute_projection: bit-identical output and gradients, and the (B, T, S, 6C) projection made in the
    forward is freed once the forward returns (kept alive by the graph without the option). Under autocast
    the backward runs outside it, as training loops do: the recomputation must use the forward's precision."""
    block = ParallelSTBlock(DIM, HEADS, backend=backend)
    block.spatial.requires_grad_(False)  # the Mobius setup: only the temporal side trains
    project, projections = block.project, []

    def tracked_project(x):
        packed = project(x)
        projections.append(weakref.ref(packed._base if packed._base is not None else packed))  # views keep it
        return packed

    block.project = tracked_project
    x = torch.randn(SHAPE, requires_grad=True)
    dout = torch.randn(SHAPE)
    params = [p for p in block.parameters() if p.requires_grad]
    results = []
    for recompute in (False, True):
        block.recompute_projection = recompute
        projections.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = block(x)
        gc.collect()
        assert (projections[0]() is None) == recompute, f"recompute_projection={recompute}"
        results.append([out.detach(), *torch.autograd.grad(out, [x, *params], dout)])
        assert len(projections) == 1 + recompute  # recomputed once in the backward, for every view
    for plain, recomputed in zip(*results):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)


def test_st_blocks_reject_bad_tokens():
    for block in (SerialSTBlock(DIM, HEADS), ParallelSTBlock(DIM, HEADS)):
        with pytest.raises(ValueError, match=r"x must be tokens of shape \(B, T, S, C=16\)"):
            block(torch.randn(2, 3, DIM))
        with pytest.raises(ValueError, match="x must be tokens"):
            block(torch.randn(2, 3, 5, DIM + 1))
    with pytest.raises(ValueError, match="divisible by heads"):
        SerialSTBlock(10, 3)


# --------------------------------------------------------------------------------------------------------------
# Residual convolution blocks.
# --------------------------------------------------------------------------------------------------------------

def plain_conv_block(x, temb, p, frames, groups, mode):
    silu = lambda t: t * torch.sigmoid(t)
    h = F.conv2d(silu(F.group_norm(x, groups, p["norm1.weight"], p["norm1.bias"])), p["conv1.weight"],
                 p["conv1.bias"], padding=1)
    h = h + (silu(temb) @ p["time_proj.weight"].t() + p["time_proj.bias"])[:, :, None, None]
    h = F.conv2d(silu(F.group_norm(h, groups, p["norm2.weight"], p["norm2.bias"])), p["conv2.weight"],
                 p["conv2.bias"], padding=1)
    skip = F.conv2d(x, p["skip.weight"], p["skip.bias"]) if "skip.weight" in p else x

    def temporal(u):  # the (3, 1, 1) convolution written as three shifted frame-wise channel mixes
        BT, C, H, W = u.shape
        v = silu(F.group_norm(u.view(BT // frames, frames, C, H, W).transpose(1, 2), groups,
                              p["temporal.norm.weight"], p["temporal.norm.bias"])).transpose(1, 2)
        padded = F.pad(v, (0, 0, 0, 0, 0, 0, 1, 1))
        kernel = p["temporal.conv.weight"][:, :, :, 0, 0]  # (out, in, 3)
        out = sum(torch.einsum("btchw,oc->btohw", padded[:, i:i + frames], kernel[:, :, i]) for i in range(3))
        return (out + p["temporal.conv.bias"][:, None, None]).reshape(BT, C, H, W)

    if mode == "serial":
        y = skip + h
        return y + temporal(y)
    return skip + h + temporal(skip)


@pytest.mark.parametrize("mode", ["serial", "parallel"])
@pytest.mark.parametrize("channels", [(4, 4), (4, 8)])
def test_res_conv_block_matches_plain_composition(mode, channels, seed):
    frames, groups = 3, 2
    block = ResConvBlock(*channels, 6, groups=groups, mode=mode).double()
    x = torch.randn(2 * frames, channels[0], 5, 4, dtype=torch.float64, requires_grad=True)
    temb = torch.randn(2 * frames, 6, dtype=torch.float64)
    dout = torch.randn(2 * frames, channels[1], 5, 4, dtype=torch.float64)
    actual = run(lambda x, _: block(x, temb, frames), x, dict(block.named_parameters()), dout)
    params = float64_copy(block)
    expected = run(lambda x, p: plain_conv_block(x, temb, p, frames, groups, mode), x.detach().requires_grad_(),
                   params, dout)
    for name, a, e in zip(["out", "x", *params], actual, expected):
        assert relative_error(a, e) < 1e-10, f"{mode} {channels}: {name} differs (seed {seed})"


def test_res_conv_block_rejects_bad_input():
    with pytest.raises(ValueError, match="mode must be one of"):
        ResConvBlock(4, 4, 6, groups=2, mode="sideways")
    block = ResConvBlock(4, 4, 6, groups=2)
    with pytest.raises(ValueError, match="divisible by num_frames=4"):
        block(torch.randn(6, 4, 3, 3), torch.randn(6, 6), 4)
