"""ChopGrad on diffusers' video VAEs through decoder_recurrence (tiny random models, no downloads): the decode
equals vae.decode, a full window equals backpropagation through vae.decode, activation memory stays flat."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from pychop.chopgrad import scan, stream  # noqa: E402
from pychop.chopgrad.memory import SavedActivationMeter  # noqa: E402
from pychop.integrations.diffusers import WanDecoderRecurrence, decoder_recurrence  # noqa: E402
from tests.chopgrad_helpers import single_thread, take_grads  # noqa: E402, F401

LATENT = 4  # latent height and width


def wan(**extra):
    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                      temperal_downsample=[True, True], latents_mean=[0.0] * 4,
                                      latents_std=[1.0] * 4, **extra)


def ltx(**extra):
    return diffusers.AutoencoderKLLTXVideo(block_out_channels=(8,) * 4, latent_channels=4, layers_per_block=(1,) * 5,
                                           patch_size=2, **extra)


VAES = {
    "wan2.1": wan,
    "wan2.2": lambda: wan(decoder_base_dim=8, is_residual=True, patch_size=2, in_channels=12, out_channels=12),
    "qwenimage": lambda: diffusers.AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
    "cogvideox": lambda: diffusers.AutoencoderKLCogVideoX(block_out_channels=(8, 8, 16, 16), latent_channels=4,
                                                          layers_per_block=1, norm_num_groups=4),
    # Mochi's GroupNorms have 32 groups, so 32 channels is its smallest width.
    "mochi": lambda: diffusers.AutoencoderKLMochi(encoder_block_out_channels=(32,) * 4,
                                                  decoder_block_out_channels=(32,) * 4, latent_channels=4,
                                                  layers_per_block=(1,) * 5, add_attention_block=(False,) * 5),
    # Only a causal LTX decoder is a recurrence (the released ones are not); 0.9.5's residual upsamplers.
    "ltx-causal": lambda: ltx(decoder_causal=True, decoder_block_out_channels=(8, 16, 32),
                              decoder_spatio_temporal_scaling=(True,) * 3, decoder_layers_per_block=(1,) * 4,
                              decoder_inject_noise=(False,) * 4, upsample_residual=(True,) * 3,
                              upsample_factor=(2,) * 3),
}
# diffusers' RMSNorm (LTX) computes its statistics in float32 even in float64 models.
TOLERANCE = {"ltx-causal": 1e-5}
# Latent frame counts per VAE: CogVideoX decodes chunks of 2 latent frames, the first longer for odd counts.
FRAMES = {"cogvideox": 5}
SEGMENT_LENGTHS = {"cogvideox": [3, 2]}


def tiny(name, dtype=torch.float64):
    return VAES[name]().to(dtype).eval()


def latents(name, dtype=torch.float64, frames=None):
    return torch.randn(1, 4, frames or FRAMES.get(name, 3), LATENT, LATENT, dtype=dtype) * 0.5


def relative_error(actual, expected):
    """Largest difference over the largest expected entry, for the parameters as one vector and for z (some
    biases feed a GroupNorm, which cancels them: their gradients are zero up to rounding)."""
    flat = [torch.cat([g.flatten() for g in grads[:-1]]) for grads in (actual, expected)]
    return max(((a - e).abs().max() / e.abs().max()).item()
               for a, e in ((flat[0], flat[1]), (actual[-1], expected[-1])))


def segment_loss(rec, z):
    """A per-segment MSE against a fixed random video, and that video's frames per segment."""
    with torch.no_grad():
        state, counts = rec.init_state(), []
        for z_seg in rec.segments(z):
            state, y = rec.step(state, z_seg)
            counts.append(y.shape[2])
        target = torch.randn(y.shape[:2] + (sum(counts),) + y.shape[3:], dtype=z.dtype) * 0.5
    targets = target.split(counts, dim=2)
    return (lambda y, i: ((y - targets[i]) ** 2).mean()), counts


@pytest.mark.parametrize("name", list(VAES))
def test_decode_equals_vae_decode(seed, name):
    vae = tiny(name)
    rec = decoder_recurrence(vae)
    z = latents(name)
    if name in SEGMENT_LENGTHS:
        assert [s.shape[2] for s in rec.segments(z)] == SEGMENT_LENGTHS[name]
    tolerance = TOLERANCE.get(name, 1e-12)
    with torch.no_grad():
        expected = vae.decode(z).sample
        torch.testing.assert_close(rec.decode(z), expected, rtol=tolerance, atol=tolerance, msg=f"seed={seed}")
    _, outputs = stream(rec.step, rec.init_state(), rec.segments(z), segment_loss(rec, z)[0], window=1,
                        return_outputs=True)
    torch.testing.assert_close(torch.cat(outputs, dim=2), expected, rtol=tolerance, atol=tolerance,
                               msg=f"seed={seed}")


@pytest.mark.parametrize("name", list(VAES))
def test_full_window_gradient_equals_backprop_through_vae_decode(seed, name):
    """float64, decoder parameters and latents. Wan's and Qwen's upsampling and LTX's RMSNorm statistics run in
    float32 even in float64 models, so gradients summed in another order differ at float32 rounding, no more."""
    vae = tiny(name)
    rec = decoder_recurrence(vae)
    z = latents(name).requires_grad_()
    loss_fn, counts = segment_loss(rec, z)
    params = list(vae.decoder.parameters())
    video = vae.decode(z).sample
    sum(loss_fn(y, i) for i, y in enumerate(video.split(counts, dim=2))).backward()
    expected = take_grads(params + [z])
    n = len(counts)
    for strategy in ("recompute", "retain"):
        stream(rec.step, rec.init_state(), rec.segments(z), loss_fn, window=n, strategy=strategy)
        error = relative_error(take_grads(params + [z]), expected)
        assert error < 100 * TOLERANCE.get(name, 1e-8), f"{name} {strategy} seed={seed}: {error:.3g}"
    outputs = scan(rec.step, rec.init_state(), rec.segments(z), window=n)
    sum(loss_fn(y, i) for i, y in enumerate(outputs)).backward()
    error = relative_error(take_grads(params + [z]), expected)
    assert error < 100 * TOLERANCE.get(name, 1e-8), f"{name} scan seed={seed}: {error:.3g}"
    stream(rec.step, rec.init_state(), rec.segments(z), loss_fn, window=1)
    truncated = take_grads([z])[0]
    assert (truncated - expected[-1]).abs().max() > 1e-6 * expected[-1].abs().max(), "window 1 must truncate"


@pytest.mark.parametrize("name", ["wan2.1", "cogvideox", "mochi", "ltx-causal"])
def test_activation_memory_flat_in_frames(name):
    """Peak bytes saved for backward at window 1: 4x the latent frames within 5% of 1x."""
    torch.manual_seed(0)
    vae = tiny(name, torch.float32)
    rec = decoder_recurrence(vae)

    def peak(frames):
        z = latents(name, torch.float32, frames)
        loss_fn, _ = segment_loss(rec, z)
        return SavedActivationMeter().measure(
            lambda: stream(rec.step, rec.init_state(), rec.segments(z), loss_fn, window=1))

    base = 4 if name == "cogvideox" else 2
    short, long = peak(base), peak(4 * base)
    assert short > 0 and abs(long / short - 1) <= 0.05, (short, long)


def test_mochi_framewise_decoding_is_refused():
    """diffusers 0.42's framewise Mochi decoding drops the convolutions' spatial padding and fails."""
    vae = tiny("mochi", torch.float32)
    rec = decoder_recurrence(vae)
    vae._enable_framewise_decoding()
    with pytest.raises(ValueError, match="AutoencoderKLMochi with framewise decoding"):
        rec.segments(latents("mochi", torch.float32))
    with pytest.raises(ValueError, match="AutoencoderKLMochi with framewise decoding"):
        rec.step(rec.init_state(), latents("mochi", torch.float32, 1))


def test_refusals_name_the_class_and_why():
    hunyuan = diffusers.AutoencoderKLHunyuanVideo(block_out_channels=(8, 8, 8, 8), latent_channels=4,
                                                  norm_num_groups=4, layers_per_block=1)
    with pytest.raises(TypeError, match="AutoencoderKLHunyuanVideo.*GroupNorm.*every frame"):
        decoder_recurrence(hunyuan)
    small = dict(decoder_block_out_channels=(8,) * 4, decoder_layers_per_block=(1,) * 5)
    for extra, why in (({}, "not causal"), (dict(decoder_causal=True, decoder_inject_noise=(True,) * 5), "noise"),
                       (dict(decoder_causal=True, timestep_conditioning=True), "timestep")):
        with pytest.raises(TypeError, match=f"AutoencoderKLLTXVideo.*{why}"):
            decoder_recurrence(ltx(**small, **extra))
    with pytest.raises(TypeError, match="Linear is not a supported diffusers video VAE"):
        decoder_recurrence(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="AutoencoderKLWan"):
        WanDecoderRecurrence(torch.nn.Linear(2, 2))


def test_bad_latents_state_and_tiling():
    vae = tiny("wan2.1")
    rec = decoder_recurrence(vae)
    with pytest.raises(ValueError, match=r"z must be latents \(B, 4, T, h, w\)"):
        rec.segments(torch.zeros(1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="cache entries"):
        rec.step([None], torch.zeros(1, 4, 1, 4, 4))
    cog = decoder_recurrence(tiny("cogvideox"))
    with pytest.raises(ValueError, match="state must be None"):
        cog.step([1], torch.zeros(1, 4, 1, 4, 4))
    vae.enable_tiling()
    with pytest.raises(ValueError, match=r"tiling.*disable_tiling"):
        rec.segments(torch.zeros(1, 4, 2, 4, 4))


WIDER = {"wan2.1": lambda: wan(decoder_base_dim=16), "cogvideox": lambda: diffusers.AutoencoderKLCogVideoX(
    block_out_channels=(8, 8, 16, 32), latent_channels=4, layers_per_block=1, norm_num_groups=4),
    "mochi": lambda: diffusers.AutoencoderKLMochi(
        encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32, 32, 32, 64), latent_channels=4,
        layers_per_block=(1,) * 5, add_attention_block=(False,) * 5),
    "ltx-causal": lambda: ltx(decoder_causal=True, decoder_block_out_channels=(16, 32, 64),
                              decoder_spatio_temporal_scaling=(True,) * 3, decoder_layers_per_block=(1,) * 4,
                              decoder_inject_noise=(False,) * 4, upsample_residual=(True,) * 3,
                              upsample_factor=(2,) * 3)}


@pytest.mark.parametrize("name", list(WIDER))
def test_a_state_that_does_not_fit_names_the_mismatch(name):
    """A cache of another batch, or of a decoder of the same family with other widths, is refused before the
    decoder runs, naming the cache entry (they used to fail inside torch.cat with 'Sizes of tensors must
    match')."""
    torch.manual_seed(0)
    rec, other = decoder_recurrence(tiny(name)), decoder_recurrence(WIDER[name]().double().eval())
    z = latents(name)
    first, second = rec.segments(z)[:2]
    with torch.no_grad():
        state, _ = rec.step(rec.init_state(), torch.cat([first, first]))
        with pytest.raises(ValueError, match=r"state.* holds a cache of batch 2, but z_seg has batch 1"):
            rec.step(state, second)
        state, _ = rec.step(rec.init_state(), first)
        rec.step(state, second)  # the recurrence now knows its caches' shapes
        other_state, _ = other.step(other.init_state(), first)
        with pytest.raises(ValueError, match=r"state.* (has shape .* where this decoder's cache has|is not a cache "
                                             r"of this decoder).*another model"):
            rec.step(other_state, second)
