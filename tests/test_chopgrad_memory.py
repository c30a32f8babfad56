"""Activation memory: bytes saved for backward and still alive, counted with saved-tensor hooks
(pychop.chopgrad.memory.SavedActivationMeter).

Under ChopGrad the peak stays flat as segments are added; under full backpropagation it grows linearly.
"""

import pytest
import torch

from pychop.chopgrad import scan, stream
from pychop.chopgrad.memory import SavedActivationMeter
from pychop.models import CausalDecoderConfig, CausalVideoDecoder
from tests.chopgrad_helpers import single_thread  # noqa: F401


def problem(segments):
    torch.manual_seed(0)
    decoder = CausalVideoDecoder(CausalDecoderConfig.tiny())
    z = [torch.randn(1, 4, 1, 4, 4) for _ in range(segments)]
    return decoder, z, lambda y, i: (y ** 2).mean()


def full_backprop(segments):
    decoder, z, loss_fn = problem(segments)

    def run():
        state, total = decoder.init_state(), 0
        for i, x in enumerate(z):
            state, y = decoder.step(state, x)
            total = total + loss_fn(y, i)
        total.backward()
    return SavedActivationMeter().measure(run)


def chopgrad(segments, window, strategy):
    decoder, z, loss_fn = problem(segments)
    return SavedActivationMeter().measure(
        lambda: stream(decoder.step, decoder.init_state(), z, loss_fn, window=window, strategy=strategy))


def chopgrad_scan(segments, window):
    decoder, z, loss_fn = problem(segments)

    def run():
        outputs = scan(decoder.step, decoder.init_state(), z, window=window)
        sum(loss_fn(y, i) for i, y in enumerate(outputs)).backward()
    return SavedActivationMeter().measure(run)


def test_full_backprop_grows_linearly():
    peaks = {n: full_backprop(n) for n in (3, 5, 9)}
    first, second = peaks[5] - peaks[3], peaks[9] - peaks[5]
    assert first > 0 and abs(second / first - 2.0) < 0.05, peaks


@pytest.mark.parametrize("strategy", ["recompute", "retain"])
@pytest.mark.parametrize("window", [1, 2])
def test_chopgrad_stays_flat(strategy, window):
    peaks = {n: chopgrad(n, window, strategy) for n in (3, 5, 9)}
    assert peaks[3] > 0 and peaks[9] == peaks[5], peaks
    assert peaks[9] < full_backprop(5) * 0.8, "a window of 1-2 segments must hold less than 5 segments"


def test_scan_backward_stays_flat():
    peaks = {n: chopgrad_scan(n, 2) for n in (3, 5, 9)}
    assert peaks[9] <= peaks[5] * 1.02, peaks


def test_meter_counts_each_saved_storage_once_and_no_parameters_or_buffers():
    """A frozen convolution saves its weight; a matrix product of y with its own transpose saves y twice (two
    views); a product with a buffer saves the buffer. Only the storages of h and y are activations."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1).requires_grad_(False)
    holder = torch.nn.Module()
    holder.register_buffer("scale", torch.randn(8))
    x = torch.randn(2, 4, 8, 8, requires_grad=True)

    def run():
        h = conv(x)                  # saves x (a leaf being differentiated) and the frozen weight
        y = torch.sin(h)             # saves h
        z = y @ y.transpose(-1, -2)  # saves y and a view of it
        (z * holder.scale).sum().backward()  # saves the buffer

    nbytes = x.numel() * x.element_size()  # h and y have x's shape
    meter = SavedActivationMeter(holder)
    assert meter.measure(run) == 2 * nbytes
    assert meter.live == 0  # all let go by the backward
    assert SavedActivationMeter().measure(run) == 2 * nbytes + holder.scale.numel() * 4  # the buffer, unnamed
