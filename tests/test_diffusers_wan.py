"""ChopGrad on diffusers' AutoencoderKLWan decoder (tiny random models, Wan 2.1 and 2.2 layouts)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from pychop.chopgrad import scan, stream  # noqa: E402
from pychop.integrations.diffusers import WanDecoderRecurrence  # noqa: E402
from tests.chopgrad_helpers import max_relative_difference, take_grads, single_thread  # noqa: E402, F401

LAYOUTS = {
    "wan2.1": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True]),
    "wan2.2": dict(base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                   temperal_downsample=[True, True], is_residual=True, patch_size=2, in_channels=12,
                   out_channels=12),
}
SEGMENTS = 3


def tiny_vae(layout, dtype=torch.float32):
    vae = diffusers.AutoencoderKLWan(**LAYOUTS[layout], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return vae.to(dtype).eval()


def video_loss(vae, dtype):
    """A per-segment loss against a fixed random target, on the decoded frames."""
    sizes = [1] + [4] * (SEGMENTS - 1)
    with torch.no_grad():
        shape = vae.decode(torch.zeros(1, 4, SEGMENTS, 4, 4, dtype=dtype)).sample.shape
    target = torch.randn(shape, dtype=dtype) * 0.5
    targets = target.split(sizes, dim=2)
    return lambda y, i: ((y - targets[i]) ** 2).mean()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_decoded_video_equals_vae_decode(seed, layout):
    vae = tiny_vae(layout)
    z = torch.randn(1, 4, SEGMENTS, 4, 4)
    wan = WanDecoderRecurrence(vae)
    with torch.no_grad():
        expected = vae.decode(z).sample
        torch.testing.assert_close(wan.decode(z), expected, rtol=0, atol=0, msg=f"seed={seed}")
    _, outputs = stream(wan.step, wan.init_state(), wan.segments(z), video_loss(vae, z.dtype), window=1,
                        return_outputs=True)
    torch.testing.assert_close(torch.cat(outputs, dim=2), expected, rtol=1e-6, atol=1e-6, msg=f"seed={seed}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_full_window_gradient_equals_full_backprop(seed, layout):
    """float64: parameters of the decoder and the latents. diffusers' WanUpsample runs in float32 even for
    float64 models, so gradients summed in another order differ at float32 rounding (~1e-8), no more."""
    vae = tiny_vae(layout, torch.float64)
    wan = WanDecoderRecurrence(vae)
    loss_fn = video_loss(vae, torch.float64)
    params = [p for p in vae.parameters()]
    z = (torch.randn(1, 4, SEGMENTS, 4, 4, dtype=torch.float64) * 0.5).requires_grad_()
    video = vae.decode(z).sample
    sum(loss_fn(y, i) for i, y in enumerate(video.split([1] + [4] * (SEGMENTS - 1), dim=2))).backward()
    expected = take_grads(params + [z])
    for strategy in ("recompute", "retain"):
        stream(wan.step, wan.init_state(), wan.segments(z), loss_fn, window=SEGMENTS, strategy=strategy)
        actual = take_grads(params + [z])
        assert max_relative_difference(actual, expected) < 1e-6, f"{layout} {strategy} seed={seed}"
    outputs = scan(wan.step, wan.init_state(), wan.segments(z), window=SEGMENTS)
    sum(loss_fn(y, i) for i, y in enumerate(outputs)).backward()
    assert max_relative_difference(take_grads(params + [z]), expected) < 1e-6, f"{layout} scan seed={seed}"


def test_truncated_window_differs_and_bad_vae():
    torch.manual_seed(0)
    vae = tiny_vae("wan2.1", torch.float64)
    wan = WanDecoderRecurrence(vae)
    loss_fn = video_loss(vae, torch.float64)
    z = torch.randn(1, 4, SEGMENTS, 4, 4, dtype=torch.float64, requires_grad=True)
    stream(wan.step, wan.init_state(), wan.segments(z), loss_fn, window=1)
    short = take_grads([z])[0]
    stream(wan.step, wan.init_state(), wan.segments(z), loss_fn, window=SEGMENTS)
    full = take_grads([z])[0]
    assert (short - full).abs().max() > 1e-8 * full.abs().max()
    with pytest.raises(TypeError, match="AutoencoderKLWan"):
        WanDecoderRecurrence(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="cache entries"):
        wan.step([None], z[:, :, :1])
