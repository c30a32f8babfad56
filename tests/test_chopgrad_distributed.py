"""stream under DistributedDataParallel and FSDP2 (fully_shard): 2 processes, gloo, CPU. Each rank decodes its own
latents; the gradients after stream must equal the single-process gradients averaged over the ranks' data
(under FSDP2 each rank holds a shard of them; its full_tensor() is compared)."""

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


CONFIGS = [("ddp", 2, "recompute"), ("ddp", 2, "retain"), ("ddp", 1, "retain"),
           ("fsdp2", 2, "recompute"), ("fsdp2", 2, "retain"), ("fsdp2", SEGMENTS, "recompute")]


def wrapped(kind, decoder):
    """The decoder's step as a DDP module or as an FSDP2-sharded module (fully_shard), on the CPU."""
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(DecoderStep(decoder))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    return fully_shard(DecoderStep(decoder), mesh=init_device_mesh("cpu", (WORLD,)))


def full_grad(param):
    grad = param.grad
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def worker(rank):
    errors = []
    for kind, window, strategy in CONFIGS:
        torch.manual_seed(0)
        decoder = CausalVideoDecoder(CausalDecoderConfig.tiny())
        reference = CausalVideoDecoder(CausalDecoderConfig.tiny())
        reference.load_state_dict(decoder.state_dict())
        step = wrapped(kind, decoder)
        segments, loss_fn = rank_data(rank)
        stream(step, decoder.init_state(), segments, loss_fn, window=window, strategy=strategy)
        for other in range(WORLD):  # the single-process gradients on every rank's data, summed
            other_segments, other_loss = rank_data(other)
            stream(reference.step, reference.init_state(), other_segments, other_loss, window=window,
                   strategy=strategy)
        errors.append(max(((full_grad(p) - r.grad / WORLD).abs().max() / r.grad.abs().max()).item()
                          for p, r in zip(step.parameters(), reference.parameters())))
    return errors


def test_stream_under_ddp_and_fsdp2_averages_gradients():
    for rank, errors in run_ranks(worker, world=WORLD):
        assert isinstance(errors, list), f"rank {rank} failed: {errors}"
        for (kind, window, strategy), error in zip(CONFIGS, errors):
            assert error < 1e-5, f"rank {rank}, {kind} window={window} {strategy}: relative error {error:.3g}"
