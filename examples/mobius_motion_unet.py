"""Mobius fine-tuning of a diffusers UNetMotionModel (AnimateDiff's UNet): one training step, on the CPU.

A tiny random UNetMotionModel stands in for a real one (``UNetMotionModel.from_unet2d(unet, motion_adapter)`` or
``from_pretrained(...)`` there). ``convert_to_parallel`` rewires every spatial transformer + motion module pair
into the parallel (Mobius) form, ``patch_temporal_attention`` runs the motion modules' self-attention through
pychop's fused op, and ``freeze_unet2d_params`` leaves only the motion modules to train.

    python examples/mobius_motion_unet.py
"""

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNetMotionModel

from pychop.integrations.diffusers import convert_to_parallel, patch_temporal_attention

torch.manual_seed(0)
batch, frames, text_dim = 2, 4, 24
unet = UNetMotionModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                       up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), cross_attention_dim=text_dim,
                       num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=frames)
frozen_before = {name: p.detach().clone() for name, p in unet.named_parameters() if "motion_modules" not in name}

conversion = convert_to_parallel(unet)  # spatial and temporal transformers side by side, reading the same input
patch = patch_temporal_attention(unet)  # motion-module self-attention through pychop.temporal_attention
unet.freeze_unet2d_params()  # only the motion modules train
optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
scheduler = DDPMScheduler(num_train_timesteps=1000)

latents = torch.randn(batch, 4, frames, 8, 8)  # (B, C, T, h, w): a clip's VAE latents
text = torch.randn(batch, 5, text_dim).repeat_interleave(frames, dim=0)  # text embeddings, one copy per frame
noise = torch.randn_like(latents)
timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
noisy = scheduler.add_noise(latents, noise, timesteps)

prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample
loss = F.mse_loss(prediction, noise)
loss.backward()
optimizer.step()
optimizer.zero_grad()
print(f"{len(conversion.pair_names)} pairs in parallel, {len(patch.module_names)} temporal attentions patched; "
      f"loss {loss.item():.4f}")

patch.remove()
conversion.revert()  # the serial model again, with the trained motion modules
assert all(torch.equal(p, frozen_before[name]) for name, p in unet.named_parameters() if name in frozen_before)
