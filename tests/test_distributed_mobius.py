"""A Mobius training step (VideoUNet in parallel form, spatial layers frozen, lean_frozen) under
DistributedDataParallel and under FSDP2 (fully_shard): 2 processes, gloo, CPU. Each rank trains on its own
data; the gradients must equal the single-process gradients of the plain model averaged over the ranks' data,
and frozen parameters get none."""

import warnings

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from pychop.memory import lean_frozen
from pychop.models import TINY, VideoUNet
from tests.distributed import run_ranks

WORLD = 2
CONFIGS = [("ddp", False), ("ddp", True), ("fsdp2", False), ("fsdp2", True)]  # (wrapper, lean recompute)


def mobius_unet():
    torch.manual_seed(0)
    return VideoUNet(TINY, "parallel", backend="torch").double().freeze_spatial()


def rank_batch(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    sample = torch.randn(1, TINY.num_frames, TINY.in_channels, *TINY.latent_size, generator=generator,
                         dtype=torch.float64)
    text = torch.randn(1, TINY.text_length, TINY.text_dim, generator=generator, dtype=torch.float64)
    target = torch.randn(sample.shape, generator=generator, dtype=torch.float64)
    return (sample, torch.tensor([100 + 300 * rank]), text), target


def loss(model, rank):
    inputs, target = rank_batch(rank)
    return F.mse_loss(model(*inputs), target)


def full_gradient(grad):
    return grad.full_tensor() if isinstance(grad, DTensor) else grad


def worker(rank):
    reference = mobius_unet()  # plain, one process, every rank's data
    for other in range(WORLD):
        loss(reference, other).backward()
    expected = {name: p.grad / WORLD for name, p in reference.named_parameters() if p.grad is not None}
    results = []
    for wrapper, recompute in CONFIGS:
        model = mobius_unet()
        lean_frozen(model, recompute=recompute)
        if wrapper == "ddp":
            trained = torch.nn.parallel.DistributedDataParallel(model)
        else:
            trained = fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*returned a view tensor")  # FSDP2 on the UNet's view
            loss(trained, rank).backward()
        grads = {name: full_gradient(p.grad) for name, p in model.named_parameters() if p.grad is not None}
        error = max(((grads[name] - grad).abs().max() / grad.abs().max()).item() for name, grad in expected.items())
        results.append((sorted(grads) == sorted(expected), error))
    return results


def test_mobius_step_with_lean_frozen_under_ddp_and_fsdp2():
    for rank, results in run_ranks(worker, world=WORLD):
        assert isinstance(results, list), f"rank {rank} failed:\n{results}"
        for (wrapper, recompute), (same_parameters, error) in zip(CONFIGS, results):
            config = f"rank {rank}, {wrapper}, lean_frozen(recompute={recompute})"
            assert same_parameters, f"{config}: not the trainable parameters that get gradients"
            assert error < 1e-10, f"{config}: relative error {error:.3g}"
