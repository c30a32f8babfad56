"""Paired, repeated timing: the candidates of one comparison measured side by side, interleaved in one process.

``measure(candidates, settings, clock)`` calls each candidate once (compiles, allocations), times one more call
of each to choose its calls per sample (enough that a sample lasts at least ``settings.min_sample_ms``), runs
``settings.warmup`` untimed rounds, then ``settings.repeats`` timed rounds. A round times every candidate once, in
the order given (A, B, C, A, B, C, ...), so the samples of one round share the machine's state of that moment:
the per-round ratio of two candidates cancels what drifts slower than a round (other processes, clock speed).
Times are the median over rounds of each sample's milliseconds per call; a ratio is the median of the per-round
ratios with their 10th and 90th percentiles (``Ratio``), and a ratio whose p10-p90 range holds 1.0 is not a
difference (``Ratio.clear`` is False; ``format_ratio`` marks it with ``~``).

Clocks: ``CpuClock`` (time.perf_counter around the calls) and ``CudaClock`` (CUDA events around the calls, after
a synchronize, so a sample is the GPU time of back-to-back calls). Anything with ``now()`` (seconds) and
``time_ms(fn, calls)`` serves, e.g. a fake clock in tests.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Protocol, Sequence

MIN_ROUNDS = 3  # a comparison stopped by its budget still has this many timed rounds
MAX_CALLS_PER_SAMPLE = 10_000


@dataclass(frozen=True)
class Settings:
    """How a comparison is measured.

    repeats: timed rounds. warmup: untimed rounds before them. min_sample_ms: each sample lasts at least this
    long (calls per sample chosen from one timed call). budget_s: wall seconds the timed rounds of one
    comparison may take; rounds stop once it is spent (never fewer than MIN_ROUNDS); None for no limit."""

    repeats: int = 20
    warmup: int = 2
    min_sample_ms: float = 10.0
    budget_s: Optional[float] = None

    def __post_init__(self):
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be at least 0, got {self.warmup}")
        if not self.min_sample_ms > 0:
            raise ValueError(f"min_sample_ms must be positive, got {self.min_sample_ms}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ValueError(f"budget_s must be positive or None, got {self.budget_s}")


class Clock(Protocol):
    def now(self) -> float:
        """Wall seconds (for the budget)."""

    def time_ms(self, fn: Callable[[], object], calls: int) -> float:
        """Milliseconds that `calls` back-to-back calls of fn take."""


class CpuClock:
    now = staticmethod(time.perf_counter)

    @staticmethod
    def time_ms(fn, calls):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) * 1e3


class CudaClock:
    """CUDA events recorded around the calls on the current stream, after a device synchronize."""

    now = staticmethod(time.perf_counter)

    def __init__(self, device):
        import torch
        self.device = device
        self.start, self.end = (torch.cuda.Event(enable_timing=True) for _ in range(2))

    def time_ms(self, fn, calls):
        import torch
        torch.cuda.synchronize(self.device)
        self.start.record()
        for _ in range(calls):
            fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) with linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Ratio:
    """The median of paired per-round ratios, their 10th and 90th percentiles, and how many rounds they span."""

    median: float
    p10: float
    p90: float
    rounds: int

    @classmethod
    def of(cls, numerators: Sequence[float], denominators: Sequence[float]) -> "Ratio":
        if len(numerators) != len(denominators) or not numerators:
            raise ValueError(f"paired samples needed: got {len(numerators)} and {len(denominators)}")
        ratios = [a / b for a, b in zip(numerators, denominators)]
        return cls(percentile(ratios, 50), percentile(ratios, 10), percentile(ratios, 90), len(ratios))

    @property
    def clear(self) -> bool:
        """Whether the spread keeps to one side of 1.0 (a difference, not noise)."""
        return not self.p10 <= 1.0 <= self.p90

    def columns(self, name: str) -> Dict[str, float]:
        """Row columns: name (the median), name_p10, name_p90 (format_table shows them as one cell)."""
        return {name: self.median, f"{name}_p10": self.p10, f"{name}_p90": self.p90}


def format_ratio(median: float, p10: float, p90: float) -> str:
    """'1.52x (1.41-1.60)', or '1.04x (0.93-1.12, ~)' when the spread straddles 1.0."""
    marker = ", ~" if p10 <= 1.0 <= p90 else ""
    return f"{median:.2f}x ({p10:.2f}-{p90:.2f}{marker})"


@dataclass
class Comparison:
    """Timed samples of candidates measured together: samples[name][r] is milliseconds per call in round r;
    seconds is the wall time of the timed rounds."""

    samples: Dict[str, List[float]]
    baseline: Optional[str] = None
    calls_per_sample: Optional[Dict[str, int]] = None
    threads: Optional[int] = None  # torch's CPU threads during the measurement; None on a GPU
    seconds: Optional[float] = None

    def __post_init__(self):
        lengths = {len(values) for values in self.samples.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"every candidate needs the same number (> 0) of samples, got {lengths}")
        if self.baseline is not None and self.baseline not in self.samples:
            raise ValueError(f"baseline {self.baseline!r} is not a candidate ({sorted(self.samples)})")

    @property
    def rounds(self) -> int:
        return len(next(iter(self.samples.values())))

    @property
    def ms(self) -> Dict[str, float]:
        """Median milliseconds per call of each candidate."""
        return {name: percentile(values, 50) for name, values in self.samples.items()}

    def ratio(self, numerator: str, denominator: str) -> Ratio:
        """numerator's time / denominator's time, round by round."""
        return Ratio.of(self.samples[numerator], self.samples[denominator])

    def speedup(self, name: str, over: Optional[str] = None) -> Ratio:
        """The time of `over` (default: the baseline) / the time of `name`, round by round: > 1 when name is faster."""
        over = over or self.baseline
        if over is None:
            raise ValueError("speedup needs `over` or a comparison with a baseline")
        return self.ratio(over, name)

    def record(self) -> dict:
        """A JSON-ready account of the measurement (for the suite's results file)."""
        ms = self.ms
        return {"candidates": {name: {"ms": ms[name], "calls_per_sample": (self.calls_per_sample or {}).get(name)}
                               for name in self.samples},
                "baseline": self.baseline, "rounds": self.rounds, "threads": self.threads, "seconds": self.seconds}


def measure(candidates: Mapping[str, Callable[[], object]], settings: Settings, clock: Clock,
            baseline: Optional[str] = None, threads: Optional[int] = None) -> Comparison:
    """Times the candidates interleaved (see the module docstring) and returns their Comparison."""
    if not candidates:
        raise ValueError("measure needs at least one candidate")
    if baseline is not None and baseline not in candidates:
        raise ValueError(f"baseline {baseline!r} is not a candidate ({sorted(candidates)})")
    for fn in candidates.values():
        fn()
    calls = {name: min(MAX_CALLS_PER_SAMPLE, max(1, math.ceil(settings.min_sample_ms / max(clock.time_ms(fn, 1),
                                                                                            1e-6))))
             for name, fn in candidates.items()}
    samples: Dict[str, List[float]] = {name: [] for name in candidates}
    collecting = gc.isenabled()
    gc.disable()  # no collector pauses inside a sample
    try:
        for _ in range(settings.warmup):
            for name, fn in candidates.items():
                clock.time_ms(fn, calls[name])
        start = clock.now()
        for round_index in range(settings.repeats):
            for name, fn in candidates.items():
                samples[name].append(clock.time_ms(fn, calls[name]) / calls[name])
            spent = clock.now() - start
            if settings.budget_s is not None and spent >= settings.budget_s and round_index + 1 >= MIN_ROUNDS:
                break
    finally:
        if collecting:
            gc.enable()
    return Comparison(samples, baseline, calls, threads, clock.now() - start)
