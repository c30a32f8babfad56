"""Autocast (mixed-precision training): the ops compute in autocast's dtype on every backend, as
scaled_dot_product_attention does, and the parallel VideoUNet trains under it within the serial form's error.
The blocks' and the fused projection's autocast tests are in test_nn_blocks.py."""

import pytest
import torch

from pychop.models import TINY, VideoUNet
from tests.checks import input_count, make_inputs, op_call, relative_error, runnable_backends

OPS = [("parallel", dict(causal=True, grad_window=1)), ("stacked", {}), ("spatial", {}), ("temporal", {})]


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("op,options", OPS, ids=[op for op, _ in OPS])
def test_ops_under_autocast_compute_in_its_dtype(backend, op, options, seed):
    """float32 inputs under bfloat16 autocast give exactly what bfloat16 copies of them give without it, with
    float32 gradients that are those of the copies."""
    inputs = make_inputs((1, 3, 10, 2, 8), torch.float32, "cpu", input_count(op), packed=True)
    copies = [x.detach().bfloat16().requires_grad_() for x in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op_call(op, inputs, backend=backend, **options)
    expected = op_call(op, copies, backend=backend, **options)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    expected_grads = torch.autograd.grad(expected, copies, dout)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected_grad.float(), rtol=0, atol=0)


def unet_step(model, inputs, autocast):
    """Output and the trainable parameters' gradients of one training step's forward and backward."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(*inputs)
    out.float().square().mean().backward()
    return [out.detach().double()] + [p.grad.double() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("backend", runnable_backends(interpreted=False))
def test_parallel_unet_trains_under_autocast_as_accurately_as_the_serial_form(backend, seed):
    """Temporal fine-tuning under bfloat16 autocast: against each form's float32 run, the parallel form's
    output and temporal gradients err at most 3x what the serial form's do (plus a floor)."""
    serial = VideoUNet(TINY, "serial").freeze_spatial()
    parallel = VideoUNet(TINY, "parallel", backend=backend)
    parallel.load_state_dict(serial.state_dict())
    parallel.freeze_spatial()
    inputs = serial.example_inputs()
    serial_error = [relative_error(a, r) for a, r in zip(unet_step(serial, inputs, True),
                                                          unet_step(serial, inputs, False))]
    parallel_error = [relative_error(a, r) for a, r in zip(unet_step(parallel, inputs, True),
                                                            unet_step(parallel, inputs, False))]
    assert len(parallel_error) == len(serial_error) > 1
    for index, (error, base) in enumerate(zip(parallel_error, serial_error)):
        assert error <= 3 * base + 1e-3, f"output/gradient {index}: {error:.3g} vs serial {base:.3g} (seed {seed})"
