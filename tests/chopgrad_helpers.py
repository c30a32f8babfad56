"""Shared pieces of the ChopGrad tests: a toy recurrence and an independent truncated-BPTT reference."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """The ChopGrad tests run small models: one intra-op thread is as fast and far steadier on a shared
    CPU (imported by the test modules that use it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ToyRecurrence(torch.nn.Module):
    """h' = tanh(W h + U x + c * m), y = V h' + h (m: a carried memory tensor); the state mixes tensors,
    None and a marker string, like diffusers' caches."""

    def __init__(self, width=6, dtype=torch.float64):
        super().__init__()
        self.w = torch.nn.Linear(width, width, dtype=dtype)
        self.u = torch.nn.Linear(width, width, bias=False, dtype=dtype)
        self.v = torch.nn.Linear(width, width, dtype=dtype)
        self.c = torch.nn.Parameter(torch.randn(width, dtype=dtype))

    def init_state(self, batch, width=6, dtype=torch.float64):
        return {"h": torch.zeros(batch, width, dtype=dtype), "cache": [None, "Rep"], "memory": None}

    def step(self, state, x):
        memory = state["memory"] if state["memory"] is not None else torch.zeros_like(x)
        h = torch.tanh(self.w(state["h"]) + self.u(x) + self.c * memory)
        y = self.v(h) + state["h"]
        return {"h": h, "cache": [h[:, :2].clone(), "Rep"], "memory": 0.5 * memory + x}, y


def truncated_reference(step, state, segments, loss_fn, window):
    """Per loss i: run from the start with no graph up to segment max(0, i-window+1), then with grad to i,
    backpropagate loss i. The plainest reading of the rule; slow (quadratic) and independent of pychop."""
    total = 0.0
    for i in range(len(segments)):
        start = max(0, i - window + 1)
        carried = state
        with torch.no_grad():
            for j in range(start):
                carried, _ = step(carried, segments[j])
        for j in range(start, i + 1):
            carried, y = step(carried, segments[j])
        loss = loss_fn(y, i)
        loss.backward(retain_graph=True)  # the segments may hang off an upstream graph
        total += loss.item()
    return total


def take_grads(tensors):
    """The .grad of each tensor (zeros where None), cloned, and the .grad fields cleared."""
    grads = [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in tensors]
    for t in tensors:
        t.grad = None
    return grads


def max_relative_difference(actual, expected):
    return max(((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() for a, e in zip(actual, expected))


def cosine(first, second):
    a = torch.cat([g.flatten().double() for g in first])
    b = torch.cat([g.flatten().double() for g in second])
    return (a @ b / (a.norm() * b.norm())).item()
