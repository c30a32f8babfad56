"""Suite `mobius`: one training step of the reference VideoUNet, serial vs parallel (Mobius), temporal layers only.

Forms of ``pychop.models.VideoUNet`` with identical weights, spatial layers frozen (``freeze_spatial``), AdamW
on the temporal parameters, side by side in one run:

- ``serial+reference``: serial spatial-temporal blocks written the diffusers way (SDPA, the usual permutes);
- ``parallel+reference``: parallel blocks with pychop's ``"torch"`` backend (the unfused reference attention);
- ``parallel+fused``: parallel blocks with ``backend="auto"`` when a fused backend is available on the device
  (otherwise the row says what was available and is left empty);
- ``parallel+fused+recompute_projection``: the same with ``recompute_projection`` (the blocks' packed q/k/v
  projections are recomputed in the backward instead of kept). The account below cannot see the attention's
  row statistics in this form (saved-tensor hooks do not nest), about 0.4% of a block's bytes;
- each of ``serial+reference``, ``parallel+fused`` and ``parallel+fused+recompute_projection`` again with
  ``pychop.memory.lean_frozen`` (``+lean_frozen``: frozen convolutions keep only their weight, GEGLUs their
  input, cross-attention one copy of the text's keys and values per video) and with
  ``lean_frozen(recompute=True)`` (``+lean_frozen(recompute)``: the frozen regions recomputed in the backward).

Per form: the median time of a whole step (forward, backward, optimizer), the allocator's peak above the weights
and optimizer state (GPU), and the bytes saved for backward, each with its ratio to ``serial+reference``. Then a
saved-tensor account of one forward (``saved_tensors_hooks``): the bytes autograd keeps for backward, attributed
to the innermost component that saved them, each storage counted once, parameters and buffers left out (as
``pychop.chopgrad.memory.SavedActivationMeter`` counts). GPU: ``SD15_VIDEO`` (a Stable-Diffusion-1.5 video UNet,
16 frames, 32x32 latents), batch 2, bfloat16 weights. CPU: ``CPU_CONFIG`` (the same layout at a tenth of the
widths, 8 frames, 16x16 latents), batch 1, float32 (timings say nothing about a GPU). The forms' steps are
timed side by side in one interleaved comparison (``ctx.compare``); time_vs_serial is the median of the
per-round ratios, with its spread.

The account alone, at any config and on any device (saved bytes do not depend on the device):
``python -m benchmarks.suites.mobius --config SD15_VIDEO --batch 1 [--out FILE.json]`` (an hour and a half on a
2-core CPU shared with other jobs, one thread; ``--out`` writes the JSON that docs/benchmarks.md quotes).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

import pychop
from benchmarks.plots import no_data
from benchmarks.tables import Table, markdown, text
from pychop.chopgrad.memory import is_activation, module_storages, storage_key
from pychop.memory import lean_frozen
from pychop.models import SD15_VIDEO, TINY, VideoUNet
from pychop.models.video_unet import CrossAttention, FeedForward, VideoTransformer
from pychop.nn import ParallelSTBlock, ResConvBlock, SerialSTBlock, TemporalConv

DESCRIPTION = "Mobius: VideoUNet training step, serial vs parallel spatial-temporal blocks (temporal layers trained)"

CPU_CONFIG = dataclasses.replace(SD15_VIDEO, block_channels=(32, 64, 128, 128), num_frames=8, latent_size=(16, 16))
CONFIGS = {"TINY": TINY, "CPU_CONFIG": CPU_CONFIG, "SD15_VIDEO": SD15_VIDEO}

# (label, st_mode, attention backend, recompute_projection); then each with lean_frozen where LEAN says so.
BASE_FORMS = (("serial+reference", "serial", "torch", False), ("parallel+reference", "parallel", "torch", False),
              ("parallel+fused", "parallel", "auto", False),
              ("parallel+fused+recompute_projection", "parallel", "auto", True))
LEAN = ((None, ""), (False, "+lean_frozen"), (True, "+lean_frozen(recompute)"))  # (recompute, label suffix)
FORMS = tuple((label + suffix, mode, backend, projection, lean) for label, mode, backend, projection in BASE_FORMS
              for lean, suffix in LEAN if lean is None or label != "parallel+reference")

# Innermost match wins; the order only names the components in the table.
COMPONENTS = ((SerialSTBlock, "st_attention"), (ParallelSTBlock, "st_attention"), (TemporalConv, "temporal_conv"),
              (ResConvBlock, "res_conv (spatial part)"), (CrossAttention, "cross_attention"),
              (FeedForward, "feed_forward"), (VideoTransformer, "transformer in/out"))


def width(module) -> int:
    """Channels of a component, to tell the UNet's levels apart in the account."""
    for tensor in module.parameters():
        return tensor.shape[0]
    return 0


def fused_backends(device):
    reasons = pychop.available_backends(device)
    return [name for name, reason in reasons.items() if reason is None and name != "torch"], reasons


def build(config, mode, backend, device, dtype, recompute_projection=False, lean=None):
    """The form's model, spatial layers frozen; ``lean``: None, or lean_frozen's ``recompute``."""
    torch.manual_seed(0)  # the same weights in every form: the parameter structure is identical
    with torch.device(device):
        model = VideoUNet(config, mode, backend=backend).to(dtype)
    for block in model.modules():
        if isinstance(block, ParallelSTBlock):
            block.recompute_projection = recompute_projection
    model.freeze_spatial()
    if lean is not None:
        lean_frozen(model, recompute=lean)
    return model


def training_step(model, inputs, target):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(*inputs)
        F.mse_loss(out.float(), target.float()).backward()
        optimizer.step()
    return step


def saved_tensor_account(model, inputs):
    """MiB saved for backward per component during one forward (storages counted once, parameters and buffers
    excluded)."""
    stack, totals, counts, seen = ["unet in/out"], defaultdict(float), defaultdict(int), set()
    excluded = module_storages(model)
    handles = []

    def leave(module, args, output):  # a forward hook's return value would replace the output: return None
        stack.pop()

    for module in model.modules():
        label = next((name for cls, name in COMPONENTS if isinstance(module, cls)), None)
        if label is not None:
            label = f"{label} C={width(module) if label != 'res_conv (spatial part)' else module.conv2.out_channels}"
            handles.append(module.register_forward_pre_hook(lambda m, a, label=label: stack.append(label)))
            handles.append(module.register_forward_hook(leave))

    def pack(tensor):
        key = storage_key(tensor)
        if key not in seen and is_activation(tensor, excluded):
            seen.add(key)
            totals[stack[-1]] += tensor.untyped_storage().nbytes() / 2 ** 20
            counts[stack[-1]] += 1
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    del out
    return totals, counts


def run(ctx):
    device = ctx.device
    if ctx.smoke:
        config_name, batch, dtype = "TINY", 1, torch.float32
    elif ctx.on_gpu:
        config_name, batch, dtype = "SD15_VIDEO", 2, torch.bfloat16
    else:
        config_name, batch, dtype = "CPU_CONFIG", 1, torch.float32
    config = CONFIGS[config_name]
    fused, reasons = fused_backends(device)
    print(f"fused backends on {device.type}: {fused or 'none'}; "
          + "; ".join(f"{name}: {reason}" for name, reason in reasons.items() if reason), flush=True)

    rows, accounts, steps = [], {}, {}
    for label, mode, backend, projection, lean in ctx.progress(FORMS, "mobius forms"):
        row = {"table": "step", "form": label, "config": config_name, "batch": batch}
        if backend == "auto" and not fused:
            rows.append({**row, "note": f"no fused backend on {device.type}"})
            continue
        model = build(config, mode, backend, device, dtype, projection, lean)
        torch.manual_seed(1)
        inputs = model.example_inputs(batch, device=device, dtype=dtype)
        target = torch.randn(batch, config.num_frames, config.out_channels, *config.latent_size, device=device,
                             dtype=dtype)
        step = training_step(model, inputs, target)
        step()  # allocates the optimizer state before anything is measured
        row["attention"] = "sdpa" if mode == "serial" else pychop.ops.backends.resolve(backend, device)
        row["trainable_M"] = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        row["peak_mb"] = ctx.peak_memory_mb(step)
        totals, counts = saved_tensor_account(model, inputs)
        accounts[label] = totals
        row["saved_mb"] = sum(totals.values())
        steps[label] = step
        rows.append(row)

    # every form's step timed side by side: the models stay resident (each peak above is counted above what was
    # allocated before it)
    timed = ctx.compare(steps)
    baseline = next(row for row in rows if "saved_mb" in row)
    for row in rows:
        if row["form"] not in steps:
            continue
        row["step_ms"] = timed.ms[row["form"]]
        if row is not baseline:
            if row["peak_mb"] is not None:
                row["peak_vs_serial"] = row["peak_mb"] / baseline["peak_mb"]
            row["saved_vs_serial"] = row["saved_mb"] / baseline["saved_mb"]
            row.update(timed.ratio(row["form"], baseline["form"]).columns("time_vs_serial"))

    return rows + account_rows(accounts)


def account_rows(accounts):
    """Rows of the saved-tensor account: one per component, a column per form, then the totals."""
    components = sorted({name for totals in accounts.values() for name in totals},
                        key=lambda name: (name == "unet in/out", name.split(" C=")[0], int(name.split("C=")[-1])
                                          if "C=" in name else 0))
    rows = []
    for component in components:
        account_row = {"table": "saved", "form": "per component", "component": component}
        for label, totals in accounts.items():
            account_row[f"{label} MiB"] = totals.get(component, 0.0)
        rows.append(account_row)
    if accounts:
        rows.append({"table": "saved", "form": "per component", "component": "total",
                     **{f"{label} MiB": sum(totals.values()) for label, totals in accounts.items()}})
    return rows


def account_tables(rows):
    """The saved-tensor account as tables: each form's total over the serial form's (base form x lean_frozen),
    then per component the MiB of the base forms, and of the serial form with and without lean_frozen."""
    account = [r for r in rows if r["table"] == "saved"]
    if not account:
        return []
    total = next(r for r in account if r["component"] == "total")
    serial = total[f"{FORMS[0][0]} MiB"]
    ratios = []
    for label, *_ in BASE_FORMS:
        row = {"form": label}
        for _, suffix in LEAN:
            value = total.get(f"{label}{suffix} MiB")
            row[suffix[1:] or "plain"] = None if value is None else value / serial
        ratios.append(row)
    ratios = [row for row in ratios if any(value is not None for key, value in row.items() if key != "form")]

    def by_component(labels):
        return [{"component": r["component"], **{label: r.get(f"{label} MiB") for label in labels}} for r in account]

    def share(*prefixes):  # of the serial form's bytes
        return sum(r[f"{FORMS[0][0]} MiB"] for r in account if r["component"].startswith(prefixes)) / serial
    return [Table(f"Saved for backward, relative to the serial form's {serial:.4g} MiB", ratios,
                  "Bytes autograd keeps for backward during one forward: unique storages, parameters and buffers "
                  "excluded. Columns: the model as it is, with pychop.memory.lean_frozen, with "
                  f"lean_frozen(recompute=True). Of the serial form's bytes the spatial-temporal attention blocks "
                  f"hold {share('st_attention'):.0%}, and the frozen layers the temporal gradient passes through, "
                  f"which lean_frozen shrinks (feed-forward, the residual blocks' spatial part, cross-attention), "
                  f"{share('feed_forward', 'res_conv', 'cross_attention'):.0%}."),
            Table("Saved for backward per component (MiB), by form", by_component([f[0] for f in BASE_FORMS])),
            Table("Saved for backward per component (MiB), serial form with lean_frozen",
                  by_component([FORMS[0][0] + suffix for _, suffix in LEAN]))]


def tables(rows):
    """The forms' training step (time, peak, saved bytes, each against the serial form), then the account."""
    steps = [{key: value for key, value in row.items() if key not in ("table", "config", "batch")}
             for row in rows if row["table"] == "step"]
    out = []
    if steps:
        first = next(row for row in rows if row["table"] == "step")
        out.append(Table(f"VideoUNet training step at {first['config']}, batch {first['batch']}", steps,
                         "Spatial layers frozen, AdamW on the temporal ones; every form's step timed in one "
                         "interleaved comparison. peak_mb: the allocator's peak (GPU only); saved_mb: bytes saved "
                         "for backward."))
    return out + account_tables(rows)


def report(result):
    """Markdown for docs/benchmarks.md: the suite's tables, or the account's (python -m
    benchmarks.suites.mobius --out), naming the account's config."""
    parts = []
    if "account" in result:
        account = result["account"]
        parts.append(f"Saved-tensor account alone (no step timed): config {account['config']}, batch "
                     f"{account['batch']}, {account['dtype']}. Saved bytes do not depend on the device.")
    return "\n\n".join(parts + [markdown(table) for table in tables(result["rows"])])


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in rows if r["table"] == "step" and r.get("step_ms") is not None]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.8 + 0.45 * max(len(steps), 4)))
    positions = range(len(steps))
    # step time as the paired ratio to the serial form's (its median and p10-p90 bar): on a loaded machine the
    # ratio of interleaved samples is steadier than either time
    ratios = [(r.get("time_vs_serial", 1.0), r.get("time_vs_serial_p10", 1.0), r.get("time_vs_serial_p90", 1.0))
              for r in steps]
    panels = (("time_vs_serial", "step time / serial form's (p10-p90)"), ("peak_mb", "peak memory (MiB)"),
              ("saved_mb", "saved for backward (MiB)"))
    for ax, (key, title) in zip(axes, panels):
        ax.set_title(title)
        if key == "time_vs_serial":
            values = [median for median, _, _ in ratios]
            spread = [[median - low for median, low, _ in ratios], [high - median for median, _, high in ratios]]
            ax.axvline(1.0, color="0.6", linewidth=1)
        else:
            values, spread = [r.get(key) for r in steps], None
        if not any(value is not None for value in values):
            no_data(ax, "the allocator's peak is measured on a GPU" if key == "peak_mb" else "not measured")
            continue
        ax.barh(positions, [value or 0.0 for value in values], xerr=spread, capsize=3)
        # the forms' names once, on the left panel; every panel lists them in the same order, the serial on top
        ax.set_yticks(positions, [r["form"] for r in steps] if ax is axes[0] else [])
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def form_account(config_name, mode, backend, projection, lean, batch, device, dtype_name):
    """The saved-tensor account of one form (see account_main)."""
    dtype = getattr(torch, dtype_name)
    model = build(CONFIGS[config_name], mode, backend, torch.device(device), dtype, projection, lean)
    torch.manual_seed(1)
    return saved_tensor_account(model, model.example_inputs(batch, device=device, dtype=dtype))[0]


def account_main(argv=None):
    """The saved-tensor account alone, for any config on any device: bytes saved for backward do not depend on
    the device, so a CPU shows where the memory of the GPU config goes (one forward per form, no step; each
    form in a fresh process, so that one form's freed memory cannot inflate the next one's)."""
    import argparse
    import json
    import multiprocessing
    import sys
    from concurrent.futures import ProcessPoolExecutor

    from benchmarks.machine import finish, machine_record

    parser = argparse.ArgumentParser(prog="python -m benchmarks.suites.mobius", description=account_main.__doc__)
    parser.add_argument("--config", default="SD15_VIDEO", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--form", action="append", default=[], choices=[form[0] for form in FORMS],
                        help="a form to count (repeatable; default: all); serial+reference always counts")
    parser.add_argument("--out", type=Path, help="JSON file for the account (rewritten after each form), as "
                                                     "python -m benchmarks writes a suite's")
    args = parser.parse_args(argv)
    record = machine_record(torch.device(args.device), ["python", "-m", "benchmarks.suites.mobius",
                                                        *(sys.argv[1:] if argv is None else argv)])
    accounts = {}
    for label, mode, backend, projection, lean in FORMS:
        if args.form and label not in args.form and label != FORMS[0][0]:
            continue
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            accounts[label] = pool.submit(form_account, args.config, mode, backend, projection, lean, args.batch,
                                          args.device, args.dtype).result()
        print(f"{label}: {sum(accounts[label].values()):.1f} MiB saved", flush=True)
        if args.out:
            payload = {"suite": "mobius", "account": {"config": args.config, "batch": args.batch,
                                                      "dtype": args.dtype, "device": args.device},
                       "machine": finish(record), "rows": account_rows(accounts)}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(payload, indent=1))
    print("\n\n".join(text(table) for table in account_tables(account_rows(accounts))))


if __name__ == "__main__":
    account_main()
