# examples/quickstart.py
import torch

import pychop
from pychop.chopgrad import stream
from pychop.models import CausalDecoderConfig, CausalVideoDecoder

# Mobius: spatial + temporal attention in one fused op, on views of a packed projection (no copies)
qkv = torch.randn(1, 8, 64, 6, 2, 32, requires_grad=True)  # batch, frames, tokens, 6 (q k v x 2), heads, head dim
out = pychop.parallel_st_attention(*qkv.unbind(3), temporal_causal=True)  # (1, 8, 64, 2, 32)
out.square().mean().backward()  # gradients in qkv.grad

# ChopGrad: decode 9 latent frames segment by segment; each segment's loss backpropagates through 2 segments
decoder = CausalVideoDecoder(CausalDecoderConfig.tiny())
latents = torch.randn(1, 4, 9, 8, 8)  # (batch, channels, latent frames, height, width)
loss = stream(decoder.step, decoder.init_state(), latents.split(1, dim=2), lambda frames, i: frames.square().mean(),
              window=2)  # gradients in decoder's parameters
print(f"attention out {tuple(out.shape)}, grad {tuple(qkv.grad.shape)}; decoder loss {loss.item():.4f}")
