"""Convolutions whose parameters take no gradient, saving only what their input gradient needs.

torch's convolution saves its input and its weight for backward whatever ``requires_grad`` says, yet the input
gradient of ``y = conv(x, W) + b`` needs only ``W``: ``dx = conv_transpose(dy, W)``. ``FrozenConvolution``
saves the weight alone (a parameter, which is kept anyway) and computes ``dx`` as the transposed convolution
``F.conv_transpose{1,2,3}d`` (``torch.nn.grad.conv{1,2,3}d_input`` computes the same through torch's
convolution backward, slower on the CPU). Under autocast it convolves as ``F.conv{1,2,3}d`` does there, and its
backward casts the weight to the gradient's dtype again (the same values autocast's copy held) and returns the
input gradient in the input's dtype.

``lean_conv_forward`` is a ``_conv_forward(self, input, weight, bias)`` for an ``nn.Conv1d``/``Conv2d``/``Conv3d``
(which their ``forward`` calls, subclasses' too), bound to the instance, that uses it while the weight and bias
it is given take no gradient, and torch's otherwise. Other padding modes pad first, as torch does (a reflect or
replicate pad keeps its input); a ``"same"`` padding that would be uneven (an odd span
``dilation * (kernel - 1)``) is not supported (``is_leanable`` says no).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TORCH_CONV_FORWARDS = tuple(cls._conv_forward for cls in CONVOLUTIONS)
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


def is_leanable(conv: nn.Module) -> bool:
    """Whether ``lean_conv_forward`` can stand for ``conv``'s ``_conv_forward``: a torch convolution (or a
    subclass) whose ``_conv_forward`` is torch's own, not replaced on the instance, and not an uneven ``"same"``."""
    return (isinstance(conv, CONVOLUTIONS) and type(conv)._conv_forward in _TORCH_CONV_FORWARDS
            and "_conv_forward" not in conv.__dict__ and conv_padding(conv) is not None)


def lean_conv_forward(self, input, weight, bias):
    """The ``_conv_forward`` of a lean convolution ``self``, bound to it on the instance (see the module
    docstring): its class's own whenever the weight or the bias takes a gradient."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return type(self)._conv_forward(self, input, weight, bias)
    padding = conv_padding(self)
    if self.padding_mode != "zeros":
        input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        padding = (0,) * len(padding)
    return FrozenConvolution.apply(input, weight, bias, self.stride, padding, self.dilation, self.groups)
