"""Suite `mobius_outcome`: does training the temporal layers in Mobius' parallel form cost quality? The serial
and parallel forms trained from the same starting function for the same steps and seeds, judged on held-out
denoising.

Sizes: ``BENCH_SIZE`` for ``python -m benchmarks`` on a CPU (what ``scripts/bench.sh`` runs: minutes),
``FULL_SIZE`` for ``python -m benchmarks.suites.mobius_outcome [--out DIR]`` (tens of minutes on 2 cores),
``SMOKE_SIZE`` with ``--smoke``.

Set-up (float32, one thread):

- Data: ``benchmarks.synthetic_video.moving_shapes`` with 4 channels, read as latent videos: textured shapes
  moving over a drifting textured background, generated from a seed (training clips from the run's seed,
  held-out clips from one of their own).
- Objective: DDPM noise prediction (1000 steps, linear betas 1e-4 to 0.02), MSE to the noise, timesteps
  uniform; the text is one fixed random embedding.
- ``VideoUNet`` (``pychop.models``, the ``TINY`` layout): its spatial layers are first trained (the same
  objective, on frames of the same videos; temporal layers held at zero) as a text-to-image model would be,
  then frozen (``freeze_spatial``). Each seed re-initialises the temporal layers and zeroes their output
  projections, as AnimateDiff does, so every form starts as the same function, the pretrained per-frame
  denoiser. Forms: ``serial`` (the reference), ``parallel`` (Mobius, ``backend="auto"``),
  ``parallel+lean_frozen`` (``pychop.memory.lean_frozen``), ``parallel+recompute_projection``. The last two
  are the parallel function exactly (their gradients differ from it by rounding only).
- A tiny diffusers ``UNetMotionModel`` the same way (spatial layers pretrained with the motion modules at
  zero, then ``freeze_unet2d_params``; motion modules re-initialised per seed with ``proj_out`` zeroed):
  ``motion serial`` as diffusers runs it, ``motion parallel`` after
  ``pychop.integrations.diffusers.convert_to_parallel``.

Reported per form: the held-out denoising loss (fixed clips, noises and timesteps) after training, mean and
range over seeds, and its curve against steps; the temporal error of the denoised estimate x0 (RMS of the
error of its frame differences, at the held-out timesteps <= ``TDIFF_MAX_T``); their per-seed ratios to the
serial form (median, p10-p90 over seeds); the peak bytes a training step saves for backward
(``SavedActivationMeter``; it cannot see what ``recompute_projection`` saves under its own hooks, the
attention's row statistics, about 0.4% of a block) and the step time (``ctx.compare``, the forms of one model
interleaved), with ratios to the serial form. The step is 0 in the curves: the starting function, the same for
every form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    plot_note,
    plot_outcomes,
    quality_finding,
    range_cell,
    ratio_cell,
    run_full,
    seed_ratios,
    speed_finding,
    still_improving,
    trained_rows,
    widest_spread,
)
from benchmarks.suites.mobius import build
from benchmarks.synthetic_video import moving_shapes
from pychop.chopgrad.memory import SavedActivationMeter
from pychop.models import TINY
from pychop.nn.st_blocks import AttentionBranch

DESCRIPTION = "Mobius outcome: temporal layers trained in serial vs parallel form, held-out denoising loss"

# (label, st_mode, lean_frozen's recompute or None, recompute_projection)
UNET_FORMS = (("serial", "serial", None, False), ("parallel", "parallel", None, False),
              ("parallel+lean_frozen", "parallel", False, False),
              ("parallel+recompute_projection", "parallel", None, True))
MOTION_FORMS = ("motion serial", "motion parallel")
TIMESTEPS = (50, 200, 400, 700)  # held-out timesteps, each clip at each
TDIFF_MAX_T = 400
HELDOUT_SEED = 20_000
TEXT_LENGTH = 5


@dataclass(frozen=True)
class Size:
    size: int  # latent height and width (a multiple of 2)
    frames: int
    batch: int
    pretrain_steps: int  # spatial layers, once per model
    steps: int  # temporal layers, per form and seed
    eval_every: int
    seeds: int
    heldout: int  # held-out clips (each at every held-out timestep)
    lr: float = 1e-3


FULL_SIZE = Size(size=8, frames=8, batch=2, pretrain_steps=200, steps=160, eval_every=40, seeds=3, heldout=2)
BENCH_SIZE = Size(size=8, frames=8, batch=2, pretrain_steps=30, steps=12, eval_every=6, seeds=2, heldout=1)
SMOKE_SIZE = Size(size=8, frames=3, batch=1, pretrain_steps=2, steps=2, eval_every=1, seeds=2, heldout=1)
full_run = False  # FULL_SIZE: set by `python -m benchmarks.suites.mobius_outcome` (outcomes.run_full)

ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float()


def noised(clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t of clean (B, C, T, H, W) videos at timesteps t (B,)."""
    a = ALPHAS_CUMPROD.to(t.device)[t].view(-1, 1, 1, 1, 1)
    return a.sqrt() * clean + (1 - a).sqrt() * noise


def denoised(noisy: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The x0 estimate from a noise prediction."""
    a = ALPHAS_CUMPROD.to(t.device)[t].view(-1, 1, 1, 1, 1)
    return (noisy - (1 - a).sqrt() * noise) / a.sqrt()


class Family:
    """One model: how it is built in each form, what its temporal modules are, how it predicts noise."""

    name: str
    forms: Tuple[str, ...]

    def make(self, form: str, state: dict) -> nn.Module:
        raise NotImplementedError

    def temporal_modules(self, model: nn.Module) -> List[nn.Module]:
        raise NotImplementedError

    def output_projections(self, model: nn.Module) -> List[nn.Module]:
        """The layers whose zero weights make every temporal module an identity (AnimateDiff's init)."""
        raise NotImplementedError

    def predict(self, model: nn.Module, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Noise prediction for (B, C, T, H, W) ``noisy`` at timesteps ``t``; ``text`` (B, L, D) per video."""
        raise NotImplementedError


class UNetFamily(Family):
    name, forms = "VideoUNet", tuple(form[0] for form in UNET_FORMS)

    def __init__(self, device):
        self.device, self.text_dim = device, TINY.text_dim

    def make(self, form, state=None):
        _, mode, lean, projection = next(f for f in UNET_FORMS if f[0] == form)
        model = build(TINY, mode, "torch" if mode == "serial" else "auto", self.device, torch.float32, projection,
                      lean)
        if state is not None:
            model.load_state_dict(state)
        return model

    def temporal_modules(self, model):
        return model.temporal_modules()

    def output_projections(self, model):
        return [m.to_out if isinstance(m, AttentionBranch) else m.conv for m in model.temporal_modules()]

    def predict(self, model, noisy, t, text):
        return model(noisy.transpose(1, 2), t, text).transpose(1, 2)


class MotionFamily(Family):
    name, forms = "UNetMotionModel", MOTION_FORMS
    text_dim = 24

    def __init__(self, device):
        self.device = device

    def make(self, form, state=None):
        from diffusers import UNetMotionModel

        from pychop.integrations.diffusers import convert_to_parallel
        torch.manual_seed(0)
        model = UNetMotionModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                                up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
                                cross_attention_dim=self.text_dim, num_attention_heads=2, motion_num_attention_heads=2,
                                motion_max_seq_length=32).to(self.device)
        if state is not None:
            model.load_state_dict(state)
        model.freeze_unet2d_params()
        if form == "motion parallel":
            model.conversion = convert_to_parallel(model)
        return model

    def temporal_modules(self, model):
        blocks = [*model.down_blocks, *model.up_blocks, model.mid_block]
        return [m for block in blocks for m in getattr(block, "motion_modules", [])]

    def output_projections(self, model):
        return [m.proj_out for m in self.temporal_modules(model)]

    def predict(self, model, noisy, t, text):
        return model(noisy, t, encoder_hidden_states=text.repeat_interleave(noisy.shape[2], dim=0)).sample


def zero_outputs(family: Family, model: nn.Module) -> None:
    with torch.no_grad():
        for layer in family.output_projections(model):
            layer.weight.zero_()
            layer.bias.zero_()


def trainable(model: nn.Module) -> List[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class Setting:
    """The data, the held-out set and the pretrained spatial weights of one model family."""

    def __init__(self, family: Family, size: Size, device):
        self.family, self.size, self.device = family, size, device
        generator = torch.Generator().manual_seed(HELDOUT_SEED)
        self.text = torch.randn(1, TEXT_LENGTH, family.text_dim, generator=generator).to(device)
        clips = moving_shapes(size.heldout, size.frames, size.size, generator, channels=4)
        self.heldout_clean = clips.repeat_interleave(len(TIMESTEPS), dim=0).to(device)
        self.heldout_t = torch.tensor(TIMESTEPS * size.heldout, device=device)
        self.heldout_noise = torch.randn(self.heldout_clean.shape, generator=generator).to(device)
        self.heldout_noisy = noised(self.heldout_clean, self.heldout_noise, self.heldout_t)
        self.pretrained = self.pretrain()

    def batch(self, data: torch.Generator):
        clean = moving_shapes(self.size.batch, self.size.frames, self.size.size, data, channels=4).to(self.device)
        t = torch.randint(0, len(ALPHAS_CUMPROD), (self.size.batch,), generator=data).to(self.device)
        noise = torch.randn(clean.shape, generator=data).to(self.device)
        return noised(clean, noise, t), t, noise

    def loss(self, model: nn.Module, noisy, t, noise) -> torch.Tensor:
        text = self.text.expand(noisy.shape[0], -1, -1)
        return F.mse_loss(self.family.predict(model, noisy, t, text), noise)

    def pretrain(self) -> dict:
        """The spatial layers trained with the temporal modules at zero and frozen (a per-frame denoiser);
        sets ``pretrain_losses`` (the first and last training loss)."""
        family = self.family
        model = family.make(family.forms[0])
        zero_outputs(family, model)
        model.requires_grad_(True)
        for module in family.temporal_modules(model):
            module.requires_grad_(False)
        optimizer = torch.optim.AdamW(trainable(model), lr=2e-3)
        data = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(self.size.pretrain_steps):
            loss = self.loss(model, *self.batch(data))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        self.pretrain_losses = (losses[0], losses[-1])
        self.pretrained_loss = self.evaluate(model)["loss"]
        return {key: value.detach().clone() for key, value in model.state_dict().items()}

    def initial_state(self, seed: int) -> dict:
        """The pretrained weights with the temporal modules initialised from ``seed`` and their output
        projections zeroed: every form starts as the pretrained per-frame denoiser."""
        model = self.family.make(self.family.forms[0], self.pretrained)
        torch.manual_seed(seed)
        for module in self.family.temporal_modules(model):
            for layer in module.modules():
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
        zero_outputs(self.family, model)
        return model.state_dict()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        """Held-out denoising loss, and the temporal error of the x0 estimate at timesteps <= TDIFF_MAX_T."""
        losses, errors = [], []
        for start in range(0, len(self.heldout_t), len(TIMESTEPS)):
            part = slice(start, start + len(TIMESTEPS))
            noisy, t, noise = self.heldout_noisy[part], self.heldout_t[part], self.heldout_noise[part]
            predicted = self.family.predict(model, noisy, t, self.text.expand(len(t), -1, -1))
            losses.append(F.mse_loss(predicted, noise))
            early = t <= TDIFF_MAX_T
            estimate = denoised(noisy[early], predicted[early], t[early])
            errors.append((estimate.diff(dim=2) - self.heldout_clean[part][early].diff(dim=2)).square().mean())
        return {"loss": torch.stack(losses).mean().item(), "tdiff": torch.stack(errors).mean().sqrt().item()}


def train(setting: Setting, form: str, seed: int):
    """The temporal modules of ``form`` trained from ``seed``: final held-out metrics and the loss curve."""
    size = setting.size
    model = setting.family.make(form, setting.initial_state(seed))
    optimizer = torch.optim.AdamW(trainable(model), lr=size.lr)
    data = torch.Generator().manual_seed(1000 * seed + 7)
    curve = [(0, setting.evaluate(model)["loss"])]
    for step in range(1, size.steps + 1):
        setting.loss(model, *setting.batch(data)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % size.eval_every == 0 or step == size.steps:
            curve.append((step, setting.evaluate(model)["loss"]))
    return setting.evaluate(model), curve


def outcome_rows(ctx, setting: Setting) -> List[dict]:
    """Every form trained from every seed: per run, per form and per curve point."""
    family, size = setting.family, setting.size
    common = {"model": family.name, "frames": size.frames, "batch": size.batch, "steps": size.steps}
    return trained_rows(ctx, common, family.forms, size.seeds, lambda form, seed: train(setting, form, seed),
                        metrics=("loss", "tdiff"), ratios=("loss", "tdiff"), references={"serial": family.forms[0]},
                        curve_metric="loss")


def cost_rows(ctx, setting: Setting) -> List[dict]:
    """Peak saved bytes and step time of a temporal-training step in each form (one batch)."""
    family = setting.family
    batch = setting.batch(torch.Generator().manual_seed(HELDOUT_SEED - 1))
    steps: Dict[str, Callable[[], None]] = {}
    rows = []
    state = setting.initial_state(0)
    for form in family.forms:
        model = family.make(form, state)
        optimizer = torch.optim.AdamW(trainable(model), lr=setting.size.lr)

        def step(model=model, optimizer=optimizer):
            setting.loss(model, *batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        saved = SavedActivationMeter(model).measure(lambda model=model: setting.loss(model, *batch).backward())
        model.zero_grad(set_to_none=True)
        rows.append({"kind": "cost", "model": family.name, "method": form, "frames": setting.size.frames,
                     "saved_mb": saved / 2 ** 20})
        steps[form] = step
    add_costs(ctx, rows, steps, family.forms[0], "serial")
    return rows


def families(device) -> List[Family]:
    found: List[Family] = [UNetFamily(device)]
    try:
        import diffusers  # noqa: F401
        found.append(MotionFamily(device))
    except ImportError:
        pass
    return found


def run(ctx):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is as fast and far steadier on a shared CPU
    try:
        size = SMOKE_SIZE if ctx.smoke else FULL_SIZE if full_run else BENCH_SIZE
        rows = []
        for family in families(ctx.device):
            setting = Setting(family, size, ctx.device)
            first, last = setting.pretrain_losses
            rows.append({"kind": "pretrain", "model": family.name, "steps": size.pretrain_steps, "loss_first": first,
                         "loss_last": last, "loss": setting.pretrained_loss,
                         "note": "spatial layers, temporal at zero; loss: held-out"})
            rows += cost_rows(ctx, setting)
            rows += outcome_rows(ctx, setting)
        if len(families(ctx.device)) == 1:
            rows.append({"kind": "pretrain", "model": "UNetMotionModel", "note": "skipped: diffusers is not installed"})
        return rows
    finally:
        torch.set_num_threads(threads)


def plot(rows, path):
    plot_outcomes(rows, path, "model", "loss", "training step (temporal layers)", "held-out denoising loss")


SAME_FUNCTION = 1e-3  # a variant whose final metrics are within this (relative) of its base form's in every seed


def model_findings(rows: List[dict], model: str) -> List[str]:
    """``model``'s forms against its serial form: the grouped verdicts, then per form its held-out loss and
    temporal error ratios with their verdicts, whether it ended as its base form did (a ``form+option``
    against ``form``), and its saved bytes and step time."""
    outcome = {r["method"]: r for r in rows if r["kind"] == "outcome" and r["model"] == model}
    costs = {r["method"]: r for r in rows if r["kind"] == "cost" and r["model"] == model}
    serial, *forms = outcome
    group = ("model", model)
    measures = {"held-out loss": ("loss", {}), "temporal error": ("tdiff", {})}
    details = []
    for form in forms:
        parts = []
        for what, (metric, verdicts) in measures.items():
            text, verdicts[form] = quality_finding(outcome[form], f"{metric}_vs_serial",
                                                   seed_ratios(rows, group, form, serial, metric), what)
            parts.append(text)
        base = form.split("+")[0]
        if base != form and base in outcome:
            apart = max(abs(ratio - 1) for metric, _ in measures.values()
                        for ratio in seed_ratios(rows, group, form, base, metric))
            if apart <= SAME_FUNCTION:
                parts.append(f"the same final metrics as `{base}` in every seed, "
                             + ("to the bit" if apart == 0 else f"within {apart:.1e} (relative)")
                             + ": the option changes what is saved, not the function")
        if form in costs:
            cost = costs[form]
            parts.append(f"saved for backward {cost['saved_mb']:.2f} MiB, {cost['saved_vs_serial']:.2f}x the "
                         f"serial form's; step time {speed_finding(cost, 'time_vs_serial')}")
        details.append(f"`{form}`: " + "; ".join(parts) + ".")
    summary = "; ".join(f"{what}: {grouped_verdicts({f'`{f}`': v for f, v in verdicts.items()}, 'form', 'forms')}"
                        for what, (_, verdicts) in measures.items())
    start = next((r["loss"] for r in rows if r["kind"] == "pretrain" and r["model"] == model and "loss" in r), None)
    first = outcome[serial]
    head = (f"**{model}**, temporal layers trained {first['steps']} steps from the same start"
            + (f" (held-out loss {start:.4f}, the pretrained per-frame denoiser)" if start is not None else "")
            + f", against `{serial}` (held-out loss {first['loss']:.4f} at the end): {summary}.")
    return bullets([head]) + ["  " + line for line in bullets(details)]


def in_short(rows: List[dict], models: List[str]) -> str:
    """The findings in one plain sentence: per model, the forms whose held-out loss or temporal error against the
    serial form costs quality (with the loss ratio), else that none did, and the forms that trained better."""
    clauses = []
    for model in models:
        outcome = {r["method"]: r for r in rows if r["kind"] == "outcome" and r["model"] == model}
        serial, *forms = outcome
        verdicts = {form: {metric: judged(outcome[form], f"{metric}_vs_serial") for metric in ("loss", "tdiff")}
                    for form in forms}
        costly = [form for form in forms if QUALITY[2] in verdicts[form].values()]
        better = [f"`{form}`" for form in forms if verdicts[form]["loss"] == QUALITY[0] and form not in costly]
        if costly:
            clause = f"on {model}, " + " and ".join(
                f"`{form}` cost quality against `{serial}` (held-out loss {outcome[form]['loss_vs_serial']:.2f}x, "
                f"temporal error {outcome[form]['tdiff_vs_serial']:.2f}x)" for form in costly)
        else:
            clause = f"on {model}, no parallel form cost quality against `{serial}` that the seeds can see"
        if better:
            clause += f", and {names(better)} ended with a lower held-out loss"
        clauses.append(clause)
    return "**In short**: " + "; ".join(clauses) + "."


def findings(rows: List[dict]) -> List[str]:
    """What the run found, as Markdown list items computed from ``rows`` by the rules of benchmarks.outcomes:
    per model each form against the serial one (quality, memory, time), and the study's limits."""
    models = list(dict.fromkeys(r["model"] for r in rows if r["kind"] == "outcome"))
    if not models:
        return []
    lines = bullets([in_short(rows, models)]) + [line for model in models for line in model_findings(rows, model)]
    first = next(r for r in rows if r["kind"] == "outcome")
    rising = [still_improving(rows, ("model", model), "loss", higher_is_better=False) for model in models]
    width = widest_spread([r for r in rows if r["kind"] == "outcome"], ("loss_vs_serial", "tdiff_vs_serial"))
    return lines + bullets([
        f"Limits: {first['seeds']} seeds, {first['steps']} steps of batch {first['batch']} at {first['frames']} frames "
        "of synthetic latent video, tiny models (`VideoUNet` at `TINY`, a tiny `UNetMotionModel`); "
        f"{sum(r for r, _ in rising)} of {sum(n for _, n in rising)} loss curves were still falling at the last "
        f"evaluation. The ratio spreads against the serial form are up to {width:.2f} wide. Step times come from "
        "the machine above (CPU times say nothing about a GPU). The verdicts hold at this scale; they cannot say "
        "whether a production model trained for days behaves alike."])


def report(result: dict) -> str:
    """Markdown for docs/benchmarks.md: the outcome table and the cost table per model, and what the run found
    (``findings``)."""
    rows = result["rows"]
    lines = ["The task, the methods and the measures: [docs/outcomes.md](outcomes.md#the-mobius-study).", ""]
    for model in dict.fromkeys(r["model"] for r in rows if r["kind"] == "outcome"):
        outcome = [r for r in rows if r["kind"] == "outcome" and r["model"] == model]
        first = outcome[0]
        lines += [f"**{model}**: temporal layers trained {first['steps']} steps of batch {first['batch']} at "
                  f"{first['frames']} frames, {first['seeds']} seeds (mean and range over seeds; ratios per seed "
                  "to the serial form, median and p10-p90):", ""]
        lines += markdown_table(
            ("form", "held-out loss", "temporal error", "loss vs serial", "temporal error vs serial"),
            [(r["method"], range_cell(r, "loss", ".4f"), range_cell(r, "tdiff", ".4f"),
              ratio_cell(r, "loss_vs_serial"), ratio_cell(r, "tdiff_vs_serial")) for r in outcome])
        lines.append("")
        costs = [r for r in rows if r["kind"] == "cost" and r["model"] == model]
        if costs:
            lines += [f"Training step cost, {costs[0]['frames']} frames:", ""]
            lines += cost_table(costs, costs[0]["method"], "serial") + [""]
    found = findings(rows)
    if found:
        lines += [plot_note("mobius_outcome", "held-out denoising loss"), "", FINDINGS_HEADER, ""] + found
    return "\n".join(lines).rstrip()


if __name__ == "__main__":
    run_full("mobius_outcome")
