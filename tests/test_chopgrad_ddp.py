"""stream under DistributedDataParallel: 2 processes, gloo, CPU. Each rank decodes its own latents; the
gradients after stream must equal the single-process gradients averaged over the ranks' data."""

import torch

from pychop.chopgrad import stream
from pychop.models import CausalDecoderConfig, CausalVideoDecoder
from tests.distributed import run_ranks

WORLD = 2
SEGMENTS = 3


class DecoderStep(torch.nn.Module):
    """A module whose forward is the decoder's step, so that DDP can wrap it."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, state, z_t):
        return self.decoder.step(state, z_t)


def rank_data(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    z = torch.randn(1, 4, SEGMENTS, 4, 4, generator=generator)
    target = torch.randn(1, 3, 1 + 4 * (SEGMENTS - 1), 16, 16, generator=generator)
    targets = target.split([1] + [4] * (SEGMENTS - 1), dim=2)
    return list(z.split(1, dim=2)), (lambda y, i: ((y - targets[i]) ** 2).mean())


CONFIGS = [(2, "recompute"), (2, "retain"), (1, "retain")]


def worker(rank):
    errors = []
    for window, strategy in CONFIGS:
        torch.manual_seed(0)
        decoder = CausalVideoDecoder(CausalDecoderConfig.tiny())
        reference = CausalVideoDecoder(CausalDecoderConfig.tiny())
        reference.load_state_dict(decoder.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(DecoderStep(decoder))
        segments, loss_fn = rank_data(rank)
        stream(ddp, decoder.init_state(), segments, loss_fn, window=window, strategy=strategy)
        for other in range(WORLD):  # the single-process gradients on every rank's data, summed
            other_segments, other_loss = rank_data(other)
            stream(reference.step, reference.init_state(), other_segments, other_loss, window=window,
                   strategy=strategy)
        errors.append(max(((p.grad - r.grad / WORLD).abs().max() / r.grad.abs().max()).item()
                          for p, r in zip(decoder.parameters(), reference.parameters())))
    return errors


def test_stream_under_ddp_averages_gradients():
    for rank, errors in run_ranks(worker, world=WORLD):
        assert isinstance(errors, list), f"rank {rank} failed: {errors}"
        for (window, strategy), error in zip(CONFIGS, errors):
            assert error < 1e-5, f"rank {rank}, window={window} {strategy}: relative error {error:.3g}"
