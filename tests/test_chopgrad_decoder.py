"""ChopGrad through the reference causal decoder: exact forward, full window = full backprop, truncation."""

import pytest
import torch

from pychop.chopgrad import scan, stream
from pychop.models import CausalDecoderConfig, CausalVideoDecoder
from tests.chopgrad_helpers import cosine, max_relative_difference, single_thread, take_grads, truncated_reference  # noqa: F401

SEGMENTS = 5
FRAMES = [1] + [4] * (SEGMENTS - 1)


def make_problem(dtype=torch.float32):
    decoder = CausalVideoDecoder(CausalDecoderConfig.tiny()).to(dtype)
    z = torch.randn(1, 4, SEGMENTS, 4, 4, dtype=dtype)
    target = torch.randn(1, 3, sum(FRAMES), 16, 16, dtype=dtype)
    return decoder, z, target


def segment_loss(target):
    targets = target.split(FRAMES, dim=2)
    return lambda y, i: ((y - targets[i]) ** 2).mean()


def full_backprop(decoder, z, target):
    """Whole-clip forward (the independent implementation), every segment's loss, one backward."""
    z = z.detach().requires_grad_()
    loss_fn = segment_loss(target)
    video = decoder(z)
    sum(loss_fn(y, i) for i, y in enumerate(video.split(FRAMES, dim=2))).backward()
    return take_grads(list(decoder.parameters())) + [z.grad]


def chopgrad(decoder, z, target, window, strategy="recompute"):
    segments = [s.detach().requires_grad_() for s in z.split(1, dim=2)]
    loss, outputs = stream(decoder.step, decoder.init_state(), segments, segment_loss(target), window=window,
                           strategy=strategy, return_outputs=True)
    grads = take_grads(list(decoder.parameters())) + [torch.cat([s.grad for s in segments], dim=2)]
    return loss, torch.cat(outputs, dim=2), grads


@pytest.mark.parametrize("strategy", ["recompute", "retain"])
def test_forward_equals_plain_decode(seed, strategy):
    decoder, z, target = make_problem()
    _, video, _ = chopgrad(decoder, z, target, window=2, strategy=strategy)
    with torch.no_grad():
        plain = decoder(z)
    torch.testing.assert_close(video, plain, rtol=2e-6, atol=2e-6, msg=f"seed={seed}")


@pytest.mark.parametrize("strategy", ["recompute", "retain"])
def test_full_window_is_full_backprop_to_fp32_rounding(seed, strategy):
    decoder, z, target = make_problem()
    reference = full_backprop(decoder.double(), z.double(), target.double())
    decoder.float()
    baseline = full_backprop(decoder, z, target)
    _, _, actual = chopgrad(decoder, z, target, window=SEGMENTS, strategy=strategy)
    base_error = max_relative_difference(baseline, reference)
    error = max_relative_difference(actual, reference)
    assert error <= 3 * base_error + 2e-5, f"error {error:.3g} vs full backprop's {base_error:.3g}, seed={seed}"


def test_scan_full_window_is_full_backprop(seed):
    decoder, z, target = make_problem(torch.float64)
    expected = full_backprop(decoder, z, target)
    z_leaf = z.detach().requires_grad_()
    outputs = scan(decoder.step, decoder.init_state(), list(z_leaf.split(1, dim=2)), window=SEGMENTS)
    loss_fn = segment_loss(target)
    sum(loss_fn(y, i) for i, y in enumerate(outputs)).backward()
    actual = take_grads(list(decoder.parameters())) + [z_leaf.grad]
    assert max_relative_difference(actual, expected) < 1e-10, f"seed={seed}"


def test_strategies_match_truncated_reference_in_float64(seed):
    decoder, z, target = make_problem(torch.float64)
    params = list(decoder.parameters())
    segments = [s.detach().requires_grad_() for s in z.split(1, dim=2)]
    truncated_reference(decoder.step, decoder.init_state(), segments, segment_loss(target), 2)
    expected = take_grads(params + segments)
    for strategy in ("recompute", "retain"):
        stream(decoder.step, decoder.init_state(), segments, segment_loss(target), window=2, strategy=strategy)
        actual = take_grads(params + segments)
        assert max_relative_difference(actual, expected) < 1e-10, f"{strategy} seed={seed}"


def test_cosine_to_full_gradient_rises_with_window():
    torch.manual_seed(0)  # a statistical property: fixed seed (it holds for every seed tried)
    decoder, z, target = make_problem(torch.float64)
    full = chopgrad(decoder, z, target, window=SEGMENTS)[2]
    similarities = []
    for window in (1, 2, 3):
        grads = chopgrad(decoder, z, target, window=window)[2]
        similarities.append((cosine(grads[:-1], full[:-1]), cosine(grads[-1:], full[-1:])))
    for kind, values in (("parameters", [s[0] for s in similarities]), ("latents", [s[1] for s in similarities])):
        assert values[0] < values[1] < values[2] < 1 - 1e-6, f"{kind}: {values}"
