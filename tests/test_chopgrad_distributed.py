"""stream under DistributedDataParallel and FSDP2 (fully_shard): 2 processes, gloo, CPU. Each rank decodes its own
latents; the gradients after stream must equal the single-process gradients averaged over the ranks' data
(under FSDP2 each rank holds a shard of them; its full_tensor() is compared)."""

import pytest
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


def vae_rank_data(rank, rec):
    generator = torch.Generator().manual_seed(200 + rank)
    z = torch.randn(1, 4, SEGMENTS, 4, 4, generator=generator, dtype=torch.float64)
    targets = [torch.randn(1, 3, 1 if i == 0 else 4, 16, 16, generator=generator, dtype=torch.float64)
               for i in range(SEGMENTS)]
    return rec.segments(z), (lambda y, i: ((y - targets[i]) ** 2).mean())


def tiny_wan_vae():
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                           temperal_downsample=[True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4).double()
    vae.encoder.requires_grad_(False)  # a decoder fine-tune: DDP then waits for the decoder's gradients alone
    vae.quant_conv.requires_grad_(False)
    return vae


def vae_worker(rank):
    """An accelerate-prepared (DDP) Wan VAE decoded by stream on each rank's latents, against the single-process
    gradients averaged over both ranks' data; and the unwrapped VAE, which must be refused."""
    import os

    from accelerate import Accelerator

    from pychop.integrations.diffusers import decoder_recurrence

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      OMP_NUM_THREADS="1")
    accelerator = Accelerator(cpu=True)
    vae = accelerator.prepare(tiny_wan_vae())
    reference = tiny_wan_vae()
    results = {"wrapper": type(vae).__name__}
    for strategy in ("recompute", "retain"):
        rec = decoder_recurrence(vae)
        segments, loss_fn = vae_rank_data(rank, rec)
        stream(rec.step, rec.init_state(), segments, loss_fn, window=2, strategy=strategy,
               backward=accelerator.backward)
        plain = decoder_recurrence(reference)
        for other in range(WORLD):
            other_segments, other_loss = vae_rank_data(other, plain)
            # decode_chunk: the step unchecked, which would refuse to train outside DDP in a process group
            stream(plain.decode_chunk, plain.init_state(), other_segments, other_loss, window=2, strategy=strategy)
        trained = [(p, r) for p, r in zip(vae.parameters(), reference.parameters()) if r.grad is not None]
        results[strategy] = max(((p.grad - r.grad / WORLD).abs().max() / r.grad.abs().max()).item()
                                for p, r in trained)
        for p, r in zip(vae.parameters(), reference.parameters()):
            p.grad = r.grad = None
    unwrapped = decoder_recurrence(accelerator.unwrap_model(vae))
    segments, loss_fn = vae_rank_data(rank, unwrapped)
    try:
        stream(unwrapped.step, unwrapped.init_state(), segments, loss_fn)
        results["unwrapped"] = "no error"
    except RuntimeError as error:
        results["unwrapped"] = str(error)
    return results


@pytest.mark.slow  # two processes with diffusers' Wan VAE; test_stream_under_ddp_and_fsdp2 stays quick
def test_decoder_recurrence_of_a_ddp_vae_averages_gradients():
    pytest.importorskip("diffusers")
    pytest.importorskip("accelerate")
    for rank, results in run_ranks(vae_worker, world=WORLD):
        assert isinstance(results, dict), f"rank {rank} failed: {results}"
        assert results["wrapper"] == "DistributedDataParallel"
        for strategy in ("recompute", "retain"):
            assert results[strategy] < 1e-10, f"rank {rank} {strategy}: relative error {results[strategy]:.3g}"
        assert "runs outside DistributedDataParallel" in results["unwrapped"], results["unwrapped"]
