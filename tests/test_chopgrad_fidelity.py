"""pychop.chopgrad.fidelity against gradients computed by hand, and its exactness at a window as long as the clip."""

import math

import pytest
import torch
import torch.nn.functional as F

from pychop.chopgrad import fidelity
from pychop.models import CausalDecoderConfig, CausalVideoDecoder
from tests.chopgrad_helpers import ToyRecurrence, single_thread  # noqa: F401

KEYS = [f"{name}_{measure}" for name in ("params", "latent") for measure in ("cosine", "norm_ratio", "rel_error")]


class LinearRecurrence(torch.nn.Module):
    """h' = a h + b x, y = h' (scalars): every truncated gradient has a closed form."""

    def __init__(self, a, b):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def step(self, h, x):
        h = self.a * h + self.b * x
        return h, h


def hand_gradients(a, b, x, w, window):
    """For loss_i = w_i y_i and window k: per loss, (dloss_i/da, dloss_i/db) with the state entering segment
    s = max(0, i-k+1) held constant, and per segment j, d(sum_i loss_i)/dx_j."""
    n = len(x)
    h = [0.0]
    for j in range(n):
        h.append(a * h[-1] + b * x[j])  # h[j] enters segment j
    params, latent = [], [0.0] * n
    for i in range(n):
        s = max(0, i - window + 1)
        # y_i = a^(i-s+1) h_s + sum_{j=s..i} a^(i-j) b x_j, h_s a constant
        d_a = (i - s + 1) * a ** (i - s) * h[s] + sum((i - j) * a ** (i - j - 1) * b * x[j] for j in range(s, i))
        d_b = sum(a ** (i - j) * x[j] for j in range(s, i + 1))
        params.append((w[i] * d_a, w[i] * d_b))
        for j in range(s, i + 1):
            latent[j] += w[i] * a ** (i - j) * b
    return params, latent


def agreement(mine, full):
    dot = sum(m * f for m, f in zip(mine, full))
    own, ref = math.sqrt(sum(m * m for m in mine)), math.sqrt(sum(f * f for f in full))
    return {"cosine": dot / (own * ref), "norm_ratio": own / ref,
            "rel_error": math.sqrt(sum((m - f) ** 2 for m, f in zip(mine, full))) / ref}


def expected_rows(a, b, x, w, window):
    params, latent = hand_gradients(a, b, x, w, window)
    full_params, full_latent = hand_gradients(a, b, x, w, len(x))
    summed = [sum(p[0] for p in params), sum(p[1] for p in params)]
    full_summed = [sum(p[0] for p in full_params), sum(p[1] for p in full_params)]
    rows = [{"segment": None, **{f"params_{k}": v for k, v in agreement(summed, full_summed).items()},
             **{f"latent_{k}": v for k, v in agreement(latent, full_latent).items()}}]
    for i in range(len(x)):
        rows.append({"segment": i, **{f"params_{k}": v for k, v in agreement(params[i], full_params[i]).items()},
                     **{f"latent_{k}": v for k, v in agreement([latent[i]], [full_latent[i]]).items()}})
    return rows


@pytest.mark.parametrize("strategy", ["recompute", "retain"])
def test_linear_recurrence_matches_hand_computed_gradients(strategy):
    a, b = 0.8, 1.3
    x = [0.5, -1.2, 0.9, 2.0, -0.4]
    w = [1.0, -0.7, 0.3, 1.5, -1.1]
    model = LinearRecurrence(a, b)
    segments = [torch.tensor([v], dtype=torch.float64) for v in x]
    rows = fidelity(model.step, torch.zeros(1, dtype=torch.float64), segments,
                    lambda y, i: w[i] * y.sum(), windows=(1, 2, 3), strategy=strategy)
    assert [(r["window"], r["segment"]) for r in rows] == [(k, s) for k in (1, 2, 3) for s in (None, 0, 1, 2, 3, 4)]
    for window in (1, 2, 3):
        mine = [r for r in rows if r["window"] == window]
        for got, want in zip(mine, expected_rows(a, b, x, w, window)):
            assert got["segment"] == want["segment"]
            for key in KEYS:
                assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), (window, got["segment"], key)
    whole = next(r for r in rows if r["window"] == 1 and r["segment"] is None)
    assert whole["params_rel_error"] > 0.1 and whole["latent_rel_error"] > 0.1  # the case tells windows apart


def check_exact(rows):
    for row in rows:
        for name in ("params", "latent"):
            if row[f"{name}_norm_ratio"] is None:
                continue
            assert row[f"{name}_rel_error"] == 0.0, row
            assert row[f"{name}_norm_ratio"] == pytest.approx(1.0, abs=1e-15)
            assert row[f"{name}_cosine"] == pytest.approx(1.0, abs=1e-15)


class DropoutToy(ToyRecurrence):
    """The toy recurrence with dropout on its new state: a step that draws random numbers."""

    def step(self, state, x):
        new, y = super().step(state, x)
        return {**new, "h": F.dropout(new["h"], 0.3)}, y


def test_window_as_long_as_the_clip_is_full_backpropagation_exactly(seed):
    torch.manual_seed(seed)
    model = DropoutToy()
    segments = [torch.randn(3, 6, dtype=torch.float64) for _ in range(4)]
    targets = [torch.randn(3, 6, dtype=torch.float64) for _ in range(4)]
    rng = torch.get_rng_state()
    rows = fidelity(model.step, model.init_state(3), segments, lambda y, i: F.mse_loss(y, targets[i]),
                    windows=(4, 6, 1))
    assert torch.equal(torch.get_rng_state(), rng)  # the global random-number state is left as it was
    check_exact([r for r in rows if r["window"] >= 4])
    truncated = [r for r in rows if r["window"] == 1 and r["segment"] is None]
    assert truncated[0]["params_rel_error"] > 1e-3 and truncated[0]["params_cosine"] < 1


def test_decoder_full_window_exact_and_callers_tensors_untouched(seed):
    torch.manual_seed(seed)
    decoder = CausalVideoDecoder(CausalDecoderConfig.tiny())
    z = torch.randn(1, 4, 3, 2, 2, requires_grad=True)
    upstream = z * 2  # a non-leaf: no gradient may flow back to z
    targets = [torch.randn(1, 3, 1 if i == 0 else 4, 8, 8) for i in range(3)]
    for p in decoder.parameters():
        p.grad = torch.full_like(p, 7.0)
    rows = fidelity(decoder.step, decoder.init_state(), list(upstream.split(1, dim=2)),
                    lambda y, i: F.mse_loss(y, targets[i]), windows=(3, 1), params=decoder.parameters())
    check_exact([r for r in rows if r["window"] == 3])
    assert z.grad is None
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in decoder.parameters())
    window_1 = {r["segment"]: r for r in rows if r["window"] == 1}
    assert window_1[0]["params_rel_error"] == 0.0  # segment 0's loss sees segment 0 alone either way
    assert window_1[None]["latent_cosine"] < 1 and window_1[2]["latent_rel_error"] == 0.0  # the last input too


def test_parameters_found_in_the_graph_match_the_ones_given(seed):
    torch.manual_seed(seed)
    model = ToyRecurrence()
    segments = [torch.randn(2, 6, dtype=torch.float64) for _ in range(3)]
    loss = lambda y, i: y.square().mean()  # noqa: E731
    found = fidelity(model.step, model.init_state(2), segments, loss, windows=(1, 2))
    given = fidelity(model.step, model.init_state(2), segments, loss, windows=(1, 2), params=model.parameters())
    assert len(found) == len(given) == 8
    for mine, theirs in zip(found, given):  # the same numbers, summed in another order
        assert (mine["window"], mine["segment"]) == (theirs["window"], theirs["segment"])
        assert [mine[key] for key in KEYS] == pytest.approx([theirs[key] for key in KEYS], rel=1e-12)


def test_bad_arguments_say_what_is_wrong():
    model = ToyRecurrence()
    segments = [torch.randn(2, 6, dtype=torch.float64) for _ in range(2)]
    state = model.init_state(2)
    loss = lambda y, i: y.sum()  # noqa: E731
    with pytest.raises(ValueError, match="windows must be a non-empty sequence"):
        fidelity(model.step, state, segments, loss, windows=2)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        fidelity(model.step, state, segments, loss, windows=(1, 0))
    with pytest.raises(ValueError, match="strategy must be one of"):
        fidelity(model.step, state, segments, loss, strategy="keep")
    with pytest.raises(ValueError, match=r"params\[0\] must be a tensor that requires grad"):
        fidelity(model.step, state, segments, loss, params=[torch.zeros(3)])
    with pytest.raises(TypeError, match="loss_fn"):
        fidelity(model.step, state, segments, "mse")
    with torch.no_grad(), pytest.raises(RuntimeError, match="gradients disabled"):
        fidelity(model.step, state, segments, loss)
