"""pychop.ops: the fused operators, each a thin autograd Function: the attention ops over their backends' kernels,
``layer_norm_packed_linear`` (LayerNorm fused with a packed projection of separately trainable blocks) over torch's.
"""

from pychop.ops.attention import parallel_st_attention, spatial_attention, temporal_attention
from pychop.ops.backends import BACKENDS, BackendUnavailable, available
from pychop.ops.layer_norm_linear import layer_norm_packed_linear

__all__ = ["parallel_st_attention", "spatial_attention", "temporal_attention", "layer_norm_packed_linear",
           "BACKENDS", "BackendUnavailable", "available"]
