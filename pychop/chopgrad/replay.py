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

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from pychop import autocast_state


class SegmentReplay:
    """Wraps ``call(state, x, j)``. ``devices``: indices of the CUDA devices whose RNG the step may draw from.
    ``keep``: how many of the latest segments can be run again (None: all); older records are dropped."""

    def __init__(self, call: Callable[[Any, torch.Tensor, int], Tuple[Any, Any]], devices: Sequence[int],
                 keep: Optional[int] = None):
        self.call, self.devices, self.keep = call, list(devices), keep
        self.first_runs: Dict[int, tuple] = {}

    def __call__(self, state: Any, x: torch.Tensor, j: int) -> Tuple[Any, Any]:
        if j not in self.first_runs:
            cuda_states = [torch.cuda.get_rng_state(device) for device in self.devices]
            self.first_runs[j] = (torch.get_rng_state(), cuda_states, autocast_state.current())
            if self.keep is not None:
                self.first_runs.pop(j - self.keep, None)
            return self.call(state, x, j)
        cpu_state, cuda_states, autocast = self.first_runs[j]
        with torch.random.fork_rng(devices=self.devices), autocast_state.restored(autocast):
            torch.set_rng_state(cpu_state)
            for device, cuda_state in zip(self.devices, cuda_states):
                torch.cuda.set_rng_state(cuda_state, device)
            return self.call(state, x, j)


def cuda_devices(tensors: Sequence[torch.Tensor]) -> list:
    """The indices of the CUDA devices the tensors live on, sorted."""
    return sorted({t.device.index for t in tensors if t.is_cuda})
