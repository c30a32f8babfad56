"""ChopGrad: training through a diffusers video VAE's decoder in constant activation memory, on the CPU.

A tiny random AutoencoderKLWan stands in for Wan's VAE (``AutoencoderKLWan.from_pretrained(...)`` there),
frozen; a 3-D convolution stands in for the diffusion model whose latents it decodes. ``decoder_recurrence(vae)``
turns ``vae.decode`` into a recurrence over latent frames whose state is the decoder's causal cache, and
``stream`` backpropagates each segment's pixel loss through the last ``window`` segments only, then hands the
latents' gradient to the model upstream in one backward.

    python examples/chopgrad_wan_vae.py
"""

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

from pychop.chopgrad import stream
from pychop.integrations.diffusers import decoder_recurrence

torch.manual_seed(0)
vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
                       latents_mean=[0.0] * 4, latents_std=[1.0] * 4).requires_grad_(False)
generator = torch.nn.Conv3d(4, 4, kernel_size=3, padding=1)  # stands in for the diffusion model
optimizer = torch.optim.AdamW(generator.parameters(), lr=1e-3)
rec = decoder_recurrence(vae)  # a WanDecoderRecurrence: one latent frame per segment

noise = torch.randn(1, 4, 4, 4, 4)  # (B, C, T, h, w): 4 latent frames
frame_counts = [1, 4, 4, 4]  # video frames per latent frame: Wan decodes the first into 1 frame, the others into 4
video = torch.rand(1, 3, sum(frame_counts), 16, 16) * 2 - 1  # the clip to match
targets = video.split(frame_counts, dim=2)  # the frames of each segment


def pixel_loss(frames, i):
    return F.mse_loss(frames, targets[i])


for step in range(3):
    latents = generator(noise)
    loss = stream(rec.step, rec.init_state(), rec.segments(latents), pixel_loss, window=2)
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: loss {loss.item():.4f}")

# A window as long as the clip is plain backpropagation through vae.decode, gradient for gradient.
latents = generator(noise)
segments = rec.segments(latents)
stream(rec.step, rec.init_state(), segments, pixel_loss, window=len(segments))
chopgrad = [p.grad.clone() for p in generator.parameters()]
optimizer.zero_grad()
frames = vae.decode(generator(noise)).sample.split(frame_counts, dim=2)
sum(pixel_loss(y, i) for i, y in enumerate(frames)).backward()
for a, b in zip(chopgrad, (p.grad for p in generator.parameters())):
    torch.testing.assert_close(a, b)
print("window = segments: the gradient of backpropagation through vae.decode")
