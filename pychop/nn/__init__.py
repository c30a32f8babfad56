"""pychop.nn: video-UNet building blocks on pychop's ops.

- ``SerialSTBlock`` / ``ParallelSTBlock``: spatial-temporal self-attention, serial or Mobius-parallel.
- ``ResConvBlock``: residual convolution block with its temporal convolution in serial or parallel form.
- ``geglu``: the GEGLU activation, keeping only its input for backward.
"""

from pychop.nn.conv_blocks import CONV_MODES, ResConvBlock, TemporalConv
from pychop.nn.geglu import geglu
from pychop.nn.st_blocks import ST_MODES, AttentionBranch, ParallelSTBlock, SerialSTBlock, make_st_block

__all__ = ["SerialSTBlock", "ParallelSTBlock", "AttentionBranch", "make_st_block", "ST_MODES", "ResConvBlock",
           "TemporalConv", "CONV_MODES", "geglu"]
