"""pychop.memory: lean_frozen on pychop's VideoUNet, its pieces (frozen convolutions, GEGLU, recomputed
regions) and the saved bytes they leave; exact against the unchanged model in float64, under autocast and
torch.compile, and undone by remove()."""

import copy

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F

from pychop.chopgrad.memory import SavedActivationMeter
from pychop.memory import frozen_regions, lean_frozen, recomputed
from pychop.models import TINY, VideoUNet
from pychop.nn import ParallelSTBlock, geglu
from tests.checks import relative_error

BATCH = 2


def video_unet(mode, seed, dtype=torch.float64, backend="torch"):
    torch.manual_seed(seed)
    return VideoUNet(TINY, mode, backend=backend).to(dtype).freeze_spatial()


def training_step(model, inputs, *, autocast=False):
    """Output and trainable gradients (by name) of one backward of a squared-output loss."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(*inputs)
    out.float().square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def saved_bytes(model, inputs):
    return SavedActivationMeter(model).measure(lambda: model(*inputs))


def instance_state(model):
    """What lean_frozen may change on the instances: their own attributes, by identity."""
    return [{key: id(value) for key, value in module.__dict__.items() if not key.startswith("_")
             or key in ("_conv_forward",)} for module in model.modules()]


def assert_same_step(actual, expected, tolerance):
    out, grads = actual
    expected_out, expected_grads = expected
    assert relative_error(out.double(), expected_out.double()) < tolerance
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert relative_error(grad.double(), expected_grads[name].double()) < tolerance, name


@pytest.mark.parametrize("recompute", [False, True], ids=["lean", "recompute"])
@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_video_unet_lean_is_exact_leaner_and_removable(mode, recompute, seed):
    model = video_unet(mode, seed)
    inputs = model.example_inputs(BATCH, dtype=torch.float64)
    expected = training_step(model, inputs)
    plain_bytes = saved_bytes(model, inputs)
    before = instance_state(model)

    handle = lean_frozen(model, recompute=recompute)
    assert len(handle.convolutions) == sum(isinstance(m, nn.Conv2d) for m in model.modules())  # all frozen
    assert handle.activations and handle.cross_attentions
    assert bool(handle.regions) == recompute
    if recompute:
        assert any(name.endswith("spatial_residual") for name in handle.regions)
        assert not any("temporal" in name for name in handle.regions)
    step = training_step(model, inputs)
    assert_same_step(step, expected, 1e-12)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    lean_bytes = saved_bytes(model, inputs)
    assert lean_bytes < (0.6 if recompute else 0.9) * plain_bytes, (lean_bytes, plain_bytes)

    handle.remove()
    assert instance_state(model) == before
    out, grads = training_step(model, inputs)
    assert torch.equal(out, expected[0])
    assert saved_bytes(model, inputs) == plain_bytes


@pytest.mark.parametrize("recompute", [False, True], ids=["lean", "recompute"])
def test_fused_parallel_unet_with_recompute_projection(recompute, seed):
    """The fused backend and the blocks' own recompute_projection (saved-tensor hooks) combine with it."""
    model = video_unet("parallel", seed, torch.float32, backend="auto")
    for block in model.modules():
        if isinstance(block, ParallelSTBlock):
            block.recompute_projection = True
    inputs = model.example_inputs(BATCH)
    expected = training_step(model, inputs)
    with lean_frozen(model, recompute=recompute):
        assert_same_step(training_step(model, inputs), expected, 1e-6)


@pytest.mark.parametrize("recompute", [False, True], ids=["lean", "recompute"])
def test_autocast_gives_the_same_step(recompute, seed):
    """Under bfloat16 autocast (the backward outside it) the lean model computes what the plain one does: the
    same operations in the same dtypes, the recomputation under the forward's autocast state."""
    model = video_unet("parallel", seed, torch.float32, backend="auto")
    inputs = model.example_inputs(BATCH)
    expected = training_step(model, inputs, autocast=True)
    with lean_frozen(model, recompute=recompute):
        out, grads = training_step(model, inputs, autocast=True)
    assert out.dtype == torch.bfloat16
    assert_same_step((out, grads), expected, 1e-6)


class FirstLayer(nn.Module):
    """The first layer of a VideoUNet (a residual block, then a transformer), small enough to compile quickly."""

    def __init__(self, unet):
        super().__init__()
        self.stage = unet.down[0]

    def forward(self, x, temb, text):
        return self.stage.layer(0, x, temb, text, TINY.num_frames)


@pytest.mark.slow  # whole-model compiles: seconds
def test_compiles_whole_and_recompute_breaks_once_per_region_at_most(seed):
    layer = FirstLayer(video_unet("parallel", seed, torch.float32, backend="auto"))
    frames = BATCH * TINY.num_frames
    inputs = (torch.randn(frames, TINY.block_channels[0], *TINY.latent_size, requires_grad=True),
              torch.randn(frames, 4 * TINY.block_channels[0]), torch.randn(BATCH, TINY.text_length, TINY.text_dim))
    trainable = [p for p in layer.parameters() if p.requires_grad] + [inputs[0]]

    def step(compiled):
        out = compiled(*inputs)
        return out, torch.autograd.grad(out.square().sum(), trainable)

    with lean_frozen(layer):  # eager's output and gradients exactly: the same kernels on the same data
        expected_out, expected_grads = step(layer)
        torch._dynamo.reset()
        out, grads = step(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)

    with lean_frozen(layer, recompute=True) as handle:
        expected_out, expected_grads = step(layer)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(layer)(*inputs)
        assert 0 < explained.graph_break_count <= len(handle.regions) == 3  # spatial residual, text, feed-forward
        torch._dynamo.reset()
        out, grads = step(torch.compile(layer, backend="aot_eager"))
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for grad, expected in zip(grads, expected_grads):  # the compiled parts may sum gradients in another order
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_what_trains_is_never_recomputed_nor_leaned(seed):
    """A parameter unfrozen after lean_frozen gets the gradient the plain model gives it: its convolution and
    its region run plainly again."""
    model = video_unet("parallel", seed)
    inputs = model.example_inputs(BATCH, dtype=torch.float64)
    handle = lean_frozen(model, recompute=True)
    transformer = model.down[0].transformers[0]
    transformer.feed_forward.proj_in.weight.requires_grad_(True)
    model.down[0].resnets[0].conv1.weight.requires_grad_(True)
    step = training_step(model, inputs)
    handle.remove()
    expected = training_step(model, inputs)
    assert "down.0.resnets.0.conv1.weight" in expected[1]
    assert_same_step(step, expected, 1e-12)


def test_a_deep_copy_computes_with_its_own_weights(seed):
    """The changes are methods bound to their modules: a deep copy (an EMA model) binds them to its own."""
    model = video_unet("parallel", seed)
    inputs = model.example_inputs(1, dtype=torch.float64)
    with lean_frozen(model, recompute=True):
        twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    expected = video_unet("parallel", seed)
    expected.load_state_dict(twin.state_dict())
    assert_same_step(training_step(twin, inputs), training_step(expected, inputs), 1e-12)


def test_regions_skip_containers_convolution_wrappers_and_patched_modules():
    frozen = nn.Sequential(nn.Conv2d(2, 2, 1), nn.GroupNorm(1, 2)).requires_grad_(False)
    model = nn.ModuleDict(dict(frozen=frozen, convs=nn.Sequential(nn.Conv2d(2, 2, 1)).requires_grad_(False),
                               trains=nn.Linear(2, 2), blocks=nn.ModuleList([nn.Sequential(nn.Linear(2, 2),
                                                                                           nn.GELU())])))
    model.blocks.requires_grad_(False)
    assert [name for name, *_ in frozen_regions(model)] == ["frozen", "blocks.0"]
    frozen.forward = frozen.forward  # patched on the instance by someone else: its children are looked at
    assert [name for name, *_ in frozen_regions(model)] == ["blocks.0"]


CONVOLUTIONS = [
    (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1), (2, 4, 9, 8)),
    (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 3), padding=(1, 0),
                     dilation=(2, 1), groups=2, bias=False), (2, 4, 11, 10)),
    (nn.Conv3d, dict(in_channels=4, out_channels=4, kernel_size=(3, 1, 1), padding=(1, 0, 0)), (2, 4, 5, 3, 3)),
    (nn.Conv1d, dict(in_channels=4, out_channels=4, kernel_size=3, padding="same", dilation=2,
                     padding_mode="reflect"), (2, 4, 9)),
    (nn.Conv2d, dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding_mode="circular", padding=1),
     (2, 4, 7, 7)),
]


@pytest.mark.parametrize("cls,options,shape", CONVOLUTIONS, ids=["stride", "groups-dilation", "3d", "1d-same-reflect",
                                                                 "circular"])
def test_frozen_convolution_matches_torch_and_saves_nothing(cls, options, shape, seed):
    conv = cls(**options).double().requires_grad_(False)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def step():
        h = x * 1.0  # an activation, as in a network
        results = []
        saved = SavedActivationMeter(conv).measure(lambda: results.append(conv(h)))
        grad, = torch.autograd.grad(results[0].square().sum(), x)
        return results[0], grad, saved

    out, grad, plain_bytes = step()
    with lean_frozen(conv) as handle:
        assert handle.convolutions == [""]
        lean_out, lean_grad, lean_bytes = step()
    torch.testing.assert_close(lean_out, out)
    torch.testing.assert_close(lean_grad, grad)
    assert plain_bytes >= x.numel() * 8  # torch keeps the (padded) input
    assert lean_bytes == (x.numel() * 8 if conv.padding_mode in ("reflect", "replicate") else 0)  # the pad's input


def test_frozen_convolution_under_autocast_and_with_uneven_same_padding(seed):
    conv = nn.Conv2d(4, 6, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        return out, torch.autograd.grad(out.float().square().sum(), x)[0]

    expected = step()
    with lean_frozen(conv):
        out, grad = step()
    assert out.dtype == torch.bfloat16 and grad.dtype == torch.float32
    torch.testing.assert_close(out, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(grad, expected[1], rtol=0, atol=0)
    uneven = nn.Conv2d(4, 4, 4, padding="same").requires_grad_(False)
    with lean_frozen(uneven) as handle:
        assert handle.convolutions == []  # left as it is


def test_geglu_matches_two_ops_and_keeps_only_its_input(seed):
    projected = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)

    def step(activation):
        h = projected * 1.0
        meter = SavedActivationMeter()
        results = []
        meter.measure(lambda: results.append(activation(h)))
        grad, = torch.autograd.grad(results[0].square().sum(), projected)
        return results[0], grad, meter.peak

    def two_ops(h):
        hidden, gate = h.chunk(2, dim=-1)
        return hidden * F.gelu(gate)

    out, grad, lean_bytes = step(geglu)
    expected, expected_grad, plain_bytes = step(two_ops)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    assert lean_bytes == projected.numel() * 8 and plain_bytes == lean_bytes * 3 // 2
    with pytest.raises(ValueError, match="even last dimension"):
        geglu(torch.randn(2, 3))


def test_recomputed_replays_randomness_nests_and_keeps_only_inputs(seed):
    weight = torch.randn(6, 6, dtype=torch.float64)

    def region(x, *, scale, extra):
        h = F.dropout(torch.tanh(x @ weight) * scale, p=0.5)
        return {"h": h, "pair": (h.sin(), extra["n"])}

    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    h = x * 1.0
    results = []

    def run(fn):
        torch.manual_seed(seed)
        results.append(fn(h, scale=2.0, extra={"n": 3}))

    expected_bytes = SavedActivationMeter().measure(lambda: run(region))
    saved = SavedActivationMeter().measure(lambda: run(lambda *a, **k: recomputed(region, a, k)))
    expected, out = results
    assert out["pair"][1] == 3 and saved == h.numel() * 8 < expected_bytes
    torch.testing.assert_close(out["h"], expected["h"], rtol=0, atol=0)
    loss = lambda result: (result["h"] * 3 + result["pair"][0]).sum()
    grad, = torch.autograd.grad(loss(out), x, retain_graph=True)  # autograd.grad, not only backward()
    torch.testing.assert_close(grad, torch.autograd.grad(loss(expected), x)[0], rtol=0, atol=0)


def test_bad_arguments_and_double_application_are_refused(seed):
    model = video_unet("serial", seed)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        lean_frozen("model")
    with pytest.raises(TypeError, match="recompute must be a bool"):
        lean_frozen(model, recompute="yes")
    handle = lean_frozen(model)
    with pytest.raises(ValueError, match="already lean"):
        lean_frozen(model.down[0], recompute=True)
    handle.remove()
    lean_frozen(model.down[0], recompute=True).remove()
