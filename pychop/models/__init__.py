"""Reference models: the causal video decoder (ChopGrad's recurrence)."""

from pychop.models.causal_decoder import CausalDecoderConfig, CausalVideoDecoder

__all__ = ["CausalVideoDecoder", "CausalDecoderConfig"]
