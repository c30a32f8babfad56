"""Limits every backend of pychop's attention shares. Imports nothing, so any layer may import it.

``MAX_HEAD_DIM`` is the largest head dim D the kernels take; the extension's copy (``csrc/attention/params.h``,
exposed as ``pychop._C.MAX_HEAD_DIM``) must agree, which tests/test_validation.py checks.
"""

MAX_HEAD_DIM = 256
