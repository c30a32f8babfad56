"""pychop.kernels: the Triton kernels (and their launchers) of pychop.

This package is the lowest layer: it knows nothing of autograd or of the rest of pychop. Importing it
never imports Triton; each kernel module does, so a machine without Triton still imports pychop.
"""
