"""pychop.ops: the fused operators, each a thin autograd Function over its backends' kernels."""

from pychop.ops.attention import parallel_st_attention, spatial_attention, temporal_attention
from pychop.ops.backends import BACKENDS, BackendUnavailable, available

__all__ = ["parallel_st_attention", "spatial_attention", "temporal_attention", "BACKENDS",
           "BackendUnavailable", "available"]
