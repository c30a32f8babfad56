"""Suite `chopgrad_outcome`: does training through ChopGrad's truncated gradients cost quality? A task modelled
on ChopGrad's (video super-resolution and video inpainting), trained with each method for the same steps and
seeds, judged on held-out videos.

Sizes: ``BENCH_SIZE`` for ``python -m benchmarks`` on a CPU (what ``scripts/bench.sh`` runs: minutes),
``FULL_SIZE`` for ``python -m benchmarks.suites.chopgrad_outcome [--out DIR]`` (tens of minutes on 2 cores),
``SMOKE_SIZE`` with ``--smoke``.

Set-up (float32, one thread):

- Data: ``benchmarks.synthetic_video.moving_shapes``: textured discs and squares moving over a drifting
  textured background (16 x 16 pixels, 33 frames at the full size), generated from a seed (training clips
  from the run's seed, held-out clips from a seed of their own).
- A frozen causal video decoder: ``pychop.models.CausalVideoDecoder`` (tiny config: a latent frame decodes to
  4 video frames, the first to 1; 4x in space), first trained as an autoencoder with a small encoder (full
  backpropagation on short clips), then frozen. ``autoencoder`` row: its held-out PSNR on the encoder's latents.
- A generator (three 3D convolutions) maps a degraded clip to latents: ``super-resolution``, the clip at half
  resolution; ``inpainting``, the clip with a square hole (a fixed position per clip) and the hole's mask.
- Methods, the same steps, batches and seeds (Adam): ``latent``: MSE to the encoder's latents of the clean
  clip (the usual practice, the baseline); ``pixel full``: MSE of the decoded clip to the clean clip,
  backpropagated through the whole decoder recurrence; ``chopgrad k``: the same pixel loss through
  ``pychop.chopgrad.stream`` with window k, so segment i's loss reaches the latents of segments i-k+1 .. i only
  (trained with strategy ``retain``, whose gradients are ``recompute``'s, tests/test_chopgrad.py, in less CPU
  time).

Reported: per method, the held-out PSNR (dB) and the temporal error (RMS over the clip of the error of frame
differences, (y[t+1] - y[t]) - (x[t+1] - x[t]); ``seam``: only across the decoder's segment boundaries) after
training, mean and range over seeds, and ratios to the baseline and to ``pixel full`` (of held-out MSE and of
temporal error, per seed, median with the p10-p90 spread over seeds); the curve of held-out PSNR against
steps; ``fidelity``: the latent gradient each window gives against full backpropagation on one held-out clip
(``pychop.chopgrad.fidelity``); the bytes a training step saves for backward at its peak
(``SavedActivationMeter``) and its time (``ctx.compare``, all methods and both strategies interleaved), with
ratios to ``pixel full``. The decoder is trained once, from seed 0; the seeds vary the generator's
initialisation and its training clips.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from benchmarks.outcomes import (
    FINDINGS_HEADER,
    QUALITY,
    add_costs,
    bullets,
    cost_table,
    grouped_verdicts,
    judged,
    markdown_table,
    names,
    paired,
    plot_note,
    plot_outcomes,
    quality_finding,
    range_cell,
    ratio_cell,
    ratio_text,
    run_full,
    seed_ratios,
    speed_finding,
    still_improving,
    trained_rows,
    widest_spread,
)
from benchmarks.synthetic_video import moving_shapes
from benchmarks.timing import Ratio
from pychop.chopgrad import fidelity, stream
from pychop.chopgrad.memory import SavedActivationMeter
from pychop.models import CausalDecoderConfig, CausalVideoDecoder

DESCRIPTION = "ChopGrad outcome: a generator trained through a frozen causal decoder, latent vs pixel losses"

TASKS = ("super-resolution", "inpainting")
WINDOWS = (1, 2, 4)
METHODS = ("latent", "pixel full") + tuple(f"chopgrad {k}" for k in WINDOWS)
BASELINE, FULL = "latent", "pixel full"
FACTOR = 4  # the tiny decoder's spatial upsampling
HELDOUT_SEED = 10_000


@dataclass(frozen=True)
class Size:
    size: int  # video height and width (a multiple of 8)
    segments: int  # latent frames per clip; frames = 1 + 4 (segments - 1)
    batch: int
    steps: int  # generator training steps, per task, method and seed
    eval_every: int
    seeds: int
    heldout: int  # held-out clips
    ae_steps: int  # autoencoder training steps (full backpropagation)
    ae_segments: int
    width: int  # generator channels
    lr: float = 2e-3


FULL_SIZE = Size(size=16, segments=9, batch=2, steps=150, eval_every=25, seeds=3, heldout=6, ae_steps=1000,
                 ae_segments=3, width=48)
BENCH_SIZE = Size(size=16, segments=9, batch=1, steps=10, eval_every=5, seeds=2, heldout=2, ae_steps=60,
                  ae_segments=3, width=32)
SMOKE_SIZE = Size(size=8, segments=3, batch=1, steps=2, eval_every=1, seeds=2, heldout=1, ae_steps=2,
                  ae_segments=2, width=8)
full_run = False  # FULL_SIZE: set by `python -m benchmarks.suites.chopgrad_outcome` (outcomes.run_full)


def frames_of(segments: int) -> int:
    return 1 + 4 * (segments - 1)


def group_frames(video: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, 1 + 4 (n-1), H, W) -> (B, 4 C factor^2, n, H/factor, W/factor): the frames a latent frame
    decodes to (frame 0 four times for the first), space-to-depth by ``factor``."""
    grouped = torch.cat([video[:, :, :1].expand(-1, -1, 4, -1, -1), video[:, :, 1:]], dim=2)
    return rearrange(grouped, "b c (n f) (h p) (w q) -> b (f c p q) n h w", f=4, p=factor, q=factor)


class Encoder(nn.Module):
    """Each latent frame from its 4 video frames: space-to-depth, a 1x1 and a 3x3 convolution."""

    def __init__(self, latent_channels: int, hidden: int = 64):
        super().__init__()
        self.mix = nn.Conv3d(4 * 3 * FACTOR ** 2, hidden, 1)
        self.out = nn.Conv3d(hidden, latent_channels, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.out(F.silu(self.mix(group_frames(video, FACTOR))))


class Generator(nn.Module):
    """Degraded clip (grouped per latent frame) -> latents: three 3D convolutions, kernel 3 in time."""

    def __init__(self, in_channels: int, latent_channels: int, width: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv3d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv3d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv3d(width, latent_channels, (1, 3, 3), padding=(0, 1, 1)))

    def forward(self, degraded: torch.Tensor) -> torch.Tensor:
        return self.layers(degraded)


def degrade(task: str, video: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The generator's input for ``task``, grouped per latent frame."""
    if task == "super-resolution":
        return group_frames(F.avg_pool3d(video, (1, 2, 2)), FACTOR // 2)
    size = video.shape[-1]
    hole = size // 2
    corner = torch.randint(0, size - hole + 1, (video.shape[0], 2), generator=generator)
    mask = torch.ones_like(video[:, :1])
    for b, (y, x) in enumerate(corner.tolist()):
        mask[b, :, :, y:y + hole, x:x + hole] = 0
    return group_frames(torch.cat([video * mask, mask], dim=1), FACTOR)


def input_channels(task: str) -> int:
    return 4 * 3 * (FACTOR // 2) ** 2 if task == "super-resolution" else 4 * 4 * FACTOR ** 2


def pixel_loss(video: torch.Tensor) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """Segment i's share of the clip's pixel MSE: its squared error over the clip's element count."""
    targets = video.split([1] + [4] * ((video.shape[2] - 1) // 4), dim=2)
    return lambda y, i: F.mse_loss(y, targets[i], reduction="sum") / video.numel()


def train_autoencoder(size: Size, config: CausalDecoderConfig, device: torch.device):
    """Encoder and decoder trained together (Adam, full backpropagation) on short clips; both returned frozen,
    with the first and last training loss."""
    torch.manual_seed(0)
    encoder, decoder = Encoder(config.latent_channels).to(device), CausalVideoDecoder(config).to(device)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, size.ae_steps)
    data = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(size.ae_steps):
        video = moving_shapes(4, frames_of(size.ae_segments), size.size, data).to(device)
        loss = F.mse_loss(decoder(encoder(video)), video)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return encoder.requires_grad_(False).eval(), decoder.requires_grad_(False).eval(), losses[0], losses[-1]


class Task:
    """One task's held-out clips and the training step of each method."""

    def __init__(self, name: str, size: Size, encoder: Encoder, decoder: CausalVideoDecoder):
        self.name, self.size, self.encoder, self.decoder = name, size, encoder, decoder
        self.device = next(decoder.parameters()).device
        self.heldout, self.heldout_input = self.clips(size.heldout,
                                                      torch.Generator().manual_seed(HELDOUT_SEED + TASKS.index(name)))

    def clips(self, count: int, data: torch.Generator):
        """``count`` clean clips and their degraded versions, from ``data``."""
        video = moving_shapes(count, frames_of(self.size.segments), self.size.size, data)
        return video.to(self.device), degrade(self.name, video, data).to(self.device)

    def batch(self, data: torch.Generator):
        return self.clips(self.size.batch, data)

    def generator(self, seed: int) -> Generator:
        torch.manual_seed(seed)
        model = Generator(input_channels(self.name), self.decoder.config.latent_channels, self.size.width)
        return model.to(self.device)

    def step(self, method: str, model: Generator, video: torch.Tensor, degraded: torch.Tensor,
             strategy: str = "retain") -> None:
        """Forward and backward of one training step of ``method`` (gradients into ``model``'s .grad);
        ``strategy``: stream's, for the ChopGrad methods."""
        z = model(degraded)
        if method == BASELINE:
            F.mse_loss(z, self.encoder(video)).backward()
            return
        loss_fn, segments = pixel_loss(video), list(z.split(1, dim=2))
        if method == FULL:
            state, total = self.decoder.init_state(), 0
            for i, z_i in enumerate(segments):
                state, y = self.decoder.step(state, z_i)
                total = total + loss_fn(y, i)
            total.backward()
        else:
            stream(self.decoder.step, self.decoder.init_state(), segments, loss_fn, window=int(method.split()[1]),
                   strategy=strategy)

    @torch.no_grad()
    def evaluate(self, model: Callable[[torch.Tensor], torch.Tensor], inputs=None) -> Dict[str, float]:
        """Held-out PSNR (dB, mean over clips, range 2), temporal error and its share at segment seams of
        ``model``'s latents for the held-out inputs (default: the degraded clips)."""
        decoded = self.decoder(model(self.heldout_input if inputs is None else inputs))
        mse = ((decoded - self.heldout) ** 2).flatten(1).mean(1)
        error = decoded.diff(dim=2) - self.heldout.diff(dim=2)  # (B, C, frames - 1, H, W)
        seams = error[:, :, ::4]  # frame 0 -> 1, 4 -> 5, ...: the first frame of each next segment
        return {"psnr_db": (10 * torch.log10(4 / mse)).mean().item(), "mse": mse.mean().item(),
                "tdiff": error.square().mean().sqrt().item(), "seam_tdiff": seams.square().mean().sqrt().item()}


def train(task: Task, method: str, seed: int):
    """The generator trained with ``method`` from ``seed``: its final held-out metrics and PSNR curve."""
    size = task.size
    model = task.generator(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=size.lr)
    data = torch.Generator().manual_seed(1000 * seed + TASKS.index(task.name))
    curve = [(0, task.evaluate(model)["psnr_db"])]
    for step in range(1, size.steps + 1):
        task.step(method, model, *task.batch(data))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % size.eval_every == 0 or step == size.steps:
            curve.append((step, task.evaluate(model)["psnr_db"]))
    return task.evaluate(model), curve


def outcome_rows(ctx, task: Task) -> List[dict]:
    """Every method trained from every seed on ``task``: per run, per method and per curve point."""
    common = {"task": task.name, "frames": frames_of(task.size.segments), "batch": task.size.batch,
              "steps": task.size.steps}
    return trained_rows(ctx, common, METHODS, task.size.seeds, lambda method, seed: train(task, method, seed),
                        metrics=("psnr_db", "tdiff", "seam_tdiff"), ratios=("mse", "tdiff"),
                        references={"latent": BASELINE, "full": FULL}, curve_metric="psnr_db")


def cost_rows(ctx, task: Task) -> List[dict]:
    """Peak saved bytes and step time of each method's training step (one batch, a scratch generator), the
    ChopGrad methods with each of stream's strategies (``retain`` is what the outcome runs train with)."""
    data = torch.Generator().manual_seed(HELDOUT_SEED - 1)
    video, degraded = task.batch(data)
    model = task.generator(0)
    variants = [(method, "retain") for method in METHODS]
    variants += [(method, "recompute") for method in METHODS if method.startswith("chopgrad")]
    steps, rows = {}, []
    for method, strategy in variants:
        scratch = copy.deepcopy(model)

        def step(method=method, strategy=strategy, scratch=scratch):
            task.step(method, scratch, video, degraded, strategy)
            scratch.zero_grad(set_to_none=True)
        label = f"{method} {strategy}" if method.startswith("chopgrad") else method
        saved = SavedActivationMeter(scratch, task.decoder, task.encoder).measure(step)
        rows.append({"kind": "cost", "task": task.name, "method": label, "frames": frames_of(task.size.segments),
                     "saved_mb": saved / 2 ** 20})
        steps[label] = step
    add_costs(ctx, rows, steps, FULL, "full")
    return rows


def fidelity_rows(task: Task) -> List[dict]:
    """``pychop.chopgrad.fidelity`` of the pixel loss through the frozen decoder at the encoder's latents of one
    held-out clip: how much of the latent gradient each window keeps (the whole clip's row)."""
    video = task.heldout[:1]
    with torch.no_grad():
        z = task.encoder(video)
    found = fidelity(task.decoder.step, task.decoder.init_state(), list(z.split(1, dim=2)), pixel_loss(video),
                     WINDOWS, params=[])
    return [{"kind": "fidelity", "method": f"chopgrad {r['window']}", "frames": video.shape[2],
             "latent_cosine": r["latent_cosine"], "latent_norm_ratio": r["latent_norm_ratio"]}
            for r in found if r["segment"] is None]


def run(ctx):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is as fast and far steadier on a shared CPU
    try:
        size = SMOKE_SIZE if ctx.smoke else FULL_SIZE if full_run else BENCH_SIZE
        encoder, decoder, first, last = train_autoencoder(size, CausalDecoderConfig.tiny(), ctx.device)
        tasks = [Task(name, size, encoder, decoder) for name in TASKS]
        rows = [{"kind": "autoencoder", "steps": size.ae_steps, "frames": frames_of(size.ae_segments),
                 "loss_first": first, "loss_last": last, **tasks[0].evaluate(encoder, tasks[0].heldout),
                 "note": "decoded encoder latents of the held-out clips"}]
        rows += fidelity_rows(tasks[0])
        rows += cost_rows(ctx, tasks[0])
        for task in tasks:
            rows += outcome_rows(ctx, task)
        return rows
    finally:
        torch.set_num_threads(threads)


def plot(rows, path):
    plot_outcomes(rows, path, "task", "psnr_db", "training step", "held-out PSNR (dB)")


def window_findings(rows: List[dict], task: str) -> List[str]:
    """Per window on ``task``: held-out MSE and temporal error against full backpropagation with their verdicts
    (and the seams' share where the temporal error costs quality), the PSNR difference, the gain kept over the
    latent loss; first the grouped verdicts per measure."""
    outcome = {r["method"]: r for r in rows if r["kind"] == "outcome" and r["task"] == task}
    full, group = outcome[FULL], ("task", task)
    measures = {"held-out MSE": ("mse", {}), "temporal error": ("tdiff", {})}
    details = []
    for method in METHODS[2:]:
        row, window = outcome[method], method.split()[1]
        parts = []
        for what, (metric, verdicts) in measures.items():
            text, verdicts[window] = quality_finding(row, f"{metric}_vs_full",
                                                     seed_ratios(rows, group, method, FULL, metric), what)
            parts.append(text)
        if measures["temporal error"][1][window] == QUALITY[2]:
            seams = Ratio.of(*paired(rows, group, method, FULL, "seam_tdiff"))
            parts.append(f"at the decoder's segment seams alone {ratio_text(seams.columns('seam'), 'seam')}")
        parts.append(f"mean PSNR {row['psnr_db'] - full['psnr_db']:+.2f} dB")
        gain, _ = quality_finding(row, "mse_vs_latent", seed_ratios(rows, group, method, BASELINE, "mse"),
                                  "against the latent loss, held-out MSE")
        details.append(f"window {window}: " + "; ".join(parts + [gain]) + ".")
    summary = "; ".join(f"{what}: {grouped_verdicts(verdicts, 'window', 'windows')}"
                        for what, (_, verdicts) in measures.items())
    return [f"ChopGrad against full backpropagation: {summary}."] + details


def in_short(rows: List[dict], tasks: List[str]) -> str:
    """The findings in one plain sentence: per task, the windows whose held-out MSE against full backpropagation
    costs quality (with the ratio and the mean PSNR difference), and those whose temporal error does."""
    clauses = []
    for task in tasks:
        outcome = {r["method"]: r for r in rows if r["kind"] == "outcome" and r["task"] == task}
        costly = {metric: [m for m in METHODS[2:] if judged(outcome[m], f"{metric}_vs_full") == QUALITY[2]]
                  for metric in ("mse", "tdiff")}
        windows = {metric: ("windows " if len(found) > 1 else "window ") + names([m.split()[1] for m in found])
                   for metric, found in costly.items() if found}
        if costly["mse"]:
            clause = (f"on {task}, {windows['mse']} cost held-out quality against full backpropagation ("
                      + "; ".join(f"window {m.split()[1]}: MSE {outcome[m]['mse_vs_full']:.2f}x, PSNR "
                                  f"{outcome[m]['psnr_db'] - outcome[FULL]['psnr_db']:+.2f} dB" for m in costly["mse"])
                      + ")")
        else:
            clause = f"on {task}, no window cost held-out quality that the seeds can see"
        if costly["tdiff"]:
            clause += f"{', and' if costly['mse'] else ', but'} the temporal error rose at {windows['tdiff']}"
        clauses.append(clause)
    return "**In short**: " + "; ".join(clauses) + "."


def findings(rows: List[dict]) -> List[str]:
    """What the run found, as Markdown list items computed from ``rows`` by the rules of benchmarks.outcomes:
    per task the pixel loss against the latent loss and each window against full backpropagation, what
    ``fidelity`` said beforehand, the bytes and time a window costs, and the study's limits."""
    outcome = {(r["task"], r["method"]): r for r in rows if r["kind"] == "outcome"}
    tasks = [task for task in TASKS if (task, FULL) in outcome]
    lines = bullets([in_short(rows, tasks)]) if tasks else []
    for task in tasks:
        full, base = outcome[task, FULL], outcome[task, BASELINE]
        text, _ = quality_finding(full, "mse_vs_latent", seed_ratios(rows, ("task", task), FULL, BASELINE, "mse"),
                                  "held-out MSE")
        windows, *details = window_findings(rows, task)
        lines += bullets([f"**{task}**: the pixel loss through full backpropagation against the latent loss (the "
                          f"usual practice): {text}; mean PSNR {full['psnr_db']:.2f} dB against "
                          f"{base['psnr_db']:.2f} dB. {windows}"])
        lines += ["  " + line for line in bullets(details)]
    found = [r for r in rows if r["kind"] == "fidelity"]
    if found:
        lines += bullets([f"`pychop.chopgrad.fidelity` on the frozen decoder, before training (one held-out clip of "
                          f"{found[0]['frames']} frames): the latent gradient's cosine to full backpropagation's is "
                          + ", ".join(f"{r['latent_cosine']:.2f} at window {r['method'].split()[1]}" for r in found)
                          + " (norm ratios " + ", ".join(f"{r['latent_norm_ratio']:.2f}" for r in found) + ")."])
    costs = {r["method"]: r for r in rows if r["kind"] == "cost"}
    if FULL in costs:
        full = costs[FULL]
        saved = [f"window {m.split()[1]} {costs[m]['saved_mb']:.2f} MiB ({costs[m]['saved_vs_full']:.2f}x, "
                 f"{100 * (1 - costs[m]['saved_vs_full']):.0f}% less)" for m in costs if m.endswith(" retain")]
        times = [f"With `{strategy}`: " + "; ".join(f"window {m.split()[1]} {speed_finding(costs[m], 'time_vs_full')}"
                                                    for m in costs if m.endswith(f" {strategy}")) + "."
                 for strategy in ("retain", "recompute")]
        lines += bullets([f"What a window saves, one training step at {full['frames']} frames: full backpropagation "
                          f"keeps {full['saved_mb']:.2f} MiB for backward at its peak, " + ", ".join(saved) + ". "
                          "Its price, the step time against full backpropagation's on the machine above (CPU times "
                          "say nothing about a GPU). " + " ".join(times)])
    if tasks:
        lines += bullets([limits(rows, tasks)])
    return lines


def limits(rows: List[dict], tasks: List[str]) -> str:
    """The study's limits, from its rows: seeds, steps, clip, the decoder's own quality, curves still rising,
    the widest spread."""
    first = next(r for r in rows if r["kind"] == "outcome")
    autoencoder = next((r for r in rows if r["kind"] == "autoencoder"), None)
    rising = [still_improving(rows, ("task", task), "psnr_db", higher_is_better=True) for task in tasks]
    width = widest_spread([r for r in rows if r["kind"] == "outcome"], ("mse_vs_full", "tdiff_vs_full"))
    decoder = "a tiny decoder (`CausalDecoderConfig.tiny()`)"
    if autoencoder:
        decoder += f" whose autoencoder decodes the held-out clips at {autoencoder['psnr_db']:.1f} dB"
    return (f"Limits: {first['seeds']} seeds, {first['steps']} steps of batch {first['batch']} at {first['frames']} "
            f"frames of synthetic video, {decoder}; {sum(r for r, _ in rising)} of {sum(n for _, n in rising)} "
            "PSNR curves (task and method) were still rising at the last evaluation. The ratio spreads against "
            f"full backpropagation are up to {width:.2f} wide: smaller differences are not resolved. With "
            f"{first['seeds']} seeds the p10-p90 spread is interpolated between the seeds' ratios, so a verdict "
            "followed by a count had a seed on the other side of 1. The verdicts hold for this task at this size: "
            "run `fidelity` on your own decoder, and a short training run like this one where it matters.")


def report(result: dict) -> str:
    """Markdown for docs/benchmarks.md: the outcome table per task, the decoder's quality, the fidelity of
    each window's latent gradient, the cost table, and what the run found (``findings``)."""
    rows = result["rows"]
    lines = ["The task, the methods and the measures: [docs/outcomes.md](outcomes.md#the-chopgrad-study).", ""]
    for task in TASKS:
        outcome = [r for r in rows if r["kind"] == "outcome" and r["task"] == task]
        if not outcome:
            continue
        first = outcome[0]
        lines += [f"**{task}**: {first['steps']} steps of batch {first['batch']} at {first['frames']} frames, "
                  f"{first['seeds']} seeds (mean and range over seeds; ratios per seed, median and p10-p90):", ""]
        lines += markdown_table(
            ("method", "PSNR (dB)", "temporal error", "seam temporal error", "MSE vs latent", "MSE vs pixel full",
             "temporal error vs pixel full"),
            [(r["method"], range_cell(r, "psnr_db", ".2f"), range_cell(r, "tdiff", ".4f"),
              range_cell(r, "seam_tdiff", ".4f"), ratio_cell(r, "mse_vs_latent"), ratio_cell(r, "mse_vs_full"),
              ratio_cell(r, "tdiff_vs_full")) for r in outcome])
        lines.append("")
    autoencoder = next((r for r in rows if r["kind"] == "autoencoder"), None)
    if autoencoder:
        lines += [f"The frozen decoder (autoencoder trained {autoencoder['steps']} steps on "
                  f"{autoencoder['frames']}-frame clips) decodes the encoder's latents of the held-out clips at "
                  f"{autoencoder['psnr_db']:.2f} dB.", ""]
    found = [r for r in rows if r["kind"] == "fidelity"]
    if found:
        lines += [f"Latent gradient of the pixel loss through the frozen decoder against full backpropagation "
                  f"(`pychop.chopgrad.fidelity`, one held-out clip of {found[0]['frames']} frames):", ""]
        lines += markdown_table(("window", "cosine", "norm ratio"),
                                [(r["method"].split()[-1], f"{r['latent_cosine']:.3f}",
                                  f"{r['latent_norm_ratio']:.3f}") for r in found])
        lines.append("")
    costs = [r for r in rows if r["kind"] == "cost"]
    if costs:
        lines += [f"Training step cost at {costs[0]['frames']} frames (peak bytes saved for backward, step time):",
                  ""]
        lines += cost_table(costs, "pixel full", "full") + [""]
    found = findings(rows)
    if found:
        lines += [plot_note("chopgrad_outcome", "held-out PSNR"), "", FINDINGS_HEADER, ""] + found
    return "\n".join(lines).rstrip()


if __name__ == "__main__":
    run_full("chopgrad_outcome")
