"""The diffusers parts of ``pychop.memory.lean_frozen``: GEGLU and cross-attention with text shared by frames.

- ``lean_geglu_forward``: the forward of a diffusers ``GEGLU`` (projection, then
  ``hidden * gelu(gate)``) with the activation through ``pychop.nn.geglu``, which keeps only the projection
  for backward and computes ``gelu(gate)`` again there.
- ``FoldedCrossAttention(processor, rows)``: wraps the attention processor of a cross-attention module.
  Diffusers' video pipelines give every frame its own copy of the prompt (``encoder_hidden_states`` of shape
  (B*T, L, D), each video's text repeated T times), so every frame computes and saves the same keys and
  values. When the text rows come in runs of r equal rows, the r frames of a run become one query sequence
  of r*S tokens attending to one copy: the same function (softmax runs over the keys, per query row), keys and
  values computed and saved once per run. Rows that differ are left as they are. Whether rows repeat is read
  from the data (exact equality, one comparison and device sync per text tensor, remembered for the next
  modules that get the same tensor in one forward); under ``torch.compile`` the text is taken as it comes (no
  fold), so that nothing breaks the graph.

Folding applies to modules whose processor is one known to compute each query row from that row alone
(``AttnProcessor2_0``, ``AttnProcessor``; not their subclasses) and that have no group norm or spatial norm over
the tokens, on 3-dimensional hidden states without an attention mask; any other call goes to the wrapped
processor unchanged.
"""

from __future__ import annotations

import math
import weakref

import torch
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.utils import is_torch_npu_available

from pychop.nn import geglu

ROW_WISE_PROCESSORS = (AttnProcessor2_0, AttnProcessor)


def is_geglu(module) -> bool:
    """A diffusers GEGLU computing ``hidden * gelu(gate)`` (on an NPU it calls a tanh-approximate kernel), its
    forward not replaced on the instance."""
    return isinstance(module, GEGLU) and "forward" not in module.__dict__ and not is_torch_npu_available()


def lean_geglu_forward(self: GEGLU, hidden_states, *args, **kwargs):
    """The forward of a lean GEGLU ``self``, bound to it on the instance."""
    if args or kwargs:  # diffusers' deprecated `scale` argument: its own forward warns about it
        return type(self).forward(self, hidden_states, *args, **kwargs)
    return geglu(self.proj(hidden_states))


def is_foldable_cross_attention(module) -> bool:
    return (isinstance(module, Attention) and module.is_cross_attention
            and type(module.processor) in ROW_WISE_PROCESSORS and module.group_norm is None
            and module.spatial_norm is None)


def repeated_rows(context: torch.Tensor) -> int:
    """The largest r such that ``context``'s rows (first dimension) come in consecutive blocks of r equal rows."""
    rows = context.shape[0]
    if rows < 2:
        return 1
    same = (context[1:] == context[:-1]).flatten(1).all(dim=1)
    boundaries = [0, *((~same).nonzero().flatten() + 1).tolist(), rows]
    return math.gcd(*(end - start for start, end in zip(boundaries, boundaries[1:])))


class RepeatedRows:
    """``repeated_rows`` of the latest text tensor, remembered while that very tensor lives unchanged (every
    cross-attention of a UNet gets the same one in a forward) and until ``forget`` is called, which
    ``lean_frozen`` does before every forward of the module it changed: a text buffer rewritten through
    ``.data`` (which no version counter sees) between forwards is read again. Pickled empty."""

    def __init__(self):
        self._latest, self._version, self._runs = None, None, 1

    def __reduce__(self):
        return type(self), ()

    def forget(self, *_hook_args) -> None:
        """Drop the remembered tensor (a forward pre-hook: takes and ignores the module and its inputs)."""
        self._latest = None

    def __call__(self, context: torch.Tensor) -> int:
        if self._latest is None or self._latest() is not context or self._version != context._version:
            self._runs = repeated_rows(context)
            self._latest, self._version = weakref.ref(context), context._version
        return self._runs


class FoldedCrossAttention:
    """A processor that folds frames sharing their text (see the module docstring) and calls ``processor``."""

    def __init__(self, processor, rows: RepeatedRows):
        self.processor, self.rows = processor, rows

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        runs = 1
        if (encoder_hidden_states is not None and attention_mask is None and hidden_states.dim() == 3
                and encoder_hidden_states.dim() == 3 and encoder_hidden_states.shape[0] == hidden_states.shape[0]
                and not torch.compiler.is_compiling()):
            runs = self.rows(encoder_hidden_states)
        if runs == 1:
            return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        frames, length, channels = hidden_states.shape
        out = self.processor(attn, hidden_states.reshape(frames // runs, runs * length, channels),
                             encoder_hidden_states[::runs], None, temb, *args, **kwargs)
        return out.reshape(frames, length, out.shape[-1])
