"""pychop inside diffusers models.

- ``motion``: ``patch_temporal_attention(model)`` runs the temporal self-attention of motion modules and
  temporal transformers through ``pychop.temporal_attention``; ``.remove()`` undoes it.
- ``mobius``: ``convert_to_parallel(unet)`` rewires a ``UNetMotionModel``'s spatial transformer + motion
  module pairs into the parallel Mobius form for fine-tuning; ``.revert()`` undoes it.

Submodules import diffusers; this package does not.
"""
