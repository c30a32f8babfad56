"""pychop.chopgrad semantics on a float64 toy recurrence, against an independent truncated-BPTT reference."""

import pytest
import torch

from pychop.chopgrad import scan, stream
from tests.chopgrad_helpers import ToyRecurrence, single_thread, take_grads, truncated_reference  # noqa: F401

N = 6
EXACT = 1e-12


def make_problem(seed, *, segments_require_grad=True):
    model = ToyRecurrence()
    segments = [torch.randn(3, 6, dtype=torch.float64, requires_grad=segments_require_grad) for _ in range(N)]
    targets = [torch.randn(3, 6, dtype=torch.float64) for _ in range(N)]
    loss_fn = lambda y, i: ((y - targets[i]) ** 2).mean() * (1 + i % 3)
    return model, segments, loss_fn


def assert_grads_close(actual, expected, context):
    for k, (a, e) in enumerate(zip(actual, expected)):
        err = (a - e).abs().max().item()
        assert err <= EXACT * max(1.0, e.abs().max().item()), f"gradient {k} off by {err:.3g}: {context}"


@pytest.mark.parametrize("strategy", ["recompute", "retain"])
@pytest.mark.parametrize("window", [1, 2, 3, N, N + 3])
def test_stream_matches_truncated_reference(seed, strategy, window):
    model, segments, loss_fn = make_problem(seed)
    tracked = list(model.parameters()) + segments
    expected_loss = truncated_reference(model.step, model.init_state(3), segments, loss_fn, window)
    expected = take_grads(tracked)
    loss = stream(model.step, model.init_state(3), segments, loss_fn, window=window, strategy=strategy)
    actual = take_grads(tracked)
    context = f"strategy={strategy} window={window} seed={seed}"
    assert loss.requires_grad is False and abs(loss.item() - expected_loss) < 1e-12 * abs(expected_loss), context
    assert_grads_close(actual, expected, context)


@pytest.mark.parametrize("window", [1, 2, N])
def test_scan_matches_truncated_reference(seed, window):
    model, segments, loss_fn = make_problem(seed)
    tracked = list(model.parameters()) + segments
    truncated_reference(model.step, model.init_state(3), segments, loss_fn, window)
    expected = take_grads(tracked)
    outputs = scan(model.step, model.init_state(3), segments, window=window)
    sum(loss_fn(y, i) for i, y in enumerate(outputs)).backward()
    assert_grads_close(take_grads(tracked), expected, f"scan window={window} seed={seed}")


def test_scan_parameters_reach_autograd_grad(seed):
    """Parameters are explicit inputs of scan's autograd op, so torch.autograd.grad sees them."""
    model, segments, loss_fn = make_problem(seed)
    params = list(model.parameters())
    full = sum(loss_fn(y, i) for i, y in enumerate(scan(model.step, model.init_state(3), segments, window=N)))
    via_scan = torch.autograd.grad(full, params)
    truncated_reference(model.step, model.init_state(3), segments, loss_fn, N)
    assert_grads_close(via_scan, take_grads(params), f"seed={seed}")


def test_full_window_equals_full_backprop_with_initial_state_grad(seed):
    """window >= n is full BPTT, including the gradient on an initial state that requires grad."""
    model, segments, loss_fn = make_problem(seed)
    h0 = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    tracked = list(model.parameters()) + segments + [h0]
    state = lambda: {"h": h0, "cache": [None, "Rep"], "memory": None}
    carried, total = state(), 0
    for i, x in enumerate(segments):
        carried, y = model.step(carried, x)
        total = total + loss_fn(y, i)
    total.backward()
    expected = take_grads(tracked)
    for strategy in ("recompute", "retain"):
        stream(model.step, state(), segments, loss_fn, window=N, strategy=strategy)
        assert_grads_close(take_grads(tracked), expected, f"{strategy} seed={seed}")
    sum(loss_fn(y, i) for i, y in enumerate(scan(model.step, state(), segments, window=N))).backward()
    assert_grads_close(take_grads(tracked), expected, f"scan seed={seed}")


@pytest.mark.parametrize("strategy", ["recompute", "retain"])
def test_gradient_continues_upstream_from_non_leaf_segments(seed, strategy):
    """Segments computed from upstream parameters (latents of a diffusion model): the upstream parameter
    gets the gradient of the truncated objective, once."""
    model, _, loss_fn = make_problem(seed)
    upstream = torch.nn.Linear(6, 6, dtype=torch.float64)
    noise = torch.randn(N, 3, 6, dtype=torch.float64)
    latents = lambda: list(upstream(noise).unbind(0))
    truncated_reference(model.step, model.init_state(3), latents(), loss_fn, 2)
    expected = take_grads(list(upstream.parameters()))
    stream(model.step, model.init_state(3), latents(), loss_fn, window=2, strategy=strategy)
    assert_grads_close(take_grads(list(upstream.parameters())), expected, f"{strategy} seed={seed}")


@pytest.mark.parametrize("strategy", ["recompute", "retain"])
def test_outputs_are_the_plain_recurrence_bit_for_bit(seed, strategy):
    model, segments, loss_fn = make_problem(seed)
    carried, plain = model.init_state(3), []
    with torch.no_grad():
        for x in segments:
            carried, y = model.step(carried, x)
            plain.append(y)
    for window in (1, 3):
        _, outputs = stream(model.step, model.init_state(3), segments, loss_fn, window=window,
                            strategy=strategy, return_outputs=True)
        assert all(torch.equal(a, b) and not a.requires_grad for a, b in zip(outputs, plain))
    assert all(torch.equal(a, b) for a, b in zip(scan(model.step, model.init_state(3), segments), plain))


def test_truncation_changes_the_gradient(seed):
    """A window shorter than the sequence must not quietly give the full gradient (guards the reference)."""
    model, segments, loss_fn = make_problem(seed)
    params = list(model.parameters())
    stream(model.step, model.init_state(3), segments, loss_fn, window=1)
    short = take_grads(params)
    stream(model.step, model.init_state(3), segments, loss_fn, window=N)
    full = take_grads(params)
    assert max((a - b).abs().max().item() for a, b in zip(short, full)) > 1e-6


# ---- bad input -------------------------------------------------------------------------------------------

def mutating_step(state, x):
    state[0].mul_(0.5)
    return [state[0] + x], x * 2


def dropout_step(model):
    """The toy step on its input under dropout: the carried state depends on the random numbers drawn."""
    return lambda state, x: model.step(state, torch.nn.functional.dropout(x, 0.5))


def plain_run(step, state, segments, loss_fn):
    """The recurrence in one plain autograd graph, losses summed and backpropagated: the outputs."""
    outputs = []
    for x in segments:
        state, y = step(state, x)
        outputs.append(y)
    sum(loss_fn(y, i) for i, y in enumerate(outputs)).backward()
    return [y.detach() for y in outputs]


@pytest.mark.parametrize("strategy", ["recompute", "retain"])
@pytest.mark.parametrize("window", [2, N])
def test_stream_recomputes_segments_with_their_first_random_numbers(seed, strategy, window):
    """With dropout in the step, the outputs are the plain recurrence's under the same seed, the global RNG
    ends where the plain run leaves it, and with a full window the gradients are full backpropagation's."""
    model, segments, loss_fn = make_problem(seed)
    step, tracked = dropout_step(model), list(model.parameters()) + segments
    torch.manual_seed(seed)
    expected_outputs = plain_run(step, model.init_state(3), segments, loss_fn)
    expected, after = take_grads(tracked), torch.rand(4)
    torch.manual_seed(seed)
    _, outputs = stream(step, model.init_state(3), segments, loss_fn, window=window, strategy=strategy,
                        return_outputs=True)
    assert torch.equal(torch.rand(4), after), "the global RNG state differs from the plain run's"
    for i, (y, e) in enumerate(zip(outputs, expected_outputs)):
        assert torch.equal(y, e), f"output {i} differs (strategy={strategy} window={window} seed={seed})"
    if window == N:
        assert_grads_close(take_grads(tracked), expected, f"strategy={strategy} seed={seed}")


def test_scan_backward_recomputes_with_the_forward_random_numbers(seed):
    """The backward recomputes later, after the RNG has moved on: it must draw the forward's masks to give
    full backpropagation's gradients."""
    model, segments, loss_fn = make_problem(seed)
    step, tracked = dropout_step(model), list(model.parameters()) + segments
    torch.manual_seed(seed)
    plain_run(step, model.init_state(3), segments, loss_fn)
    expected = take_grads(tracked)
    torch.manual_seed(seed)
    outputs = scan(step, model.init_state(3), segments, window=N)
    torch.rand(100)  # the RNG moves on before the backward
    before = torch.get_rng_state()
    sum(loss_fn(y, i) for i, y in enumerate(outputs)).backward()
    assert torch.equal(torch.get_rng_state(), before), "the backward's replays moved the global RNG"
    assert_grads_close(take_grads(tracked), expected, f"seed={seed}")


@pytest.mark.parametrize("window", [2, N])
def test_scan_backward_recomputes_each_segment_as_its_forward_ran(seed, window):
    """Forward under dropout and bfloat16 autocast, backward outside autocast: every output the backward
    recomputes is bit for bit the forward's (same masks, same precision)."""
    model, segments, _ = make_problem(seed)
    model.float()
    segments = [x.detach().float().requires_grad_() for x in segments]
    state = {key: value.float() if isinstance(value, torch.Tensor) else value
             for key, value in model.init_state(3).items()}
    index = {x.data_ptr(): i for i, x in enumerate(segments)}
    runs = {i: [] for i in range(N)}  # segment -> its outputs, in the order of the runs

    def recorded_step(state, x):
        state, y = dropout_step(model)(state, x)
        runs[index[x.data_ptr()]].append(y.detach().clone())
        return state, y

    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = scan(recorded_step, state, segments, window=window)
    sum((y.float() ** 2).mean() for y in outputs).backward()
    for i, recorded in runs.items():
        assert len(recorded) > 1, f"segment {i} was not recomputed"
        for again in recorded[1:]:
            assert torch.equal(again, recorded[0]), f"segment {i} recomputed differently (window={window})"


def test_in_place_state_mutation_is_an_error_naming_the_step():
    segments = [torch.randn(2, 3) for _ in range(3)]
    with pytest.raises(RuntimeError, match=r"mutating_step.*state\[0\].*in place"):
        stream(mutating_step, [torch.zeros(2, 3)], segments, lambda y, i: y.sum())
    with pytest.raises(RuntimeError, match=r"mutating_step.*in place"):
        scan(mutating_step, [torch.zeros(2, 3)], segments)


def test_reassigning_state_entries_is_not_mutation():
    """diffusers-style list assignment: the step gets fresh containers, so this is pure."""
    def assigning_step(state, x):
        state[0] = state[0] + x
        return state, state[0] * 1.0
    segments = [torch.randn(2, 3, requires_grad=True) for _ in range(3)]
    initial = [torch.zeros(2, 3)]
    _, outputs = stream(assigning_step, initial, segments, lambda y, i: y.sum(), window=2, return_outputs=True)
    torch.testing.assert_close(outputs[-1], sum(segments), rtol=0, atol=0)
    assert torch.equal(initial[0], torch.zeros(2, 3))


@pytest.mark.parametrize("window", [0, -1, 1.5, True, "2"])
def test_bad_window(window):
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        stream(lambda s, x: (s, x), [], [torch.zeros(1)], lambda y, i: y.sum(), window=window)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        scan(lambda s, x: (s, x), [], [torch.zeros(1)], window=window)


def test_mismatched_segments():
    for bad, found in (([torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3, 1)], r"\(2, 3, 1\)"),
                       ([torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)], "float64")):
        with pytest.raises(ValueError, match=rf"number of dimensions.*segments\[2\] is .*{found}"):
            stream(lambda s, x: (s, x), [], bad, lambda y, i: y.sum())
        with pytest.raises(ValueError, match=rf"number of dimensions.*segments\[2\] is .*{found}"):
            scan(lambda s, x: (s, x), [], bad)
    with pytest.raises(ValueError, match="at least one"):
        stream(lambda s, x: (s, x), [], [], lambda y, i: y.sum())
    with pytest.raises(TypeError, match="not one tensor"):
        stream(lambda s, x: (s, x), [], torch.zeros(3, 2), lambda y, i: y.sum())


class FrameRecurrence(ToyRecurrence):
    """ToyRecurrence run frame by frame over a segment (batch, frames, width) of any length; y has its frames."""

    def step(self, state, x):
        outputs = []
        for t in range(x.shape[1]):
            state, y = super().step(state, x[:, t])
            outputs.append(y)
        return state, torch.stack(outputs, dim=1)


LENGTHS = [3, 1, 2, 2, 1]


@pytest.mark.parametrize("window", [1, 2, len(LENGTHS)])
def test_segments_of_different_lengths(seed, window):
    """A longer first chunk (CogVideoX): the window counts segments, whatever their lengths."""
    model = FrameRecurrence()
    segments = [torch.randn(3, n, 6, dtype=torch.float64, requires_grad=True) for n in LENGTHS]
    targets = [torch.randn(3, n, 6, dtype=torch.float64) for n in LENGTHS]
    loss_fn = lambda y, i: ((y - targets[i]) ** 2).mean()
    tracked = list(model.parameters()) + segments
    truncated_reference(model.step, model.init_state(3), segments, loss_fn, window)
    expected = take_grads(tracked)
    for strategy in ("recompute", "retain"):
        stream(model.step, model.init_state(3), segments, loss_fn, window=window, strategy=strategy)
        assert_grads_close(take_grads(tracked), expected, f"{strategy} window={window} seed={seed}")
    outputs = scan(model.step, model.init_state(3), segments, window=window)
    assert [y.shape[1] for y in outputs] == LENGTHS
    sum(loss_fn(y, i) for i, y in enumerate(outputs)).backward()
    assert_grads_close(take_grads(tracked), expected, f"scan window={window} seed={seed}")


@pytest.mark.parametrize("disabled", [torch.no_grad, torch.inference_mode])
def test_stream_refuses_to_run_with_gradients_disabled(disabled):
    model, segments, loss_fn = make_problem(0)
    with disabled(), pytest.raises(RuntimeError, match=r"gradients disabled.*fills \.grad"):
        stream(model.step, model.init_state(3), segments, loss_fn)
    assert all(p.grad is None for p in model.parameters())


def test_bad_strategy_step_output_and_loss():
    segments = [torch.zeros(2, 3)]
    with pytest.raises(ValueError, match="strategy must be one of"):
        stream(lambda s, x: (s, x), [], segments, lambda y, i: y.sum(), strategy="checkpoint")
    with pytest.raises(TypeError, match=r"must return a \(new_state, y_seg\) pair"):
        stream(lambda s, x: x, [], segments, lambda y, i: y.sum())
    with pytest.raises(TypeError, match="scalar tensor"):
        stream(lambda s, x: (s, x), [], segments, lambda y, i: y)
