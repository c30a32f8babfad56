"""pychop's fused parallel spatial-temporal attention on the packed layout, forward and backward, on the CPU.

One C -> 6C projection gives the packed (B, T, S, 6, H, D) tensor; q_s ... v_t are strided views of it, which
the fused op reads as they are (no permutes, no copies). The output and the gradients are compared with
backend="torch", the reference semantics.

    python examples/packed_attention.py
"""

import torch

import pychop

torch.manual_seed(0)
B, T, S, H, D = 2, 8, 16, 2, 32  # batch, frames, tokens per frame, heads, head dim
C = H * D
x = torch.randn(B, T, S, C, requires_grad=True)
projection = torch.nn.Linear(C, 6 * C)


def attention(backend, combine="sum"):
    """The fused op on views of the packed projection; returns its output and the gradients of x and W."""
    qkv = projection(x).view(B, T, S, 6, H, D)
    q_s, k_s, v_s, q_t, k_t, v_t = qkv.unbind(3)  # strided views, last-dimension stride 1
    out = pychop.parallel_st_attention(q_s, k_s, v_s, q_t, k_t, v_t, temporal_causal=True,
                                       temporal_grad_window=2, combine=combine, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), [x, projection.weight])
    return out.detach(), grads


for name, reason in pychop.available_backends("cpu").items():
    print(f"{name:>6}: {'available' if reason is None else reason}")

out, grads = attention("auto")  # the fastest available: "cpp" on a CPU, once pychop._C has built
ref_out, ref_grads = attention("torch")
for what, a, b in zip(("out", "grad x", "grad W"), (out, *grads), (ref_out, *ref_grads)):
    error = ((a - b).norm() / b.norm()).item()
    print(f"{what}: relative error against backend='torch' {error:.1e}")
    assert error < 1e-5, what

both, _ = attention("auto", combine="stack")  # the branches apart: (B, T, S, 2, H, D), spatial then temporal
assert both.shape == (B, T, S, 2, H, D)
torch.testing.assert_close(both.sum(3), out)
