"""The non-finite and extreme-value contract of the attention ops (docs/numerics.md), one test for every backend
that runs here (torch, cpp, triton in its interpreter) and the same test marked for the GPU backends.

1. Finite inputs and any finite scale give finite outputs and gradients (while the scaled scores stay within
   float32's range): a recomputed probability never exceeds 2, whatever the rounding.
2. A NaN or an inf anywhere in a query row makes that output row NaN.
3. A NaN in a key, or a NaN or an inf in a value, makes non-finite every output row that attends that key
   (for a value: that row's element of the same channel).
4. A non-finite input element (or output gradient element) never reaches the outputs or gradients of another
   (batch, head) pair: they are bit for bit those of the clean inputs.
"""

import math

import pytest
import torch

from tests.checks import runnable_backends

SHAPE = (2, 3, 4, 2, 4)  # (B, T, S, H, D): the poisoned element lives in batch 1, head 0
WHERE = (1, 1, 2, 0, 1)  # (b, t, s, h, d)
NAMES = ("q_s", "k_s", "v_s", "q_t", "k_t", "v_t")
BACKENDS = [pytest.param(name, "cpu", id=f"{name}-cpu") for name in runnable_backends("cpu")] + [
    pytest.param(name, "cuda", id=f"{name}-cuda", marks=pytest.mark.gpu) for name in ("torch", "triton", "cuda")]


def parallel_step(backend, device, inputs, dout, **options):
    """out and the six input gradients of the causal parallel op."""
    import pychop

    xs = [x.detach().to(device, copy=True).requires_grad_() for x in inputs]
    out = pychop.parallel_st_attention(*xs, temporal_causal=True, backend=backend, **options)
    out.backward(dout.to(device))
    return [t.detach().cpu() for t in (out, *(x.grad for x in xs))]


def fresh(seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=generator) for _ in range(6)], torch.randn(SHAPE, generator=generator)


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e4, 1e10, 1e20, 1e30, -1e30])
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_finite_inputs_give_finite_results_at_any_scale(backend, device, scale, seed):
    inputs, dout = fresh(seed)
    results = parallel_step(backend, device, inputs, dout, scale=scale)
    for name, result in zip(("out",) + tuple(f"d{n}" for n in NAMES), results):
        bad = (~torch.isfinite(result)).sum().item()
        assert bad == 0, f"{backend}: {bad} non-finite entries in {name} at scale {scale:g} (seed={seed})"
    expected = parallel_step("torch", "cpu", inputs, dout, scale=scale)[0]
    torch.testing.assert_close(results[0], expected, rtol=1e-4, atol=1e-4, msg=f"out at scale {scale:g}")


def reached_rows(name):
    """Index of the output entries that the rule of the poisoned input ``name`` makes non-finite (NaN for
    queries and NaN keys), or None where the contract promises nothing beyond containment (an inf in a key:
    its scores are infinite, whose weights IEEE arithmetic decides)."""
    b, t, s, h, d = WHERE
    if name.startswith("q"):
        return (b, t, s, h), True
    frames = slice(t, None)  # causal: query frames t' >= t attend key frame t
    rows = (b, t, slice(None), h) if name.endswith("_s") else (b, frames, s, h)
    if name.startswith("v"):
        return (*rows, d), False
    return rows, True


def other_pairs(tensor):
    """The entries of a (B, T, S, H, D) result outside batch WHERE[0] and head WHERE[3], flattened."""
    keep = torch.ones(SHAPE, dtype=torch.bool)
    keep[WHERE[0], :, :, WHERE[3]] = False
    return tensor[keep]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", NAMES + ("dout",))
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_a_non_finite_element_poisons_its_rows_and_stays_in_its_batch_and_head(backend, device, name, value, seed):
    inputs, dout = fresh(seed)
    for key in (inputs[1], inputs[4]):  # every score of a query row with an infinite element is infinite, of one sign
        key[..., WHERE[4]].abs_()
    clean = parallel_step(backend, device, inputs, dout)
    poisoned_inputs, poisoned_dout = [x.clone() for x in inputs], dout.clone()
    (poisoned_dout if name == "dout" else poisoned_inputs[NAMES.index(name)])[WHERE] = value
    results = parallel_step(backend, device, poisoned_inputs, poisoned_dout)
    context = f"{backend}: {value} in {name} at {WHERE} (seed={seed})"
    for what, result, reference in zip(("out",) + tuple(f"d{n}" for n in NAMES), results, clean):
        assert torch.equal(other_pairs(result), other_pairs(reference)), f"{what} changed outside (b, h): {context}"
    if name == "dout" or (name.startswith("k") and not math.isnan(value)):
        return  # a non-finite output gradient, or an inf in a key (IEEE weighs its scores): containment only
    rows, nan = reached_rows(name)
    reached = results[0][rows]
    assert (reached.isnan() if nan else ~torch.isfinite(reached)).all(), f"out{rows} not all poisoned: {context}"
