"""pychop.models.VideoUNet: both forms run, agree where they must, and freeze_spatial trains only temporal layers."""

import pytest
import torch

from pychop.models import SD15_VIDEO, TINY, VideoUNet, VideoUNetConfig
from tests.checks import relative_error, runnable_backends


def make_pair(seed):
    torch.manual_seed(seed)
    serial = VideoUNet(TINY, "serial")
    parallel = VideoUNet(TINY, "parallel", backend="torch")
    parallel.load_state_dict(serial.state_dict())  # identical parameters in both forms
    return serial, parallel


def zero_temporal_updates(model):
    with torch.no_grad():
        for module in model.temporal_modules():
            last = module.to_out if hasattr(module, "to_out") else module.conv
            last.weight.zero_()
            last.bias.zero_()


def test_forms_agree_when_temporal_layers_are_silent_and_differ_otherwise(seed):
    serial, parallel = make_pair(seed)
    inputs = serial.example_inputs(batch=2)
    out_serial, out_parallel = serial(*inputs), parallel(*inputs)
    assert out_serial.shape == (2, TINY.num_frames, TINY.out_channels, *TINY.latent_size)
    assert relative_error(out_parallel.double(), out_serial.double()) > 1e-4
    zero_temporal_updates(serial)
    zero_temporal_updates(parallel)
    assert relative_error(parallel(*inputs).double(), serial(*inputs).double()) < 1e-5


@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_freeze_spatial_trains_only_temporal_layers(mode, seed):
    torch.manual_seed(seed)
    model = VideoUNet(TINY, mode).freeze_spatial()
    temporal = {id(p) for m in model.temporal_modules() for p in m.parameters()}
    assert temporal and all(p.requires_grad == (id(p) in temporal) for p in model.parameters())
    model(*model.example_inputs()).square().mean().backward()
    for name, p in model.named_parameters():
        if id(p) in temporal:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"{name} is spatial but got a gradient"


@pytest.mark.parametrize("backend", runnable_backends(interpreted=False))
def test_parallel_unet_every_backend_matches_torch_backend(backend, seed):
    serial, reference = make_pair(seed)
    model = VideoUNet(TINY, "parallel", backend=backend)
    model.load_state_dict(reference.state_dict())
    model.freeze_spatial()
    reference.freeze_spatial()
    inputs = model.example_inputs()
    out, out_ref = model(*inputs), reference(*inputs)
    assert relative_error(out.double(), out_ref.double()) < 1e-4
    out.square().mean().backward()
    out_ref.square().mean().backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        if p.requires_grad:
            assert relative_error(p.grad.double(), p_ref.grad.double()) < 1e-3, name


def test_realistic_config_is_about_sd15():
    with torch.device("meta"):  # shapes only: no 4 GB of weights on the test machine
        model = VideoUNet(SD15_VIDEO, "parallel")
    spatial = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for m in model.temporal_modules() for p in m.parameters())
    assert 0.8e9 < spatial < 0.95e9  # SD 1.5's UNet has about 860M parameters
    assert SD15_VIDEO.num_frames == 16 and min(SD15_VIDEO.latent_size) >= 32


def test_bad_input_is_named():
    model = VideoUNet(TINY)
    sample, timestep, text = model.example_inputs()
    with pytest.raises(ValueError, match="st_mode must be one of"):
        VideoUNet(TINY, "diagonal")
    with pytest.raises(ValueError, match=r"sample must have shape \(B, T, 4, H, W\)"):
        model(sample[:, :, :3], timestep, text)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(sample[..., :7], timestep, text)
    with pytest.raises(ValueError, match="timestep must have shape"):
        model(sample, timestep[None], text)
    with pytest.raises(ValueError, match="text must have shape"):
        model(sample, timestep, text[..., :-1])
    with pytest.raises(ValueError, match="attention must have one entry per stage"):
        VideoUNetConfig(block_channels=(32, 64), attention=(True,))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_realistic_training_step_on_gpu(mode):
    """SD15_VIDEO in bf16 on a GPU: a training step runs in both forms and trains only the temporal layers."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = VideoUNet(SD15_VIDEO, mode).to(torch.bfloat16).freeze_spatial()
    inputs = model.example_inputs(batch=1, device="cuda", dtype=torch.bfloat16)
    out = model(*inputs)
    assert out.shape == (1, 16, 4, 32, 32) and torch.isfinite(out).all()
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
