"""python -m benchmarks.demo: pychop end to end, in a minute on a CPU (larger sizes on a GPU).

1. Fused attention: the ``auto`` backend against the torch reference on a packed projection.
2. Mobius: one temporal fine-tuning step of a VideoUNet in parallel form, spatial layers frozen.
3. ChopGrad: a pixel loss through a causal video decoder, truncated to a window of 2 segments, against full
   backpropagation: activation memory and gradient agreement.
"""

import torch
import torch.nn.functional as F

import pychop
from benchmarks.machine import describe, machine_record
from pychop.chopgrad import stream
from pychop.chopgrad.memory import SavedActivationMeter
from pychop.models import SD15_VIDEO, TINY, CausalDecoderConfig, CausalVideoDecoder, VideoUNet


def fused_attention(device, dtype):
    B, T, S, H, D = (1, 16, 32 * 32, 8, 64) if device.type == "cuda" else (1, 4, 64, 2, 32)
    q_s, k_s, v_s, q_t, k_t, v_t = torch.randn(B, T, S, 6, H, D, device=device, dtype=dtype).unbind(3)
    backend = pychop.ops.backends.resolve("auto", device)
    out = pychop.parallel_st_attention(q_s, k_s, v_s, q_t, k_t, v_t, temporal_causal=True)
    ref = pychop.parallel_st_attention(q_s, k_s, v_s, q_t, k_t, v_t, temporal_causal=True, backend="torch")
    print(f"[attention] (B,T,S,H,D)={B, T, S, H, D} {dtype}: backend '{backend}' vs torch reference, "
          f"max |diff| = {(out.float() - ref.float()).abs().max().item():.2e}")


def mobius_step(device, dtype):
    config = SD15_VIDEO if device.type == "cuda" else TINY
    model = VideoUNet(config, st_mode="parallel").to(device=device, dtype=dtype).freeze_spatial()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    sample, timestep, text = model.example_inputs(batch=1, device=device, dtype=dtype)
    loss = F.mse_loss(model(sample, timestep, text).float(), torch.randn_like(sample).float())
    loss.backward()
    optimizer.step()
    frozen_with_grad = sum(p.grad is not None for p in model.parameters() if not p.requires_grad)
    print(f"[mobius] VideoUNet parallel, spatial frozen: {sum(p.numel() for p in trainable) / 1e6:.2f}M of "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters train; loss {loss.item():.4f}; "
          f"frozen parameters with a gradient: {frozen_with_grad}")


def chopgrad_decode(device):
    torch.manual_seed(0)
    decoder = CausalVideoDecoder(CausalDecoderConfig.tiny()).to(device)
    latents = torch.randn(1, 4, 12, 8, 8, device=device)
    segments = list(latents.split(1, dim=2))
    targets = [torch.randn_like(y) for y in decoder(latents).split([1] + [4] * 11, dim=2)]
    loss_fn = lambda y, i: F.mse_loss(y, targets[i])

    def gradients(window):
        decoder.zero_grad()
        meter = SavedActivationMeter()
        meter.measure(lambda: stream(decoder.step, decoder.init_state(), segments, loss_fn, window=window,
                                     strategy="retain"))
        return torch.cat([p.grad.flatten() for p in decoder.parameters()]), meter.peak

    full, full_bytes = gradients(len(segments))
    chopped, chopped_bytes = gradients(2)
    cosine = F.cosine_similarity(full, chopped, dim=0).item()
    print(f"[chopgrad] {len(segments)} latent frames -> {sum(t.shape[2] for t in targets)} video frames: saved "
          f"activations {chopped_bytes / 2**20:.2f} MiB with window 2 vs {full_bytes / 2**20:.2f} MiB full "
          f"backprop; gradient cosine similarity {cosine:.3f}")


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    where = describe(machine_record(device, ["python", "-m", "benchmarks.demo"]))
    print(f"pychop {pychop.__version__} demo on {device}: {where}")
    fused_attention(device, dtype)
    mobius_step(device, dtype)
    chopgrad_decode(device)


if __name__ == "__main__":
    main()
