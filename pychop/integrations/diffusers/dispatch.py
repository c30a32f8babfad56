"""Which diffusers models ``convert_to_parallel`` understands, decided before it changes anything.

A UNet is understood when every module holding a spatial and a temporal module list side by side (the pairs
of ``mobius.PAIRED_MODULE_LISTS``) is one of the blocks ``mobius`` was written for (``UNDERSTOOD_BLOCKS``); a
``LatteTransformer3DModel`` goes to ``latte``. Anything else with such lists (another model's blocks, a Latte
model inside a larger one) is refused with an error that names it: its pairs may mean something else (Latte's
spatial and temporal blocks see differently grouped tokens), and rewiring them would break its forward.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn as nn
from diffusers import LatteTransformer3DModel
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel
from diffusers.models.unets.unet_3d_blocks import CrossAttnDownBlock3D, CrossAttnUpBlock3D, UNetMidBlock3DCrossAttn
from diffusers.models.unets.unet_motion_model import (
    CrossAttnDownBlockMotion,
    CrossAttnUpBlockMotion,
    UNetMidBlockCrossAttnMotion,
)

from pychop.integrations.diffusers.latte import convert_latte_to_parallel
from pychop.integrations.diffusers.mobius import PAIRED_MODULE_LISTS

UNDERSTOOD_BLOCKS = (CrossAttnDownBlockMotion, CrossAttnUpBlockMotion, UNetMidBlockCrossAttnMotion,
                     CrossAttnDownBlock3D, CrossAttnUpBlock3D, UNetMidBlock3DCrossAttn,
                     TransformerSpatioTemporalModel)


def special_converter(model: nn.Module) -> Optional[Callable]:
    """The converter of a model with its own (``convert_latte_to_parallel`` for Latte), None for a UNet that
    ``mobius`` understands; raises ``ValueError`` naming the first module it does not understand."""
    if isinstance(model, LatteTransformer3DModel):
        return convert_latte_to_parallel
    for name, block in model.named_modules():
        paired = any(isinstance(getattr(block, spatial, None), nn.ModuleList)
                     and isinstance(getattr(block, temporal, None), nn.ModuleList)
                     for spatial, temporal in PAIRED_MODULE_LISTS)
        if paired and not isinstance(block, UNDERSTOOD_BLOCKS):
            where = f" (at {name!r})" if name else ""
            raise ValueError(f"convert_to_parallel does not understand {type(block).__name__}{where}: it converts "
                             "UNetMotionModel, UNet3DConditionModel, UNetSpatioTemporalConditionModel and "
                             "LatteTransformer3DModel (passed itself), and changed nothing")
    return None
