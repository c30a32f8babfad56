"""Suite `chopgrad`: memory and time of a decoder training step against video length, ChopGrad vs full
backpropagation, and how close ChopGrad's gradient is to the full one.

The step: decode latents with ``pychop.models.CausalVideoDecoder`` segment by segment (one latent frame ->
4 video frames, 1 for the first), an MSE loss per segment, backward. "full" backpropagates the summed loss
through the whole recurrence; "recompute k" / "retain k" are ``pychop.chopgrad.stream`` with window k.
Memory: on a GPU the allocator's peak above the model (bf16, Wan 2.1 decoder widths, 32x32 latents ->
256x256 video); on a CPU the peak bytes of activations saved for backward (tiny decoder, 6x6 latents,
one thread). Time: at each length, the steps of all methods timed in one interleaved comparison
(``ctx.compare``); the time ratio to full backpropagation is the median of per-round ratios, with its spread.
Frames = 1 + 4 (segments - 1).
"""

from __future__ import annotations

import torch

from pychop.chopgrad import stream
from pychop.chopgrad.memory import SavedActivationMeter
from pychop.models import CausalDecoderConfig, CausalVideoDecoder

DESCRIPTION = "ChopGrad truncated backprop through a causal video decoder: memory and time vs frames"

WINDOWS = (1, 2, 4)
GPU = dict(config=CausalDecoderConfig.wan(), latent=32, segments=(3, 5, 9, 17, 33), cosine_segments=9,
           dtype=torch.bfloat16)
CPU = dict(config=CausalDecoderConfig.tiny(), latent=6, segments=(3, 5, 9), cosine_segments=9,
           dtype=torch.float32)


def frames_of(segments):
    return 1 + 4 * (segments - 1)


class Problem:
    def __init__(self, decoder, segments, latent, device, dtype, seed=0):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        channels = decoder.config.latent_channels
        self.decoder = decoder
        self.segments = [torch.randn(1, channels, 1, latent, latent, generator=generator).to(device, dtype)
                         for _ in range(segments)]
        size = latent * 2 ** (len(decoder.config.channels) - 1)
        self.targets = [torch.randn(1, decoder.config.out_channels, 1 if i == 0 else 4, size, size,
                                    generator=generator).to(device, dtype) for i in range(segments)]

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
        for p in self.decoder.parameters():
            p.grad = None


METHODS = ("full",) + tuple(f"{strategy} {k}" for strategy in ("recompute", "retain") for k in WINDOWS)


def measure_memory_mb(ctx, fn):
    if ctx.on_gpu:
        return ctx.peak_memory_mb(fn)
    return SavedActivationMeter().measure(fn) / 2 ** 20


def flat_grad(decoder):
    return torch.cat([p.grad.flatten().double() for p in decoder.parameters()])


def run(ctx):
    if ctx.on_gpu:
        return measure_all(ctx, GPU)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CPU, intra-op threads make timings swing by 10x
    try:
        return measure_all(ctx, CPU)
    finally:
        torch.set_num_threads(threads)


def measure_all(ctx, setup):
    torch.manual_seed(0)
    decoder = CausalVideoDecoder(setup["config"]).to(ctx.device, setup["dtype"])
    rows, time_ratios = [], {}
    for segments in ctx.progress(setup["segments"], "chopgrad lengths"):
        problem = Problem(decoder, segments, setup["latent"], ctx.device, setup["dtype"])
        steps, length_rows = {}, []
        for name in METHODS:
            fn = problem.method(name)
            row = {"kind": "step", "method": name, "segments": segments, "frames": frames_of(segments)}
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
    rows += summary_rows(ctx, rows, setup, time_ratios)
    rows += cosine_rows(ctx, decoder, setup)
    return rows


def summary_rows(ctx, rows, setup, time_ratios):
    """Targets: flat memory (largest vs 17 frames), recompute k=1 time vs full (time_ratios: segments -> the
    Ratio of their paired step times), and on a GPU the longest
    video full backprop fits (linear fit of its peaks to the device's memory) against ChopGrad's."""
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


def cosine_rows(ctx, decoder, setup):
    segments = setup["cosine_segments"]
    problem = Problem(decoder, segments, setup["latent"], ctx.device, setup["dtype"], seed=1)
    problem.full()
    full = flat_grad(decoder)
    problem.zero_grad()
    rows = []
    for window in sorted(set(WINDOWS + (3, segments))):
        problem.chopgrad(window, "recompute")
        grad = flat_grad(decoder)
        problem.zero_grad()
        rows.append({"kind": "cosine", "method": f"recompute {window}", "segments": segments,
                     "frames": frames_of(segments), "window": window,
                     "cosine": (grad @ full / (grad.norm() * full.norm())).item()})
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in rows if r["kind"] == "step"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in METHODS:
        mine = [r for r in steps if r["method"] == name and r.get("peak_mb") is not None]
        style = "-o" if name == "full" else ("--s" if name.startswith("retain") else "-^")
        axes[0].plot([r["frames"] for r in mine], [r["peak_mb"] for r in mine], style, label=name)
        axes[1].plot([r["frames"] for r in mine], [r["step_ms"] for r in mine], style, label=name)
    axes[0].set(xlabel="frames", ylabel="peak memory (MB)", title="memory vs frames")
    axes[1].set(xlabel="frames", ylabel="step time (ms)", title="train step time vs frames")
    cos = [r for r in rows if r["kind"] == "cosine"]
    axes[2].plot([r["window"] for r in cos], [r["cosine"] for r in cos], "-o")
    axes[2].set(xlabel="window k (segments)", ylabel="cosine similarity to full gradient",
                title=f"gradient fidelity ({cos[0]['frames'] if cos else '?'} frames)")
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
