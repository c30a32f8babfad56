"""Frames sharded over a process group (gloo, CPU, float64): the attention ops' ``frame_group``, the frame-mixing
ops, ``pychop.distributed.shard_frames`` on VideoUNet (both forms) and diffusers' UNetMotionModel (serial and
converted), and a training step on a 2-D (data x frames) mesh under DDP and FSDP2.

Every rank holds a contiguous block of the frames of the same videos (uneven counts included); its outputs and
its input gradients must equal those frames of one process running all frames, and the parameter gradients,
summed over the ranks, the single process's, to 1e-12 relative. Spawning processes is slow on a small CI
machine, so one spawn per world size runs every check (``results``) and the tests read its report.
"""

import copy
import warnings
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import pychop
from pychop.distributed import FrameShards, frame_mean, local_frames, shard_frames
from pychop.memory import lean_frozen
from pychop.models import TINY, VideoUNet
from pychop.nn import ParallelSTBlock
from pychop.ops.frame_mixing import frame_group_norm, frame_halo
from tests.checks import TEMPORAL_OPTIONS, input_count, make_inputs, mixed_layout_inputs, op_call, relative_error
from tests.distributed import run_ranks

BOUND = 1e-12
FUSED_BOUND = 1e-5  # float32 on a fused backend, sharded against one process on the same backend
# (B, S, H, D) per world size, chosen so that the temporal chunks split tokens S, heads H, batch B, and S unevenly.
OP_SHAPES = {2: [(1, 4, 3, 8), (1, 3, 2, 4), (2, 3, 3, 4), (1, 5, 3, 4)],
             4: [(1, 8, 2, 4), (1, 5, 3, 4)]}
FRAMES = {2: (4, 5), 4: (6,)}  # even and uneven over the ranks (5 over 2: 3 + 2; 6 over 4: 2 + 2 + 1 + 1)
MODEL_FRAMES = {2: 3, 4: 5}  # uneven: 2 + 1, and 2 + 1 + 1 + 1


def seeded(seed):
    """The same random numbers on every rank."""
    return torch.Generator().manual_seed(seed)


def full_and_local(full_inputs, shards, dim=1):
    """Leaf copies of the whole inputs (for one process) and of this rank's frames of them."""
    whole = [x.detach().clone().requires_grad_() for x in full_inputs]
    local = [x.detach().narrow(dim, shards.offset, shards.local_frames).clone().requires_grad_()
             for x in full_inputs]
    return whole, local


def frames_error(local, whole, shards, dim=1):
    return relative_error(local, whole.narrow(dim, shards.offset, shards.local_frames))


def summed(grad, group):
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad


# --------------------------------------------------------------------------------------------------------------
# The op.
# --------------------------------------------------------------------------------------------------------------

def op_checks(world, group):
    """(name, error) of every op, temporal option, shape and frame count: outputs and input gradients."""
    found, seed = [], 0
    for T in FRAMES[world]:
        shards = FrameShards.split(group, T)
        for B, S, H, D in OP_SHAPES[world]:
            for op in ("parallel", "stacked", "temporal", "spatial"):
                for options in TEMPORAL_OPTIONS if op != "spatial" else [{}]:
                    seed += 1
                    torch.manual_seed(seed)  # the same on every rank
                    count = input_count(op)
                    inputs = make_inputs((B, T, S, H, D), torch.float64, "cpu", count, packed=op == "parallel")
                    whole, local = full_and_local(inputs, shards)
                    reference = op_call(op, whole, backend="torch", **options)
                    weight = torch.randn(reference.shape, dtype=torch.float64)
                    (reference * weight).sum().backward()
                    out = op_call(op, local, backend="auto", frame_group=group, **options)
                    (out * weight.narrow(1, shards.offset, shards.local_frames)).sum().backward()
                    name = f"{op} T={T} shape={(B, S, H, D)} {options}"
                    found.append((name, max([frames_error(out, reference, shards)] +
                                            [frames_error(a.grad, b.grad, shards) for a, b in zip(local, whole)])))
    # Inputs of six different layouts, and the group given as FrameShards (no gather).
    shards = FrameShards.split(group, FRAMES[world][-1])
    torch.manual_seed(7)
    whole, local = full_and_local(mixed_layout_inputs((1, shards.num_frames, 5, 3, 4), torch.float64, "cpu", 6),
                                  shards)
    reference = pychop.parallel_st_attention(*whole, temporal_window=2, backend="torch")
    reference.sum().backward()
    out = pychop.parallel_st_attention(*local, temporal_window=2, frame_group=shards)
    out.sum().backward()
    found.append(("mixed layouts, FrameShards", max([frames_error(out, reference, shards)] +
                                                     [frames_error(a.grad, b.grad, shards)
                                                      for a, b in zip(local, whole)])))
    return found


class _Logged(torch.autograd.Function):
    """Identity that logs when the gradient reaches it (the spatial branch's backward is then done)."""

    @staticmethod
    def forward(ctx, log, x):
        ctx.log = log
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append("spatial backward done")
        return None, grad


def overlap_checks(group):
    """(name, 0 if the events came in the order of the module docstring of pychop.ops.frame_parallel, else 1): the
    q, k, v all-to-all issued asynchronously before the spatial branch and waited on after it; in the backward the
    gradients' all-to-all issued before the spatial backward and waited on after it."""
    from pychop.ops import frame_parallel

    log = []
    all_to_all, spatial = dist.all_to_all_single, frame_parallel.spatial_attention

    class LoggedWork:
        def __init__(self, work):
            self.work = work

        def wait(self):
            log.append("wait")
            return self.work.wait()

    def logged_all_to_all(*args, async_op=False, **kwargs):
        log.append(f"all-to-all {'async' if async_op else 'sync'}")
        work = all_to_all(*args, async_op=async_op, **kwargs)
        return LoggedWork(work) if async_op else work

    def logged_spatial(q, k, v, **kwargs):  # the gradient reaches the logging identity when the branch's is done
        out = spatial(_Logged.apply(log, q), k, v, **kwargs)
        log.append("spatial forward done")
        return out

    torch.manual_seed(9)
    q_s, k_s, v_s, q_t, k_t, v_t = make_inputs((1, 2, 4, 2, 4), torch.float64, "cpu", 6)
    with mock.patch.object(dist, "all_to_all_single", logged_all_to_all), \
            mock.patch.object(frame_parallel, "spatial_attention", logged_spatial):
        out = pychop.parallel_st_attention(q_s, k_s, v_s, q_t, k_t, v_t, frame_group=group)
        log.append("forward returned")
        out.sum().backward()
    expected = ["all-to-all async", "spatial forward done", "wait", "all-to-all sync", "forward returned",
                "all-to-all sync", "all-to-all async", "spatial backward done", "wait"]
    return [(f"overlap: events {log}", 0.0 if log == expected else 1.0)]


def fused_checks(group):
    """(name, error) of the fused CPU backend in float32, sharded against one process on the same backend."""
    if pychop.available_backends("cpu")["cpp"] is not None:
        return []
    found = []
    shards = FrameShards.split(group, 5)
    for op in ("parallel", "stacked", "temporal"):
        torch.manual_seed(11)
        whole, local = full_and_local(make_inputs((1, 5, 6, 2, 8), torch.float32, "cpu", input_count(op)), shards)
        reference = op_call(op, whole, backend="cpp", causal=True, grad_window=2)
        weight = torch.randn(reference.shape)
        (reference * weight).sum().backward()
        out = op_call(op, local, backend="cpp", causal=True, grad_window=2, frame_group=group)
        (out * weight.narrow(1, shards.offset, shards.local_frames)).sum().backward()
        found.append((f"cpp float32 {op}", max([frames_error(out, reference, shards)] +
                                               [frames_error(a.grad, b.grad, shards) for a, b in zip(local, whole)])))
    return found


def mixing_checks(world, group):
    """(name, error) of frame_group_norm against group_norm and of frame_halo + convolution against a padded one."""
    T = 8 if world == 4 else 5
    shards = FrameShards.split(group, T)
    torch.manual_seed(3)
    video = torch.randn(2, 6, T, 3, 2, dtype=torch.float64) * 3 + 1
    weight, bias = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    (x,), (x_local,) = full_and_local([video], shards, dim=2)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    w_local, b_local = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    grad_out = torch.randn(video.shape, dtype=torch.float64)
    reference = F.group_norm(x, 3, w, b, 1e-5)
    (reference * grad_out).sum().backward()
    out = frame_group_norm(x_local, 3, w_local, b_local, 1e-5, frame_group=group)
    (out * grad_out.narrow(2, shards.offset, shards.local_frames)).sum().backward()
    norm_error = max(frames_error(out, reference, shards, 2), frames_error(x_local.grad, x.grad, shards, 2),
                     relative_error(summed(w_local.grad, group), w.grad),
                     relative_error(summed(b_local.grad, group), b.grad))

    kernel = torch.randn(4, 6, 5, 1, 1, dtype=torch.float64)  # 5 frames: a halo of 2
    (x,), (x_local,) = full_and_local([video], shards, dim=2)
    reference = F.conv3d(x, kernel, padding=(2, 0, 0))
    grad_out = torch.randn(reference.shape, dtype=torch.float64)
    (reference * grad_out).sum().backward()
    out = F.conv3d(frame_halo(x_local, 2, 2, frame_group=group), kernel)
    (out * grad_out.narrow(2, shards.offset, shards.local_frames)).sum().backward()
    halo_error = max(frames_error(out, reference, shards, 2), frames_error(x_local.grad, x.grad, shards, 2))
    return [("frame_group_norm", norm_error), ("frame_halo width 2", halo_error)]


# --------------------------------------------------------------------------------------------------------------
# The models.
# --------------------------------------------------------------------------------------------------------------

def model_errors(model, sharded, whole_inputs, local_inputs, frame_dims, call, group, shards):
    """Max relative error of the sharded model's outputs, input gradients and summed parameter gradients."""
    reference = call(model, whole_inputs)
    weight = torch.randn(reference.shape, generator=seeded(5), dtype=torch.float64)
    (reference * weight).sum().backward()
    out = call(sharded, local_inputs)
    (out * weight.narrow(frame_dims[0], shards.offset, shards.local_frames)).sum().backward()
    errors = [frames_error(out, reference, shards, frame_dims[0])]
    for a, b, dim in zip(local_inputs, whole_inputs, frame_dims):
        if b.grad is not None:
            errors.append(frames_error(a.grad, b.grad, shards, dim) if dim is not None
                          else relative_error(summed(a.grad, group), b.grad))
    params = dict(model.named_parameters())
    for name, p in sharded.named_parameters():
        if p.grad is not None:
            errors.append(relative_error(summed(p.grad, group), params[name].grad))
    grads = sum(p.grad is not None for p in sharded.parameters())
    return max(errors), grads == sum(p.grad is not None for p in model.parameters()) > 0


def video_unet_checks(world, group):
    found = []
    T = MODEL_FRAMES[world]
    shards = FrameShards.split(group, T)
    for st_mode in ("serial", "parallel"):
        torch.manual_seed(0)
        model = VideoUNet(TINY, st_mode, backend="torch").double()
        sharded = VideoUNet(TINY, st_mode, backend="torch").double()
        sharded.load_state_dict(model.state_dict())
        handle = shard_frames(sharded, group)
        generator = seeded(1)
        sample = torch.randn(2, T, TINY.in_channels, *TINY.latent_size, generator=generator, dtype=torch.float64)
        text = torch.randn(2, TINY.text_length, TINY.text_dim, generator=generator, dtype=torch.float64)
        whole, local = full_and_local([sample], shards)
        text_whole, text_local = text.clone().requires_grad_(), text.clone().requires_grad_()
        call = lambda m, inputs: m(inputs[0], torch.tensor([10, 900]), inputs[1])
        error, all_grads = model_errors(model, sharded, whole + [text_whole], local + [text_local], (1, None), call,
                                        group, shards)
        names = handle.module_names
        found.append((f"VideoUNet {st_mode}", error))
        found.append((f"VideoUNet {st_mode}: every parameter has its gradient", 0.0 if all_grads else 1.0))
        found.append((f"VideoUNet {st_mode}: temporal convs and attention blocks sharded",
                      0.0 if any("temporal" in n for n in names) and any("st_block" in n for n in names) else 1.0))
        handle.remove()
        found.append((f"VideoUNet {st_mode}: remove() unshards",
                      0.0 if all(getattr(m, "frame_group", None) is None for m in sharded.modules()) else 1.0))
    return found


def block_checks(world, group):
    """(name, error) of a ParallelSTBlock with temporal options, with and without recompute_projection, its
    frame_group set (as shard_frames sets it) against the block on all frames."""
    found = []
    shards = FrameShards.split(group, MODEL_FRAMES[world] + 1)
    for recompute in (False, True):
        torch.manual_seed(4)
        block = ParallelSTBlock(16, 2, backend="torch", temporal_causal=True, temporal_window=3,
                                temporal_grad_window=2).double()
        sharded = copy.deepcopy(block)
        sharded.recompute_projection = recompute
        sharded.frame_group = group
        (x,), (x_local,) = full_and_local([torch.randn(2, shards.num_frames, 6, 16, dtype=torch.float64)], shards)
        error, _ = model_errors(block, sharded, [x], [x_local], (1,), lambda m, inputs: m(inputs[0]), group,
                                        shards)
        found.append((f"ParallelSTBlock temporal options, recompute_projection={recompute}", error))
    return found


def tiny_motion_unet():
    from diffusers import UNetMotionModel
    torch.manual_seed(0)
    return UNetMotionModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
                           down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                           up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), cross_attention_dim=24,
                           num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=8).double()


def motion_unet_checks(world, group):
    from pychop.integrations.diffusers import convert_to_parallel
    found = []
    T, B = MODEL_FRAMES[world], 2
    shards = FrameShards.split(group, T)
    for converted in (False, True):
        model, sharded = tiny_motion_unet(), tiny_motion_unet()
        if converted:
            convert_to_parallel(model)
            convert_to_parallel(sharded)
        handle = shard_frames(sharded, group, backend="torch")
        generator = seeded(2)
        sample = torch.randn(B, 4, T, 8, 8, generator=generator, dtype=torch.float64)  # (B, C, T, H, W)
        text = torch.randn(B, T, 5, 24, generator=generator, dtype=torch.float64)  # one per frame
        (whole, local), (whole_text, local_text) = full_and_local([sample], shards, 2), full_and_local([text], shards)
        call = lambda m, inputs: m(inputs[0], torch.tensor([10, 700]), inputs[1].flatten(0, 1)).sample
        error, all_grads = model_errors(model, sharded, whole + whole_text, local + local_text, (2, 1), call, group,
                                        shards)
        form = "converted" if converted else "serial"
        found.append((f"UNetMotionModel {form}", error))
        found.append((f"UNetMotionModel {form}: every parameter has its gradient", 0.0 if all_grads else 1.0))
        names = handle.module_names
        found.append((f"UNetMotionModel {form}: norms and positional embeddings sharded",
                      0.0 if any(n.endswith(".norm") for n in names) and any("pos_embed" in n for n in names)
                      else 1.0))
        handle.remove()
    return found


def refusal_checks(world, group):
    """(name, 0 when the bad call raised the expected error on this rank, else 1)."""
    from diffusers import UNet3DConditionModel

    def raises(error_type, words, fn):
        try:
            fn()
        except error_type as error:
            return 0.0 if all(word in str(error) for word in words) else 1.0
        return 1.0

    rank = dist.get_rank(group)
    x = torch.randn(1, 2, 3, 2, 4, dtype=torch.float64)
    unet_3d = UNet3DConditionModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
                                   down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                   up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=24,
                                   attention_head_dim=8)
    differing = torch.randn(1, 2, 3 + rank, 2, 4, dtype=torch.float64)  # S differs between ranks
    too_few = torch.randn(1, 2, 1, 1, 4, dtype=torch.float64)  # one sequence for several ranks
    return [
        ("refuses UNet3DConditionModel by name",
         raises(TypeError, ["UNet3DConditionModel"], lambda: shard_frames(unet_3d, group))),
        ("refuses a frame_group that is no group",
         raises(TypeError, ["frame_group"], lambda: pychop.temporal_attention(x, x, x, frame_group=2))),
        ("refuses inputs that differ between ranks",
         raises(ValueError, ["frame_group", "(B, S, H, D)"],
                lambda: pychop.temporal_attention(differing, differing, differing, frame_group=group))),
        ("refuses fewer sequences than ranks",
         raises(ValueError, ["fewer ranks"], lambda: pychop.temporal_attention(too_few, too_few, too_few,
                                                                               frame_group=group))),
        ("refuses a FrameShards of another frame count",
         raises(ValueError, ["frame_group", "frames"],
                lambda: pychop.temporal_attention(x, x, x, frame_group=FrameShards.split(group, 3 * world)))),
        ("refuses a halo wider than a rank's frames",
         raises(ValueError, ["width=3"], lambda: frame_halo(x, 1, 3, frame_group=group))),
    ]


# --------------------------------------------------------------------------------------------------------------
# A training step on a 2-D mesh (data x frames), 4 processes.
# --------------------------------------------------------------------------------------------------------------

MESH_FRAMES = 3  # over 2 frame ranks: 2 + 1, the loss through frame_mean


def mesh_unet():
    torch.manual_seed(0)
    model = VideoUNet(TINY, "parallel", backend="torch").double().freeze_spatial()
    for module in model.modules():
        if isinstance(module, ParallelSTBlock):
            module.recompute_projection = True
    return model


def mesh_batch(data_rank):
    generator = seeded(100 + data_rank)
    sample = torch.randn(1, MESH_FRAMES, TINY.in_channels, *TINY.latent_size, generator=generator,
                         dtype=torch.float64)
    text = torch.randn(1, TINY.text_length, TINY.text_dim, generator=generator, dtype=torch.float64)
    target = torch.randn(sample.shape, generator=generator, dtype=torch.float64)
    return sample, torch.tensor([100 + 300 * data_rank]), text, target


def mesh_checks():
    """(name, error) of one SGD step of a frame-sharded, lean VideoUNet with recompute_projection, DDP over every
    rank or FSDP2 over the 2-D mesh, against the single-process step on both data ranks' videos."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("data", "frames"))
    frames_group, data_rank = mesh.get_group("frames"), mesh.get_local_rank("data")
    reference = mesh_unet()
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5)
    for d in range(2):
        sample, timestep, text, target = mesh_batch(d)
        (F.mse_loss(reference(sample, timestep, text), target) / 2).backward()
    optimizer.step()
    expected = {name: p.detach() for name, p in reference.named_parameters()}
    initial, found = mesh_unet(), []
    for wrapper in ("ddp", "fsdp2"):
        model = mesh_unet()
        lean_frozen(model, recompute=True)
        shard_frames(model, frames_group)
        trained = (torch.nn.parallel.DistributedDataParallel(model) if wrapper == "ddp"
                   else fully_shard(model, mesh=mesh))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        sample, timestep, text, target = mesh_batch(data_rank)
        sample, target = (local_frames(x, frames_group, 1) for x in (sample, target))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*returned a view tensor")  # FSDP2 on the UNet's view
            squared = (trained(sample, timestep, text) - target).square()
        frame_mean(squared.sum(), squared.numel(), frames_group).backward()
        optimizer.step()
        errors = []  # of each parameter's update
        for name, p in model.named_parameters():
            value = (p.full_tensor() if isinstance(p, DTensor) else p).detach()
            before = initial.get_parameter(name)
            if not torch.equal(expected[name], before):
                errors.append(relative_error(value - before, expected[name] - before))
            elif not torch.equal(value, before):
                errors.append(1.0)  # moved, though frozen
        found.append((f"2x2 mesh step, {wrapper}, lean_frozen, recompute_projection", max(errors)))
        trainable = sum(p.requires_grad for p in initial.parameters())
        found.append((f"2x2 mesh step, {wrapper}: every trainable parameter moved",
                      0.0 if len(errors) == trainable > 0 else 1.0))
    return found


def worker(rank, world):
    group = dist.group.WORLD
    found = op_checks(world, group) + overlap_checks(group) + fused_checks(group) + mixing_checks(world, group)
    found += block_checks(world, group) + video_unet_checks(world, group) + motion_unet_checks(world, group)
    found += refusal_checks(world, group)
    if world == 4:
        found += mesh_checks()
    return found


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)], ids=["2ranks", "4ranks"])
def results(request):
    pytest.importorskip("diffusers")
    world = request.param
    ranks = run_ranks(worker, world, world=world, timeout=900)
    for rank, found in ranks:
        assert isinstance(found, list), f"rank {rank} of {world} failed:\n{found}"
    return world, ranks


def failures(results, prefix):
    world, ranks = results
    rows = [(rank, name, error) for rank, found in ranks for name, error in found if name.startswith(prefix)]
    assert rows, f"no check named {prefix!r} ran"
    return [f"rank {rank} of {world}: {name}: {error:.3g}" for rank, name, error in rows if not error <= BOUND]


@pytest.mark.parametrize("prefix", ["parallel", "stacked", "temporal", "spatial", "mixed layouts", "overlap"])
def test_op_equals_one_process(results, prefix):
    assert not failures(results, prefix)


def test_fused_backend_equals_one_process(results):
    if pychop.available_backends("cpu")["cpp"] is not None:
        pytest.skip("the cpp backend is not available")
    world, ranks = results
    bad = [f"rank {rank}: {name}: {error:.3g}" for rank, found in ranks for name, error in found
           if name.startswith("cpp") and not error <= FUSED_BOUND]
    assert not bad


@pytest.mark.parametrize("prefix", ["frame_group_norm", "frame_halo"])
def test_frame_mixing_equals_one_process(results, prefix):
    assert not failures(results, prefix)


@pytest.mark.parametrize("prefix", ["ParallelSTBlock", "VideoUNet serial", "VideoUNet parallel",
                                    "UNetMotionModel serial", "UNetMotionModel converted"])
def test_sharded_model_equals_one_process(results, prefix):
    assert not failures(results, prefix)


def test_refusals(results):
    assert not failures(results, "refuses")


def test_training_step_on_a_2d_mesh(results):
    if results[0] != 4:
        pytest.skip("the 2x2 mesh needs 4 processes")
    assert not failures(results, "2x2 mesh")
