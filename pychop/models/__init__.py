"""pychop.models: reference models built on pychop.nn and pychop.ops.

- ``VideoUNet`` (configs ``TINY``, ``SD15_VIDEO``): a text-to-video 3D UNet whose spatial-temporal blocks run
  in ``"serial"`` or ``"parallel"`` (Mobius) form, with ``freeze_spatial()`` for temporal fine-tuning.
- ``CausalVideoDecoder`` (``CausalDecoderConfig.tiny()`` / ``.wan()``): a Wan-style causal video decoder with a
  feature cache, exposing ``init_state`` and ``step`` for ChopGrad.
"""

from pychop.models.causal_decoder import CausalDecoderConfig, CausalVideoDecoder
from pychop.models.video_unet import SD15_VIDEO, TINY, VideoUNet, VideoUNetConfig

__all__ = ["VideoUNet", "VideoUNetConfig", "TINY", "SD15_VIDEO", "CausalVideoDecoder", "CausalDecoderConfig"]
