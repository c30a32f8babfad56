"""How many times the Triton kernels read each input element from global memory, counted in Triton's interpreter.

The temporal branch is memory-bound: its kernels must read every temporal input element a bounded number of times
whatever the number of frames T (one block of frames holds a token's whole T x T attention), where a per-frame
loop reads each key and value once per query frame that attends to it ((T + 1) / 2 times causal). The spatial
kernels are FlashAttention's: keys and values once per query block, queries and output gradients once per key
block. Loads are counted per element address, masked-off lanes excluded.
"""

import math
import os

import numpy as np
import pytest
import torch

from tests.checks import make_inputs

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts loads in the interpreter")


class LoadCounter:
    """Records the address of every element a kernel loads while active; counts(x) gives, per element of x, the
    number of loads."""

    def __init__(self, monkeypatch):
        from triton.runtime import interpreter

        self.addresses = []
        load = interpreter.InterpreterBuilder.create_masked_load

        def counting_load(builder, ptrs, mask, *args):
            self.addresses.append(ptrs.data[mask.data].astype(np.uint64).ravel())
            return load(builder, ptrs, mask, *args)

        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", counting_load)

    def counts(self, x: torch.Tensor) -> torch.Tensor:
        loaded, times = np.unique(np.concatenate(self.addresses), return_counts=True)
        offsets = torch.zeros(x.shape, dtype=torch.int64)
        for dim, (size, stride) in enumerate(zip(x.shape, x.stride())):
            shape = [1] * x.dim()
            shape[dim] = size
            offsets = offsets + (torch.arange(size) * stride).view(shape)
        addresses = (x.data_ptr() + offsets * x.element_size()).numpy().astype(np.uint64)
        where = np.searchsorted(loaded, addresses).clip(max=len(loaded) - 1)
        return torch.from_numpy(np.where(loaded[where] == addresses, times[where], 0))


def temporal_load_counts(monkeypatch, frames, options):
    """Per-element load counts of the temporal kernels at T = `frames`: {name: (smallest, largest)}."""
    from pychop.kernels.temporal_attention import temporal_backward, temporal_forward

    q, k, v = (x.detach() for x in make_inputs((1, frames, 32, 1, 16), torch.float32, "cpu", 3))
    out = torch.empty_like(q)
    dout = torch.randn_like(q)
    counter = LoadCounter(monkeypatch)
    lse = temporal_forward(q, k, v, out, scale=0.25, **options)
    forward = {name: counter.counts(x) for name, x in (("q", q), ("k", k), ("v", v))}
    counter.addresses.clear()
    *_, delta = temporal_backward(dout, q, k, v, lse, scale=0.25, grad_window=None, **options)
    backward = {name: counter.counts(x) for name, x in (("q", q), ("k", k), ("v", v), ("dout", dout),
                                                        ("lse", lse), ("delta", delta))}
    return ({name: (c.min().item(), c.max().item()) for name, c in forward.items()},
            {name: (c.min().item(), c.max().item()) for name, c in backward.items()})


@pytest.mark.parametrize("options", [dict(causal=False, window=None), dict(causal=True, window=None),
                                     dict(causal=True, window=3)], ids=["none", "causal", "window3"])
def test_temporal_reads_flat_in_frames(monkeypatch, options):
    """Every element of q_t, k_t, v_t is read once by the forward; q_t, k_t, v_t, dout and lse twice by the
    backward (its query kernel and its key kernel), delta once: the same at T = 4 and T = 16."""
    counts = {frames: temporal_load_counts(monkeypatch, frames, options) for frames in (4, 16)}
    expected_forward = {"q": (1, 1), "k": (1, 1), "v": (1, 1)}
    expected_backward = {"q": (2, 2), "k": (2, 2), "v": (2, 2), "dout": (2, 2), "lse": (2, 2), "delta": (1, 1)}
    for frames, (forward, backward) in counts.items():
        assert forward == expected_forward, f"T = {frames}: forward loads per element {forward}"
        assert backward == expected_backward, f"T = {frames}: backward loads per element {backward}"


@pytest.mark.slow  # T past one block of frames in the interpreter: seconds
def test_temporal_reads_beyond_one_block_of_frames(monkeypatch):
    """Past one block of frames (16 in the interpreter; on a GPU 64 for 16-bit inputs up to D = 128, 16 or 32
    otherwise) reads grow with the number of blocks, as
    FlashAttention's grow with the number of query blocks: at T = 17, two blocks, at most twice per block."""
    forward, backward = temporal_load_counts(monkeypatch, 17, dict(causal=False, window=None))
    blocks = 2
    assert forward["q"] == (1, 1) and forward["k"][1] == forward["v"][1] == blocks
    # the query kernel reads keys in two passes (delta, then dq) once delta needs more than one block
    assert backward["k"][1] == backward["v"][1] == 2 * blocks + 1
    assert backward["q"][1] == backward["dout"][1] == backward["lse"][1] == 1 + blocks


def test_spatial_reads_are_flash_attention_ones(monkeypatch):
    """Forward: q_s once, k_s and v_s once per query block. Backward: the query kernel reads q_s and dout once and
    k_s, v_s once per query block; the key kernel k_s, v_s once and q_s, dout once per key block."""
    from pychop.kernels.spatial_attention import configs, spatial_backward, spatial_forward

    S = 40
    q, k, v = (x.detach() for x in make_inputs((1, 2, S, 1, 16), torch.float32, "cpu", 3))
    out, dout = torch.empty_like(q), torch.randn_like(q)
    forward_config, query_config, key_config = configs(16, torch.float32, "interpreter")
    counter = LoadCounter(monkeypatch)
    lse = spatial_forward(q, k, v, out, scale=0.25, add_to_out=False)
    forward = {name: counter.counts(x).max().item() for name, x in (("q", q), ("k", k), ("v", v))}
    assert forward == {"q": 1, "k": math.ceil(S / forward_config.block_m), "v": math.ceil(S / forward_config.block_m)}
    counter.addresses.clear()
    spatial_backward(dout, q, k, v, out, lse, scale=0.25, delta_t=None)
    query_blocks, key_blocks = math.ceil(S / query_config.block_m), math.ceil(S / key_config.block_n)
    backward = {name: counter.counts(x).max().item() for name, x in (("q", q), ("k", k), ("v", v), ("dout", dout))}
    assert backward == {"q": 1 + key_blocks, "k": query_blocks + 1, "v": query_blocks + 1, "dout": 1 + key_blocks}
