"""Activation memory: bytes saved for backward and still alive, counted with saved-tensor hooks
(pychop.chopgrad.memory.SavedActivationMeter).

Under ChopGrad the peak stays flat as segments are added; under full backpropagation it grows linearly.
"""

import pytest
import torch

from pychop.chopgrad import scan, stream
from pychop.chopgrad.memory import SavedActivationMeter
from tests.chopgrad_helpers import single_thread  # noqa: F401
from pychop.models import CausalDecoderConfig, CausalVideoDecoder


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
