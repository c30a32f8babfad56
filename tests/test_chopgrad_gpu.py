"""ChopGrad on a GPU (skipped without CUDA): allocator peak flat in frames, forward exact, full window =
full backprop, at the benchmark's realistic decoder (Wan 2.1 widths) with small latents."""

from functools import partial

import pytest
import torch

from pychop.chopgrad import stream
from pychop.models import CausalDecoderConfig, CausalVideoDecoder
from tests.chopgrad_helpers import max_relative_difference, take_grads

pytestmark = pytest.mark.gpu


def setup(segments, dtype=torch.float32, config=None, latent=8):
    torch.manual_seed(0)
    decoder = CausalVideoDecoder(config or CausalDecoderConfig.wan()).to("cuda", dtype)
    z = [torch.randn(1, decoder.config.latent_channels, 1, latent, latent, device="cuda", dtype=dtype)
         for _ in range(segments)]
    return decoder, z, lambda y, i: (y.float() ** 2).mean()


def peak_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


@pytest.mark.parametrize("strategy", ["recompute", "retain"])
def test_allocator_peak_flat_in_frames(strategy):
    peaks = {}
    for segments in (5, 17):
        decoder, z, loss_fn = setup(segments, torch.bfloat16)
        peaks[segments] = peak_mb(partial(stream, decoder.step, decoder.init_state(), z, loss_fn, window=2,
                                          strategy=strategy))
    assert peaks[17] <= peaks[5] * 1.05, peaks


def test_full_window_matches_full_backprop_on_gpu():
    decoder, z, loss_fn = setup(4, config=CausalDecoderConfig.tiny())
    params = list(decoder.parameters())
    state, total = decoder.init_state(), 0
    for i, x in enumerate(z):
        state, y = decoder.step(state, x)
        total = total + loss_fn(y, i)
    total.backward()
    expected = take_grads(params)
    stream(decoder.step, decoder.init_state(), z, loss_fn, window=4)
    assert max_relative_difference(take_grads(params), expected) < 1e-4  # TF32 / nondeterministic kernels
