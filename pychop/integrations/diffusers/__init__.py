"""diffusers adapters (needs ``pip install pychop[diffusers]``)."""

from pychop.integrations.diffusers.wan import WanDecoderRecurrence

__all__ = ["WanDecoderRecurrence"]
