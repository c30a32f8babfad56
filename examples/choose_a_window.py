"""Before choosing a ChopGrad window: how close each window's gradients come to full backpropagation's, on your
decoder, your latents and your loss (``pychop.chopgrad.fidelity``), on the CPU.

pychop's tiny causal decoder stands in for yours: any ``step(state, z_t) -> (state, frames)`` recurrence, such as
a diffusers video VAE through ``pychop.integrations.diffusers.decoder_recurrence(vae)``. docs/outcomes.md says
how to read the rows.

    python examples/choose_a_window.py
"""

import torch
import torch.nn.functional as F

from pychop.chopgrad import fidelity
from pychop.models import CausalDecoderConfig, CausalVideoDecoder

torch.manual_seed(0)
decoder = CausalVideoDecoder(CausalDecoderConfig.tiny())     # your decoder: a step(state, z_t) recurrence
z = torch.randn(1, 4, 9, 4, 4)                               # latents: 9 latent frames -> 33 video frames
video = torch.rand(1, 3, 33, 16, 16) * 2 - 1                 # the clip they should decode to
targets = video.split([1] + [4] * 8, dim=2)                  # segment i decodes to targets[i]
rows = fidelity(decoder.step, decoder.init_state(), list(z.split(1, dim=2)),
                lambda y, i: F.mse_loss(y, targets[i]), windows=(1, 2, 4, 9), params=decoder.parameters())
print("window | parameter gradient cosine | latent gradient cosine | latent gradient norm ratio")
for row in rows:
    if row["segment"] is None:                               # the whole clip; then one row per segment
        print(f"{row['window']:6} | {row['params_cosine']:25.3f} | {row['latent_cosine']:22.3f} | "
              f"{row['latent_norm_ratio']:26.3f}")

# A window as long as the clip (9 segments) is full backpropagation: cosine 1, norm ratio 1.
whole = next(row for row in rows if row["window"] == 9 and row["segment"] is None)
assert abs(whole["params_cosine"] - 1) < 1e-9 and abs(whole["latent_norm_ratio"] - 1) < 1e-9, whole
