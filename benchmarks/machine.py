"""The ``machine`` record every result file carries: what ran the command, when, and how loaded the machine was.

docs/benchmarks.md quotes a result only with this record (``describe``), so a figure always names its machine
(CPU model and torch's CPU capability, or the GPU), its command and its date.
"""

from __future__ import annotations

import os
import platform
import shlex
import time
from typing import Optional, Sequence

import torch


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module says, else 'unknown CPU'."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> Optional[float]:
    """The 1-minute load average (runnable processes; other jobs slow timed code down), None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_record(device: torch.device, command: Sequence[str]) -> dict:
    """CPU model, torch's CPU capability, CPU count and torch's thread count, the GPU's name (None on a CPU run),
    torch / triton / python versions, the date and time, the exact command (``command``: its words) and the
    1-minute load average as it starts (``finish`` adds the one at its end)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "time": time.strftime("%H:%M:%S"),
            "command": shlex.join(command), "load_start": load_average()}


def finish(record: dict) -> dict:
    """The record with the 1-minute load average at the end of the run (``load_end``)."""
    return {**record, "load_end": load_average()}


def describe(record: dict) -> str:
    """One line naming the machine: the GPU, or the CPU model, its capability and cores; then the load, and the
    record's ``note`` where it has one."""
    if record.get("gpu"):
        where = f"{record['gpu']} (host CPU: {record['cpu']})"
    else:
        where = f"{record['cpu']}, {record['cpu_capability']}, {record['cpu_count']} cores"
    loads = [record.get(key) for key in ("load_start", "load_end")]
    if all(load is not None for load in loads):
        where += f"; 1-minute load average {loads[0]:g} at the start, {loads[1]:g} at the end"
    if record.get("note"):  # a record completed after its run says how
        where += f" ({record['note']})"
    return where
