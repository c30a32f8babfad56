"""pychop.models.CausalVideoDecoder: the frame-by-frame step against the whole-clip forward."""

import pytest
import torch

from pychop.models import CausalDecoderConfig, CausalVideoDecoder
from tests.chopgrad_helpers import single_thread  # noqa: F401


def decode_by_steps(decoder, z):
    state, frames = decoder.init_state(), []
    for t in range(z.shape[2]):
        state, y = decoder.step(state, z[:, :, t:t + 1])
        frames.append(y)
    return torch.cat(frames, dim=2), state


@pytest.mark.parametrize("frames", [1, 2, 5])
def test_step_matches_whole_clip_forward(seed, frames):
    decoder = CausalVideoDecoder(CausalDecoderConfig.tiny()).double()
    z = torch.randn(2, 4, frames, 4, 6, dtype=torch.float64)
    whole = decoder(z)
    stepped, _ = decode_by_steps(decoder, z)
    assert whole.shape == (2, 3, 1 + 4 * (frames - 1), 16, 24)
    torch.testing.assert_close(stepped, whole, rtol=1e-12, atol=1e-12, msg=f"seed={seed}")


def test_decoder_is_causal(seed):
    """Changing latent frame t changes no output frame before t's own frames."""
    decoder = CausalVideoDecoder(CausalDecoderConfig.tiny()).double()
    z = torch.randn(1, 4, 4, 4, 4, dtype=torch.float64)
    changed = z.clone()
    changed[:, :, 2] += 1.0
    a, b = decoder(z), decoder(changed)
    first_changed = 1 + 4 * (2 - 1)
    assert torch.equal(a[:, :, :first_changed], b[:, :, :first_changed])
    assert not torch.allclose(a[:, :, first_changed:first_changed + 4], b[:, :, first_changed:first_changed + 4])


def test_step_is_pure(seed):
    decoder = CausalVideoDecoder(CausalDecoderConfig.tiny())
    z = torch.randn(1, 4, 3, 4, 4)
    _, state = decode_by_steps(decoder, z[:, :, :2])
    snapshot = [None if s is None else s.clone() for s in state]
    new_state, _ = decoder.step(state, z[:, :, 2:3])
    assert new_state is not state
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(state, snapshot))
    assert len(state) == len(new_state) == decoder.num_caches


def test_wan_config_has_wan_decoder_size():
    decoder = CausalVideoDecoder(CausalDecoderConfig.wan())
    assert 60e6 < sum(p.numel() for p in decoder.parameters()) < 90e6


def test_bad_input():
    decoder = CausalVideoDecoder(CausalDecoderConfig.tiny())
    with pytest.raises(ValueError, match="one latent frame"):
        decoder.step(decoder.init_state(), torch.zeros(1, 4, 2, 4, 4))
    with pytest.raises(ValueError, match="cache entries"):
        decoder.step([None], torch.zeros(1, 4, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, C, T, h, w\)"):
        decoder(torch.zeros(4, 4, 4))
    with pytest.raises(ValueError, match="one flag per upsampling"):
        CausalVideoDecoder(CausalDecoderConfig(channels=(8, 8), temporal_upsample=(True, True)))


def test_a_state_that_does_not_fit_names_the_mismatch():
    decoder = CausalVideoDecoder(CausalDecoderConfig.tiny())
    wider = CausalVideoDecoder(CausalDecoderConfig(latent_channels=4, out_channels=3, channels=(32, 8, 8),
                                                   num_res_blocks=1, temporal_upsample=(True, True)))
    z = torch.randn(2, 4, 1, 4, 4)
    with torch.no_grad():
        state, _ = decoder.step(decoder.init_state(), z)
        with pytest.raises(ValueError, match=r"state\[0\] holds a cache of shape \(2, 4, 2, 4, 4\); this "
                                             r"convolution needs \(1, 4, 2, 4, 4\) for its input"):
            decoder.step(state, z[:1])
        with pytest.raises(ValueError, match=r"state\[1\] .* needs \(2, 32, 2, 4, 4\).*another model"):
            wider.step(state, z)
        with pytest.raises(ValueError, match=r"state\[0\] must be None or a tensor, got str"):
            decoder.step(["Rep"] + state[1:], z)
