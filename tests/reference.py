"""Float64 loop-level reference of parallel spatial-temporal attention, written independently of pychop.

One query frame at a time; the temporal grad window is an explicit ``.detach()`` of the key and value
frames outside it, exactly the rule of docs/design.md (section 2).
"""

import torch


def attended_frames(t, num_frames, causal, window):
    """The key frames N(t) that query frame t attends to."""
    frames = range(num_frames) if not (causal or window) else range(t + 1)
    return [u for u in frames if window is None or t - u < window]


def spatial_loops(q, k, v, scale):
    """(B, T, S, H, D) float64 -> spatial attention output, frame by frame."""
    out = []
    for t in range(q.shape[1]):
        scores = torch.einsum("bshd,bzhd->bhsz", q[:, t], k[:, t]) * scale
        out.append(torch.einsum("bhsz,bzhd->bshd", scores.softmax(-1), v[:, t]))
    return torch.stack(out, dim=1)


def temporal_loops(q, k, v, scale, causal=False, window=None, grad_window=None):
    """(B, T, S, H, D) float64 -> temporal attention output, query frame by query frame."""
    num_frames = q.shape[1]
    out = []
    for t in range(num_frames):
        frames = attended_frames(t, num_frames, causal, window)
        live = [grad_window is None or u > t - grad_window for u in frames]
        keys = torch.stack([k[:, u] if alive else k[:, u].detach() for u, alive in zip(frames, live)], dim=1)
        vals = torch.stack([v[:, u] if alive else v[:, u].detach() for u, alive in zip(frames, live)], dim=1)
        scores = torch.einsum("bshd,bnshd->bshn", q[:, t], keys) * scale
        out.append(torch.einsum("bshn,bnshd->bshd", scores.softmax(-1), vals))
    return torch.stack(out, dim=1)


def parallel_loops(q_s, k_s, v_s, q_t, k_t, v_t, scale, causal=False, window=None, grad_window=None):
    return spatial_loops(q_s, k_s, v_s, scale) + temporal_loops(q_t, k_t, v_t, scale, causal, window, grad_window)
