"""pychop.models: reference models built on pychop.nn."""

from pychop.models.video_unet import SD15_VIDEO, TINY, VideoUNet, VideoUNetConfig

__all__ = ["VideoUNet", "VideoUNetConfig", "TINY", "SD15_VIDEO"]
