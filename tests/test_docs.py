"""The docs that make promises run: every python block of docs/chopgrad-training.md runs to the end (each checks
its own result), and every row of docs/misuse.md is a case here whose outcome is what the row says."""

import io
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import pychop
from pychop.chopgrad import scan, stream
from pychop.memory import lean_frozen
from pychop.models import CausalDecoderConfig, CausalVideoDecoder

ROOT = pathlib.Path(__file__).resolve().parent.parent
RECIPES = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "chopgrad-training.md").read_text(), flags=re.S)


# The first recipe in the quick tier; the others (DDP's processes among them) take tens of seconds: slow.
@pytest.mark.parametrize("code", [code if i == 0 else pytest.param(code, marks=pytest.mark.slow)
                                  for i, code in enumerate(RECIPES)], ids=[f"block{i}" for i in range(len(RECIPES))])
def test_chopgrad_training_recipes_run(code, tmp_path):
    for module in re.findall(r"^(?:from|import) (\w+)", code, flags=re.M):
        pytest.importorskip(module)
    script = tmp_path / "recipe.py"  # a file, not -c: multiprocessing's spawn imports the script's functions
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


# ---- docs/misuse.md: each case does one misuse; an error is its outcome, or it checks the behaviour the row
# ---- states and returns None.

def decoder_problem():
    torch.manual_seed(0)
    decoder = CausalVideoDecoder(CausalDecoderConfig.tiny())
    z = torch.randn(1, 4, 3, 4, 4)
    return decoder, list(z.split(1, dim=2)), lambda y, i: y.square().mean()


def stream_loss_without_grad():
    decoder, segments, loss_fn = decoder_problem()
    stream(decoder.step, decoder.init_state(), segments, lambda y, i: loss_fn(y, i).detach())


def stream_under_no_grad():
    decoder, segments, loss_fn = decoder_problem()
    with torch.no_grad():
        stream(decoder.step, decoder.init_state(), segments, loss_fn)


def stream_backward_not_callable():
    decoder, segments, loss_fn = decoder_problem()
    stream(decoder.step, decoder.init_state(), segments, loss_fn, backward="accelerator.backward")


def stream_one_tensor_as_segments():
    decoder, segments, loss_fn = decoder_problem()
    stream(decoder.step, decoder.init_state(), torch.cat(segments, dim=2), loss_fn)


def stream_window_zero():
    decoder, segments, loss_fn = decoder_problem()
    stream(decoder.step, decoder.init_state(), segments, loss_fn, window=0)


def step_writes_state_in_place():
    def step(state, x):
        state[0].add_(x)
        return state, state[0] * 1.0
    stream(step, [torch.zeros(2)], [torch.ones(2, requires_grad=True)], lambda y, i: y.sum())


def scan_under_create_graph():
    decoder, segments, loss_fn = decoder_problem()
    outputs = scan(decoder.step, decoder.init_state(), segments)
    torch.autograd.grad(sum(loss_fn(y, i) for i, y in enumerate(outputs)), list(decoder.parameters()),
                        create_graph=True)


def state_of_another_batch():
    decoder, segments, _ = decoder_problem()
    with torch.no_grad():
        state, _ = decoder.step(decoder.init_state(), torch.cat([segments[0]] * 2))
        decoder.step(state, segments[1])


def state_of_another_model():
    decoder, segments, _ = decoder_problem()
    wider = CausalVideoDecoder(CausalDecoderConfig(latent_channels=4, out_channels=3, channels=(32, 8, 8),
                                                   num_res_blocks=1, temporal_upsample=(True, True)))
    with torch.no_grad():
        state, _ = decoder.step(decoder.init_state(), segments[0])
        wider.step(state, segments[1])


def tiny_wan():
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                            temperal_downsample=[True, True])


def diffusers_state_of_another_batch():
    from pychop.integrations.diffusers import decoder_recurrence
    rec = decoder_recurrence(tiny_wan())
    z = torch.randn(1, 4, 2, 4, 4)
    with torch.no_grad():
        state, _ = rec.step(rec.init_state(), torch.cat([z[:, :, :1]] * 2))
        rec.step(state, z[:, :, 1:])


def decoder_recurrence_of_a_tiled_vae():
    from pychop.integrations.diffusers import decoder_recurrence
    vae = tiny_wan()
    vae.enable_tiling()
    decoder_recurrence(vae).segments(torch.zeros(1, 4, 2, 4, 4))


def decoder_recurrence_of_an_unsupported_model():
    from pychop.integrations.diffusers import decoder_recurrence
    decoder_recurrence(torch.nn.Linear(2, 2))


def video_unet():
    from pychop.models import TINY, VideoUNet
    torch.manual_seed(0)
    return VideoUNet(TINY, "parallel", backend="torch").freeze_spatial()


def lean_frozen_twice():
    model = video_unet()
    lean_frozen(model)
    lean_frozen(model)


def save_a_lean_model():
    model = video_unet()
    lean_frozen(model, recompute=True)
    inputs = model.example_inputs(1)
    model(*inputs).square().mean().backward()  # leaves the caches a forward leaves
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(*inputs), model(*inputs), rtol=0, atol=0)


def motion_unet():
    from diffusers import UNetMotionModel
    torch.manual_seed(0)
    return UNetMotionModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
                           down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                           up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), cross_attention_dim=24,
                           num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=8)


def lean_recompute_then_convert():
    from pychop.integrations.diffusers import convert_to_parallel
    unet = motion_unet()
    unet.freeze_unet2d_params()  # the spatial transformers are frozen: regions lean_frozen recomputes
    lean_frozen(unet, recompute=True)
    convert_to_parallel(unet)


def convert_twice():
    from pychop.integrations.diffusers import convert_to_parallel
    unet = motion_unet()
    convert_to_parallel(unet)
    convert_to_parallel(unet)


def two_patches_removed_in_creation_order():
    from pychop.integrations.diffusers import patch_temporal_attention
    unet = motion_unet()
    before = dict(unet.attn_processors)
    first, second = patch_temporal_attention(unet), patch_temporal_attention(unet)
    first.remove()
    second.remove()
    assert all(unet.attn_processors[name] is processor for name, processor in before.items())


def lean_remove_after_set_attn_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0
    unet = motion_unet()
    handle = lean_frozen(unet)
    mine = AttnProcessor2_0()
    unet.set_attn_processor(mine)
    handle.remove()
    assert all(processor is mine for processor in unet.attn_processors.values())


def attention_inputs(**changes):
    torch.manual_seed(0)
    return [torch.randn(1, 3, 4, 2, 8, requires_grad=True, **changes) for _ in range(3)]


def fused_backend_double_backward():
    q, k, v = attention_inputs()
    out = pychop.temporal_attention(q, k, v, backend="cpp")
    grad, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    grad.square().sum().backward()


def torch_backend_double_backward():
    q, k, v = attention_inputs()
    out = pychop.temporal_attention(q, k, v, backend="torch")
    grad, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    grad.square().sum().backward()
    assert all(x.grad is not None and x.grad.isfinite().all() for x in (q, k, v))


def infinite_scale():
    pychop.temporal_attention(*attention_inputs(), scale=float("inf"))


def huge_scale():
    q, k, v = attention_inputs()
    for backend in ("torch", "cpp"):
        pychop.spatial_attention(q, k, v, scale=1e30, backend=backend).sum().backward()
        assert all(x.grad.isfinite().all() for x in (q, k, v)), backend


def scale_that_requires_grad():
    pychop.temporal_attention(*attention_inputs(), scale=torch.tensor(0.5, requires_grad=True))


def float64_on_a_fused_backend():
    pychop.temporal_attention(*attention_inputs(dtype=torch.float64), backend="cpp")


def unknown_backend():
    pychop.temporal_attention(*attention_inputs(), backend="fast")


LOCK_HOLDER = """
import fcntl, sys, time
with open(sys.argv[1], "a+") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    lock.write("4242\\n")  # a PID, for the message
    lock.flush()
    print("held", flush=True)
    time.sleep(30)
"""


def build_lock_held_by_a_live_process():
    import tempfile

    from pychop import _build
    with tempfile.TemporaryDirectory() as directory:
        lock = _build.BuildLock(pathlib.Path(directory), timeout=0.2)
        holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(lock.path)], stdout=subprocess.PIPE,
                                  text=True)
        try:
            holder.stdout.readline()
            with lock:
                pass
        finally:
            holder.kill()
            holder.wait()


CASES = {case.__name__: case for case in (
    stream_loss_without_grad, stream_under_no_grad, stream_backward_not_callable, stream_one_tensor_as_segments,
    stream_window_zero, step_writes_state_in_place, scan_under_create_graph, state_of_another_batch,
    state_of_another_model, diffusers_state_of_another_batch, decoder_recurrence_of_a_tiled_vae,
    decoder_recurrence_of_an_unsupported_model, lean_frozen_twice, save_a_lean_model, lean_recompute_then_convert,
    convert_twice, two_patches_removed_in_creation_order, lean_remove_after_set_attn_processor,
    fused_backend_double_backward, torch_backend_double_backward, infinite_scale, huge_scale,
    scale_that_requires_grad, float64_on_a_fused_backend, unknown_backend, build_lock_held_by_a_live_process)}


NEEDS_DIFFUSERS = {"diffusers_state_of_another_batch", "decoder_recurrence_of_a_tiled_vae",
                   "decoder_recurrence_of_an_unsupported_model", "lean_recompute_then_convert", "convert_twice",
                   "two_patches_removed_in_creation_order", "lean_remove_after_set_attn_processor"}
NEEDS_CPP = {"fused_backend_double_backward", "huge_scale", "float64_on_a_fused_backend"}


def misuse_rows():
    """(case, outcome) of every row of docs/misuse.md's table, backticks stripped from both."""
    rows = re.findall(r"^\| `(\w+)` \|[^|]*\| (.*) \|$", (ROOT / "docs" / "misuse.md").read_text(), flags=re.M)
    return [(case, outcome.replace("`", "")) for case, outcome in rows]


def test_every_case_has_a_row_and_every_row_a_case():
    assert sorted(case for case, _ in misuse_rows()) == sorted(CASES)


@pytest.mark.parametrize("case, outcome", misuse_rows(), ids=[case for case, _ in misuse_rows()])
def test_misuse_gets_what_the_table_says(case, outcome):
    if case in NEEDS_DIFFUSERS:
        pytest.importorskip("diffusers")
    if case in NEEDS_CPP and pychop.available_backends("cpu")["cpp"] is not None:
        pytest.skip(f"the cpp backend cannot run here: {pychop.available_backends('cpu')['cpp']}")
    try:
        CASES[case]()
    except Exception as error:  # the outcome: the error's type and the start of its message
        got = f"{type(error).__name__}: {error}"
        assert got.startswith(outcome), f"the table says\n  {outcome}\nbut the case gets\n  {got[:400]}"
        return
    assert outcome.startswith("works"), f"the table says {outcome!r} but the case raised nothing"
