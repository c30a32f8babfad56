"""Convolutions whose parameters take no gradient, saving only what their input gradient needs.

torch's convolution saves its input and its weight for backward whatever ``requires_grad`` says, yet the input
gradient of ``y = conv(x, W) + b`` needs only ``W``: ``dx = conv_transpose(dy, W)``. ``FrozenConvolution``
saves the weight alone (a parameter, which is kept anyway) and computes ``dx`` as the transposed convolution
``F.conv_transpose{1,2,3}d`` (``torch.nn.grad.conv{1,2,3}d_input`` computes the same through torch's
convolution backward, slower on the CPU). Under autocast it convolves as ``F.conv{1,2,3}d`` does there, and its
backward casts the weight to the gradient's dtype again (the same values autocast's copy held) and returns the
input gradient in the input's dtype.

``lean_conv_forward(conv)`` is the ``_conv_forward`` of an ``nn.Conv1d``/``Conv2d``/``Conv3d`` (which their
``forward`` calls, subclasses' too) that uses it while the weight and bias it is given take no gradient, and
the original otherwise. Other padding modes pad first, as torch does; a ``"same"`` padding that would be
uneven (an even span ``dilation * (kernel - 1)``) is not supported (``conv_padding`` returns None).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FORWARD = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class FrozenConvolution(torch.autograd.Function):
    """``F.conv{n}d(x, weight, bias, stride, padding, dilation, groups)`` differentiable in ``x`` only."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        dims = weight.dim() - 2
        ctx.save_for_backward(weight)
        ctx.options = (stride, padding, dilation, groups)
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        return _FORWARD[dims](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        weight, = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            stride, padding, dilation, groups = ctx.options
            # The transposed convolution's output size, less output_padding, is (out - 1) * s - 2p + d(k - 1) + 1.
            output_padding = [size - ((out - 1) * s - 2 * p + d * (k - 1) + 1) for size, out, s, p, d, k in zip(
                ctx.input_shape[2:], grad_out.shape[2:], stride, padding, dilation, weight.shape[2:])]
            grad_x = _TRANSPOSED[weight.dim() - 2](grad_out, weight.to(grad_out.dtype), None, stride, padding,
                                                   output_padding, groups, dilation).to(ctx.input_dtype)
        return grad_x, None, None, None, None, None, None


def conv_padding(conv: nn.Module) -> Optional[Tuple[int, ...]]:
    """The padding of ``conv`` as integers per spatial dimension, or None for an uneven ``"same"``."""
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        spans = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return None if any(span % 2 for span in spans) else tuple(span // 2 for span in spans)
    return tuple(conv.padding)


def lean_conv_forward(conv: nn.Module, original: Callable) -> Callable:
    """A ``_conv_forward(input, weight, bias)`` for ``conv`` (see the module docstring); ``original`` is the one
    it replaces, used whenever the weight or the bias takes a gradient."""
    padding = conv_padding(conv)
    if padding is None:
        raise ValueError(f"{type(conv).__name__} with an uneven 'same' padding is not supported")
    pads_first = conv.padding_mode != "zeros"
    if pads_first:
        padding = (0,) * len(padding)

    def _conv_forward(input, weight, bias):
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return original(input, weight, bias)
        if pads_first:
            input = F.pad(input, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return FrozenConvolution.apply(input, weight, bias, conv.stride, padding, conv.dilation, conv.groups)
    return _conv_forward
