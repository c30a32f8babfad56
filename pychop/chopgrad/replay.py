"""Recomputing a segment exactly as it first ran: its random-number and autocast state, replayed.

A step may draw random numbers (dropout, noise) and may run under autocast. ``stream``'s recompute strategy
runs segment j once per loss whose window holds it, and ``scan``'s backward runs it again after the forward,
perhaps outside the forward's autocast. ``SegmentReplay`` records, on a segment's first run, the RNG state of
the CPU and of the given CUDA devices and the autocast state, and runs every later call of that segment
from them (the global RNG state is restored afterwards), as ``torch.utils.checkpoint`` does for its
recomputation: every recomputed value is then the forward's. Like it, it replays the default generators
only: a ``torch.Generator`` the step passes explicitly draws anew.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

from pychop import autocast_state


class RunState:
    """The RNG state of the CPU and of the CUDA devices ``devices`` (indices) and the autocast state, captured
    when made; ``restored()`` runs its body from them and puts the global RNG state back afterwards."""

    def __init__(self, devices: Sequence[int]):
        self.devices = list(devices)
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(device) for device in self.devices]
        self.autocast = autocast_state.current()

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices), autocast_state.restored(self.autocast):
            torch.set_rng_state(self.cpu)
            for device, cuda_state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(cuda_state, device)
            yield


class SegmentReplay:
    """Wraps ``call(state, x, j)``. ``devices``: indices of the CUDA devices whose RNG the step may draw from.
    ``keep``: how many of the latest segments can be run again (None: all); older records are dropped."""

    def __init__(self, call: Callable[[Any, torch.Tensor, int], Tuple[Any, Any]], devices: Sequence[int],
                 keep: Optional[int] = None):
        self.call, self.devices, self.keep = call, list(devices), keep
        self.first_runs: Dict[int, RunState] = {}

    def __call__(self, state: Any, x: torch.Tensor, j: int) -> Tuple[Any, Any]:
        if j not in self.first_runs:
            self.first_runs[j] = RunState(self.devices)
            if self.keep is not None:
                self.first_runs.pop(j - self.keep, None)
            return self.call(state, x, j)
        with self.first_runs[j].restored():
            return self.call(state, x, j)


def cuda_devices(tensors: Sequence[torch.Tensor]) -> list:
    """The indices of the CUDA devices the tensors live on, sorted."""
    return sorted({t.device.index for t in tensors if t.is_cuda})
