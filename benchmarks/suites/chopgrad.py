"""Suite `chopgrad`: memory and time of a decoder training step against video length, ChopGrad vs full
backpropagation, and how close ChopGrad's gradients are to the full ones.

The step: decode latents with ``pychop.models.CausalVideoDecoder`` segment by segment (one latent frame ->
4 video frames, 1 for the first), an MSE loss per segment, backward. "full" backpropagates the summed loss
through the whole recurrence; "recompute k" / "retain k" are ``pychop.chopgrad.stream`` with window k.
Memory: on a GPU the allocator's peak above the model (bf16, Wan 2.1 decoder widths, 32x32 latents ->
256x256 video); on a CPU the peak bytes of activations saved for backward (tiny decoder, 6x6 latents,
one thread). Time: at each length, the steps of all methods timed in one interleaved comparison
(``ctx.compare``); the time ratio to full backpropagation is the median of per-round ratios, with its spread.
Frames = 1 + 4 (segments - 1).

Further rows:
- ``wan step``: the same against frames for diffusers' ``AutoencoderKLWan`` decoder (``decoder_recurrence``):
  on a GPU at its real widths (diffusers' default config, bf16, 32x32 latents), full backpropagation vs
  ``recompute`` at windows 1, 2, 4, with the allocator's peak and the step time; on a CPU a tiny Wan runs the
  same code (saved bytes). ``same memory`` rows: how many more frames ChopGrad decodes in the memory that
  full backpropagation needs for fewer (its peaks fitted linearly in frames).
- ``vae flatness``: each supported diffusers VAE (tiny random configs, CPU, saved bytes): peak at 4x the
  latent frames over the peak at 1x, full backpropagation vs ``recompute 1``.
- ``fidelity``: per window k, the cosine and relative error to full backpropagation of the parameter
  gradient and of the latent gradient (whole and per segment, with its norm over the full one), float64, on
  the tiny decoder randomly initialised and after the suite trains it on synthetic videos of moving discs
  (``training`` row: its loss before and after).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from einops import rearrange

from benchmarks.plots import no_data
from benchmarks.tables import Table, markdown
from pychop.chopgrad import fidelity, stream
from pychop.chopgrad.memory import SavedActivationMeter
from pychop.models import CausalDecoderConfig, CausalVideoDecoder

DESCRIPTION = "ChopGrad truncated backprop through a causal video decoder: memory and time vs frames"

WINDOWS = (1, 2, 4)
GPU = dict(config=CausalDecoderConfig.wan(), latent=32, segments=(3, 5, 9, 17, 33), dtype=torch.bfloat16)
CPU = dict(config=CausalDecoderConfig.tiny(), latent=6, segments=(3, 5, 9), dtype=torch.float32)
SMOKE = dict(config=CausalDecoderConfig.tiny(), latent=2, segments=(3, 5), dtype=torch.float32)


def frames_of(segments):
    return 1 + 4 * (segments - 1)


class Problem:
    """Random latents of ``segments`` latent frames, random target frames, an MSE loss per segment.

    ``decoder`` is a recurrence with ``init_state()`` and ``step()``: pychop's ``CausalVideoDecoder``, or a
    diffusers decoder recurrence (which also splits the latents, ``segments(z)``) with ``module`` its VAE."""

    def __init__(self, decoder, segments, latent, device, dtype, seed=0, module=None):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.decoder, self.module = decoder, module if module is not None else decoder
        channels = getattr(decoder, "latent_channels", None) or decoder.config.latent_channels
        z = torch.randn(1, channels, segments, latent, latent, generator=generator).to(device, dtype)
        self.segments = decoder.segments(z) if hasattr(decoder, "segments") else list(z.split(1, dim=2))
        with torch.no_grad():
            state, self.targets = decoder.init_state(), []
            for x in self.segments:
                state, y = decoder.step(state, x)
                self.targets.append(torch.randn(y.shape, generator=generator).to(device, dtype))
        self.frames = sum(t.shape[2] for t in self.targets)

    def loss(self, y, i):
        return ((y.float() - self.targets[i].float()) ** 2).mean()

    def full(self):
        state, total = self.decoder.init_state(), 0
        for i, x in enumerate(self.segments):
            state, y = self.decoder.step(state, x)
            total = total + self.loss(y, i)
        total.backward()

    def chopgrad(self, window, strategy):
        stream(self.decoder.step, self.decoder.init_state(), self.segments, self.loss, window=window,
               strategy=strategy)

    def method(self, name):
        if name == "full":
            return self.full
        strategy, window = name.split()
        return lambda: self.chopgrad(int(window), strategy)

    def zero_grad(self):
        for p in self.module.parameters():
            p.grad = None


METHODS = ("full",) + tuple(f"{strategy} {k}" for strategy in ("recompute", "retain") for k in WINDOWS)


def measure_memory_mb(ctx, fn):
    if ctx.on_gpu:
        return ctx.peak_memory_mb(fn)
    return SavedActivationMeter().measure(fn) / 2 ** 20


def run(ctx):
    threads = torch.get_num_threads()
    if not ctx.on_gpu:
        torch.set_num_threads(1)  # on a shared CPU, intra-op threads make timings swing by 10x
    try:
        rows = measure_all(ctx, SMOKE if ctx.smoke else GPU if ctx.on_gpu else CPU)
        rows += wan_rows(ctx)
        torch.set_num_threads(1)
        if not (ctx.on_gpu and ctx.quick):  # float64 CPU figures, the same on any machine
            rows += vae_flatness_rows(only=("AutoencoderKLWan",) if ctx.smoke else None)
            rows += fidelity_rows(ctx, SMOKE_FIDELITY if ctx.smoke else FIDELITY)
        return rows
    finally:
        torch.set_num_threads(threads)


def step_rows(ctx, decoder, setup, methods, kind, module=None):
    """Peak memory of each method at each length (``setup["segments"]``), and their step times from one
    interleaved comparison per length: (rows, {segments: Ratio of recompute 1's step time to full's})."""
    rows, time_ratios = [], {}
    for segments in ctx.progress(setup["segments"], f"{kind} lengths"):
        problem = Problem(decoder, segments, setup["latent"], ctx.device, setup["dtype"], module=module)
        steps, length_rows = {}, []
        for name in methods:
            fn = problem.method(name)
            row = {"kind": kind, "method": name, "segments": segments, "frames": problem.frames,
                   "memory": "allocator peak" if ctx.on_gpu else "saved for backward"}
            try:
                row["peak_mb"] = measure_memory_mb(ctx, fn)
                steps[name] = fn
            except torch.cuda.OutOfMemoryError:
                row.update(peak_mb=None, step_ms=None, note="out of memory")
                torch.cuda.empty_cache()
            problem.zero_grad()
            length_rows.append(row)
        timed = ctx.compare(steps) if steps else None
        for row in length_rows:
            if row["method"] in steps:
                row["step_ms"] = timed.ms[row["method"]]
        if "full" in steps and "recompute 1" in steps:
            time_ratios[segments] = timed.ratio("recompute 1", "full")
        problem.zero_grad()
        rows += length_rows
        del problem
    return rows, time_ratios


def measure_all(ctx, setup):
    torch.manual_seed(0)
    decoder = CausalVideoDecoder(setup["config"]).to(ctx.device, setup["dtype"])
    rows, time_ratios = step_rows(ctx, decoder, setup, METHODS, "step")
    return rows + summary_rows(ctx, rows, setup, time_ratios)


def summary_rows(ctx, rows, setup, time_ratios):
    """Targets: flat memory (largest vs 17 frames), recompute k=1 time vs full (time_ratios: segments -> the
    Ratio of their paired step times), and on a GPU the longest video full backprop fits (linear fit of its
    peaks to the device's memory) against ChopGrad's."""
    out = []
    steps = [r for r in rows if r["kind"] == "step"]
    longest = max(setup["segments"])
    lookup = {(r["method"], r["segments"]): r for r in steps}
    for name in METHODS[1:]:
        small, large = lookup[(name, 5)], lookup[(name, longest)]
        if small.get("peak_mb") and large.get("peak_mb"):
            out.append({"kind": "flatness", "method": name, "frames": frames_of(longest),
                        "peak_mb": large["peak_mb"], "ratio": large["peak_mb"] / small["peak_mb"],
                        "note": f"peak at {frames_of(longest)} frames / peak at 17 frames"})
    for segments, ratio in time_ratios.items():
        out.append({"kind": "time ratio", "method": "recompute 1", "frames": frames_of(segments),
                    "step_ms": lookup[("recompute 1", segments)]["step_ms"], **ratio.columns("ratio"),
                    "note": "step time / full backprop's"})
    if ctx.on_gpu:
        capacity_mb = torch.cuda.get_device_properties(ctx.device).total_memory / 2 ** 20
        fitted = [(r["frames"], r["peak_mb"]) for r in steps if r["method"] == "full" and r.get("peak_mb")]
        if len(fitted) >= 2:
            (f0, m0), (f1, m1) = fitted[0], fitted[-1]
            slope = (m1 - m0) / (f1 - f0)
            full_max = f0 + (capacity_mb - m0) / slope
            chop = [r for r in steps if r["method"] == "recompute 1" and r.get("peak_mb")]
            chop_max = max(r["frames"] for r in chop) if chop else None
            out.append({"kind": "max frames", "method": "full", "frames": int(full_max),
                        "note": f"linear fit of peaks to {capacity_mb:.0f} MB"})
            if chop_max:
                out.append({"kind": "max frames", "method": "recompute 1", "frames": chop_max,
                            "ratio": chop_max / full_max,
                            "note": "at least: the longest video measured (memory flat in frames)"})
    return out


WAN_METHODS = ("full",) + tuple(f"recompute {k}" for k in WINDOWS)
# diffusers' AutoencoderKLWan: its default config is the Wan 2.1 VAE's real widths; a tiny one on the CPU.
WAN_GPU = dict(vae={}, latent=32, segments=(3, 5, 9, 17), dtype=torch.bfloat16)
WAN_CPU = dict(vae=dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                        latents_mean=[0.0] * 4, latents_std=[1.0] * 4), latent=4, segments=(3, 5, 9),
               dtype=torch.float32)


def wan_rows(ctx):
    """Memory and step time against frames for diffusers' Wan VAE decoder, full backpropagation against
    ``recompute`` at windows 1, 2, 4, and the frames each fits in the same memory."""
    try:
        from diffusers import AutoencoderKLWan

        from pychop.integrations.diffusers import decoder_recurrence
    except ImportError as error:
        return [{"kind": "wan step", "note": f"skipped: {error}"}]
    setup = dict(WAN_CPU, segments=(3, 5)) if ctx.smoke else WAN_GPU if ctx.on_gpu else WAN_CPU
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**setup["vae"]).to(ctx.device, setup["dtype"])
    rows, _ = step_rows(ctx, decoder_recurrence(vae), setup, WAN_METHODS, "wan step", module=vae)
    return rows + same_memory_rows(rows)


def same_memory_rows(rows):
    """For each ChopGrad method: the frames it decoded at its longest length over the frames full
    backpropagation fits in that same peak memory (a linear fit of full backpropagation's peaks in frames)."""
    full = [(r["frames"], r["peak_mb"]) for r in rows if r["method"] == "full" and r.get("peak_mb")]
    if len(full) < 2:
        return []
    (f0, m0), (f1, m1) = full[0], full[-1]
    slope = (m1 - m0) / (f1 - f0)
    out = []
    for name in dict.fromkeys(r["method"] for r in rows if r["method"] != "full"):
        mine = [r for r in rows if r["method"] == name and r.get("peak_mb")]
        if not mine or slope <= 0:
            continue
        longest = max(mine, key=lambda r: r["frames"])
        full_frames = f0 + (longest["peak_mb"] - m0) / slope
        out.append({"kind": "same memory", "method": name, "frames": longest["frames"],
                    "peak_mb": longest["peak_mb"], "ratio": longest["frames"] / full_frames,
                    "note": f"frames decoded / frames full backprop fits in the same memory ({full_frames:.1f})"})
    return out


def tiny_vaes():
    """Tiny random configs of the diffusers VAEs decoder_recurrence supports, and the latent frames at 1x."""
    import diffusers
    wan = WAN_CPU["vae"]
    return {
        "AutoencoderKLWan": (lambda: diffusers.AutoencoderKLWan(**wan), 2),
        "AutoencoderKLQwenImage": (lambda: diffusers.AutoencoderKLQwenImage(**wan), 2),
        "AutoencoderKLCogVideoX": (lambda: diffusers.AutoencoderKLCogVideoX(
            block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4), 4),
        "AutoencoderKLMochi": (lambda: diffusers.AutoencoderKLMochi(
            encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4, latent_channels=4,
            layers_per_block=(1,) * 5, add_attention_block=(False,) * 5), 2),
        "AutoencoderKLLTXVideo (causal)": (lambda: diffusers.AutoencoderKLLTXVideo(
            block_out_channels=(8,) * 4, latent_channels=4, layers_per_block=(1,) * 5, patch_size=2,
            decoder_causal=True, decoder_block_out_channels=(8, 16, 32), decoder_spatio_temporal_scaling=(True,) * 3,
            decoder_layers_per_block=(1,) * 4, decoder_inject_noise=(False,) * 4), 2),
    }


def vae_flatness_rows(only=None):
    """Peak saved bytes at 4x the latent frames over the peak at 1x, for each supported diffusers VAE (CPU), or
    those named in `only`."""
    try:
        from pychop.integrations.diffusers import decoder_recurrence
        vaes = tiny_vaes()
    except ImportError as error:
        return [{"kind": "vae flatness", "note": f"skipped: {error}"}]
    rows = []
    for name, (make, base) in vaes.items():
        if only is not None and name not in only:
            continue
        torch.manual_seed(0)
        vae = make()
        rec = decoder_recurrence(vae)
        peaks = {}
        for segments in (base, 4 * base):
            problem = Problem(rec, segments, 4, torch.device("cpu"), torch.float32, module=vae)
            for method in ("full", "recompute 1"):
                peaks[method, segments] = SavedActivationMeter().measure(problem.method(method)) / 2 ** 20
                problem.zero_grad()
        for method in ("full", "recompute 1"):
            rows.append({"kind": "vae flatness", "decoder": name, "method": method, "segments": 4 * base,
                         "peak_mb": peaks[method, 4 * base], "ratio": peaks[method, 4 * base] / peaks[method, base],
                         "note": f"peak at {4 * base} latent frames / peak at {base}"})
    return rows


# Gradient fidelity: CPU, float64, the tiny decoder; trained on moving discs at 4x4 latents (16x16 video).
FIDELITY = dict(config=CausalDecoderConfig.tiny(), segments=9, latent=6, windows=(1, 2, 3, 4),
                train_steps=300, train_segments=3, train_latent=4, batch=2, lr=3e-3, latent_noise=0.1)
SMOKE_FIDELITY = dict(FIDELITY, segments=3, latent=2, windows=(1, 2), train_steps=2, train_latent=2, batch=1)


def moving_discs(batch, frames, size, generator, discs=3):
    """Synthetic videos (B, 3, frames, size, size) in [-1, 1]: soft discs of random colour and radius moving
    at constant speed and bouncing off the borders, over a dark background."""
    def rand(*shape):
        return torch.rand(*shape, generator=generator)
    t = torch.arange(frames, dtype=torch.float32).view(1, 1, frames, 1)
    centre = rand(batch, discs, 1, 2) + (rand(batch, discs, 1, 2) - 0.5) * 0.12 * t
    centre = 1 - ((centre % 2) - 1).abs()  # (B, K, frames, 2), reflected into [0, 1]
    radius = 0.1 + 0.15 * rand(batch, discs, 1, 1, 1)
    colour = rand(batch, discs, 3, 1, 1, 1) * 2 - 1
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    dy = grid.view(1, 1, 1, size, 1) - centre[..., 0, None, None]
    dx = grid.view(1, 1, 1, 1, size) - centre[..., 1, None, None]
    masks = torch.sigmoid((radius - (dx ** 2 + dy ** 2).sqrt()) * size)  # (B, K, frames, H, W)
    video = torch.full((batch, 3, frames, size, size), -0.8)
    for k in range(discs):
        video = video * (1 - masks[:, k, None]) + colour[:, k] * masks[:, k, None]
    return video


def encode(video, projection, factor):
    """A fixed linear encoder: each latent frame holds its 4 video frames (frame 0 four times for the first),
    average-pooled by ``factor`` in space, projected from 4 x 3 values to the latent channels."""
    grouped = torch.cat([video[:, :, :1].expand(-1, -1, 4, -1, -1), video[:, :, 1:]], dim=2)
    pooled = rearrange(F.avg_pool3d(grouped, (1, factor, factor)), "b c (n f) h w -> b (f c) n h w", f=4)
    return torch.einsum("oc,bcnhw->bonhw", projection.to(video.dtype), pooled)


def video_loss(video, segments):
    """Per-segment MSE against ``video`` (1 frame for segment 0, 4 for the others)."""
    counts = [1] + [4] * (segments - 1)
    targets = video.split(counts, dim=2)
    return lambda y, i: F.mse_loss(y, targets[i])


def train_decoder(decoder, setup, projection, generator):
    """A few hundred Adam steps of full backpropagation on fresh moving-disc videos; the first and last loss."""
    optimizer = torch.optim.Adam(decoder.parameters(), lr=setup["lr"])
    factor = 2 ** (len(decoder.config.channels) - 1)
    size, n = setup["train_latent"] * factor, setup["train_segments"]
    losses = []
    for _ in range(setup["train_steps"]):
        video = moving_discs(setup["batch"], frames_of(n), size, generator)
        loss_fn = video_loss(video, n)
        state, total = decoder.init_state(), 0
        for i, z_t in enumerate(encode(video, projection, factor).split(1, dim=2)):
            state, y = decoder.step(state, z_t)
            total = total + loss_fn(y, i) / n
        total.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total.item())
    return losses[0], losses[-1]


def fidelity_rows(ctx, setup=FIDELITY):
    """Per window k: cosine and relative error to full backpropagation of the parameter gradient and of the
    latent gradient (whole and per segment), float64, on the tiny decoder randomly initialised and trained."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    decoder = CausalVideoDecoder(setup["config"])
    channels, factor = setup["config"].latent_channels, 2 ** (len(setup["config"].channels) - 1)
    projection = torch.linalg.qr(torch.randn(12, 12, generator=generator))[0][:channels]
    n = setup["segments"]
    video = moving_discs(1, frames_of(n), setup["latent"] * factor, generator).double()
    z = encode(video, projection, factor)
    z = z + setup["latent_noise"] * torch.randn(z.shape, generator=generator, dtype=z.dtype)
    loss_fn = video_loss(video, n)
    rows = []
    decoders = [("random", copy.deepcopy(decoder))]
    first, last = train_decoder(decoder, setup, projection, generator)
    rows.append({"kind": "training", "decoder": "trained", "note": f"{setup['train_steps']} Adam steps on moving "
                 f"discs: loss {first:.4f} -> {last:.4f}"})
    decoders.append(("trained", decoder))
    for label, model in ctx.progress(decoders, "chopgrad fidelity"):
        model = model.double()
        for found in fidelity(model.step, model.init_state(), list(z.split(1, dim=2)), loss_fn, setup["windows"],
                              params=model.parameters()):
            window = found["window"]
            base = {"kind": "fidelity", "decoder": label, "method": f"recompute {window}", "window": window,
                    "segments": n, "frames": frames_of(n)}
            grads = ("params", "latent") if found["segment"] is None else ("latent",)
            for grad in grads:
                name = grad if found["segment"] is None else f"{grad} {found['segment']}"
                rows.append({**base, "grad": name, **{key: found[f"{grad}_{key}"]
                                                      for key in ("cosine", "rel_error", "norm_ratio")}})
    return rows


def pivot(rows, key, fmt=None):
    """Rows of one kind as a method x frames table of ``key`` (a cell per length), with the growth from the
    second length to the last: memory flat in frames shows as 1.00."""
    lengths = sorted({r["frames"] for r in rows})
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        values = {r["frames"]: r.get(key) for r in rows if r["method"] == method}
        row = {"method": method, **{f"{frames} frames": values.get(frames) for frames in lengths}}
        if len(lengths) >= 3 and values.get(lengths[1]) and values.get(lengths[-1]):
            row[f"{lengths[-1]} / {lengths[1]} frames"] = values[lengths[-1]] / values[lengths[1]]
        out.append(row)
    return out


def time_table(rows, ratios):
    """Step times, one row per length (each length one interleaved comparison), with recompute 1's time over
    full backpropagation's at that length where the suite measured it (``ratios``: frames -> time ratio row)."""
    out = []
    for frames in sorted({r["frames"] for r in rows}):
        row = {"frames": frames, **{f"{r['method']} ms": r.get("step_ms") for r in rows if r["frames"] == frames}}
        ratio = ratios.get(frames, {})
        out.append({**row, **{key.replace("ratio", "recompute 1 / full"): value for key, value in ratio.items()
                              if key.startswith("ratio")}})
    return out


def fidelity_tables(rows):
    """Gradient agreement with full backpropagation per window (parameter and latent gradients, random and
    trained decoder side by side), then per segment the latent gradient's cosine and norm over the full one."""
    found = [r for r in rows if r["kind"] == "fidelity"]
    if not found:
        return []
    decoders = list(dict.fromkeys(r["decoder"] for r in found))
    lookup = {(r["decoder"], r["window"], r["grad"]): r for r in found}
    windows = sorted({r["window"] for r in found})
    summary = []
    for k in windows:
        row = {"window k": k}
        for grad in ("params", "latent"):
            for key, label in (("cosine", "cosine"), ("rel_error", "rel. error")):
                row[f"{grad}: {label}"] = " / ".join(f"{lookup[d, k, grad][key]:.2f}" for d in decoders)
        summary.append(row)
    segments, frames = found[0]["segments"], found[0]["frames"]
    training = next((r["note"] for r in rows if r["kind"] == "training"), "")
    tables = [Table(f"ChopGrad's gradient against full backpropagation, {' / '.join(decoders)} decoder "
                    f"({segments} segments = {frames} frames)", summary,
                    f"float64, the tiny decoder randomly initialised and trained ({training}); a pixel loss against "
                    f"a video of moving discs from noisy latents of it; window k in segments. params: the "
                    f"decoder's parameter gradient; latent: the latents' gradient, what a diffusion model trained "
                    f"through the decoder receives.")]
    for decoder in decoders:
        per_segment = [{"segment": i, **{f"k={k}": f"{lookup[decoder, k, f'latent {i}']['cosine']:.2f} / "
                                                    f"{lookup[decoder, k, f'latent {i}']['norm_ratio']:.2f}"
                                         for k in windows}} for i in range(segments)]
        tables.append(Table(f"Latent gradient per segment, {decoder} decoder: cosine / norm over the full one",
                            per_segment, "Latent z_i receives only the losses of segments i .. i+k-1; the last k "
                                         "segments' gradients are exact."))
    return tables


def tables(rows):
    """The suite's rows as tables, one per comparison: memory and step time against frames (pychop's decoder,
    then diffusers' Wan decoder), the frames each window fits in full backpropagation's memory, the diffusers
    VAEs' flatness, the gradient fidelity; then any rows that carry only a note (a part skipped)."""
    out = []
    for kind, name in (("step", "pychop's CausalVideoDecoder"), ("wan step", "diffusers' AutoencoderKLWan")):
        mine = [r for r in rows if r["kind"] == kind and "method" in r]
        if not mine:
            continue
        memory = mine[0].get("memory", "peak memory")
        out.append(Table(f"{name}: {memory} (MiB) against frames", pivot(mine, "peak_mb"),
                         "One training step: decode segment by segment, a loss per segment, backward."))
        ratios = {r["frames"]: r for r in rows if r["kind"] == "time ratio"} if kind == "step" else {}
        out.append(Table(f"{name}: step time (ms) against frames", time_table(mine, ratios),
                         "At each length every method's step is timed in one interleaved comparison."))
    same = [{"method": r["method"], "frames decoded": r["frames"], "MiB": r["peak_mb"],
             "frames full backprop fits in it": r["frames"] / r["ratio"], "ratio": r["ratio"]}
            for r in rows if r["kind"] == "same memory"]
    if same:
        out.append(Table("diffusers' AutoencoderKLWan: frames decoded in the memory full backpropagation needs "
                         "for fewer", same, "Full backpropagation's peaks fitted linearly in frames."))
    longest = [{k: r.get(k) for k in ("method", "frames", "ratio", "note")} for r in rows if r["kind"] == "max frames"]
    if longest:
        out.append(Table("Longest video in the GPU's memory", longest))
    flat = [r for r in rows if r["kind"] == "vae flatness" and "method" in r]
    if flat:
        table = []
        for decoder in dict.fromkeys(r["decoder"] for r in flat):
            mine = {r["method"]: r for r in flat if r["decoder"] == decoder}
            table.append({"VAE": decoder, "latent frames": f"{mine['full']['segments'] // 4} -> "
                                                           f"{mine['full']['segments']}",
                          **{f"{method}: peak at 4x / at 1x": mine[method]["ratio"] for method in mine}})
        out.append(Table("diffusers' video VAEs (tiny random configs): saved for backward at 4x the latent frames "
                         "over 1x", table))
    out += fidelity_tables(rows)
    skipped = [{"part": r["kind"], "note": r["note"]} for r in rows if "method" not in r and r["kind"] != "training"]
    if skipped:
        out.append(Table("Skipped", skipped))
    return out


def report(result):
    """Markdown for docs/benchmarks.md: the suite's tables."""
    return "\n\n".join(markdown(table) for table in tables(result["rows"]))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in rows if r["kind"] == "step"]
    memory = steps[0].get("memory", "peak memory") if steps else "peak memory"
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in METHODS:
        mine = [r for r in steps if r["method"] == name and r.get("peak_mb") is not None]
        style = "-o" if name == "full" else ("--s" if name.startswith("retain") else "-^")
        axes[0].plot([r["frames"] for r in mine], [r["peak_mb"] for r in mine], style, label=name)
        axes[1].plot([r["frames"] for r in mine], [r["step_ms"] for r in mine], style, label=name)
    axes[0].set(xlabel="frames", ylabel=f"{memory} (MiB)", title=f"{memory} vs frames")
    axes[1].set(xlabel="frames", ylabel="step time (ms)", title="train step time vs frames")
    frames = sorted({r["frames"] for r in steps})
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(frames, [str(f) for f in frames])  # every measured length labelled, none other
        ax.minorticks_off()
    fidelity = [r for r in rows if r["kind"] == "fidelity"]
    for label in dict.fromkeys(r["decoder"] for r in fidelity):
        for grad, style in (("params", "-o"), ("latent", "--s")):
            mine = [r for r in fidelity if r["decoder"] == label and r["grad"] == grad]
            axes[2].plot([r["window"] for r in mine], [r["cosine"] for r in mine], style, label=f"{grad}, {label}")
    if fidelity:
        windows = sorted({r["window"] for r in fidelity})
        axes[2].set_xticks(windows, [str(k) for k in windows])
        axes[2].set_title(f"gradient fidelity (tiny decoder, {fidelity[0]['frames']} frames)")
        axes[2].legend(fontsize=8)
    else:
        axes[2].set_title("gradient fidelity")
        no_data(axes[2], "not measured in this run")
    axes[2].set(xlabel="window k (segments)", ylabel="cosine similarity to full gradient")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
