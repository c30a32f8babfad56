"""ChopGrad inside the training loops people write: the loss handling of accelerate and of a GradScaler reaches
stream's backwards (``backward=``), scan under them, and misuse that used to pass silently or fail obscurely."""

import pytest
import torch

from pychop.chopgrad import scan, stream
from tests.chopgrad_helpers import ToyRecurrence, single_thread, take_grads, truncated_reference  # noqa: F401

N = 4
EXACT = 1e-12


def problem(seed, dtype=torch.float64):
    torch.manual_seed(seed)
    model = ToyRecurrence(dtype=dtype)
    batches = []
    for _ in range(3):
        segments = [torch.randn(2, 6, dtype=dtype) for _ in range(N)]
        targets = [torch.randn(2, 6, dtype=dtype) for _ in range(N)]
        batches.append((segments, lambda y, i, targets=targets: ((y - targets[i]) ** 2).mean()))
    return model, batches


def assert_close(actual, expected, context, tolerance=EXACT):
    for k, (a, e) in enumerate(zip(actual, expected)):
        error = (a - e).abs().max().item()
        assert error <= tolerance * max(1.0, e.abs().max().item()), f"gradient {k} off by {error:.3g}: {context}"


@pytest.fixture
def accelerator_factory():
    """Makes Accelerators; accelerate keeps one process-wide state, reset afterwards."""
    accelerate = pytest.importorskip("accelerate")
    yield lambda **kwargs: accelerate.Accelerator(cpu=True, **kwargs)
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("strategy", ["recompute", "retain"])
@pytest.mark.parametrize("window", [1, 2])
def test_stream_under_accelerate_accumulate_equals_plain_accumulation(seed, accelerator_factory, strategy, window):
    """accelerator.backward divides each loss by the accumulation steps; stream(backward=accelerator.backward)
    must too: after the accumulation, .grad equals the mean of the batches' truncated gradients."""
    model, batches = problem(seed)
    params = list(model.parameters())
    for segments, loss_fn in batches:
        truncated_reference(model.step, model.init_state(2), segments, loss_fn, window)
    expected = [g / len(batches) for g in take_grads(params)]

    accelerator = accelerator_factory(gradient_accumulation_steps=len(batches))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    for segments, loss_fn in batches:
        with accelerator.accumulate(model):
            stream(model.step, model.init_state(2), segments, loss_fn, window=window, strategy=strategy,
                   backward=accelerator.backward)
    assert_close(take_grads(params), expected, f"{strategy} window={window} seed={seed}")


def test_scan_under_accelerate_accumulate_equals_plain_accumulation(seed, accelerator_factory):
    """scan is an autograd op: the caller's accelerator.backward on a loss of its outputs scales its gradient."""
    model, batches = problem(seed)
    params = list(model.parameters())
    for segments, loss_fn in batches:
        truncated_reference(model.step, model.init_state(2), segments, loss_fn, 2)
    expected = [g / len(batches) for g in take_grads(params)]
    accelerator = accelerator_factory(gradient_accumulation_steps=len(batches))
    model = accelerator.prepare(model)
    for segments, loss_fn in batches:
        with accelerator.accumulate(model):
            outputs = scan(model.step, model.init_state(2), segments, window=2)
            accelerator.backward(sum(loss_fn(y, i) for i, y in enumerate(outputs)))
    assert_close(take_grads(params), expected, f"seed={seed}")


@pytest.mark.parametrize("strategy", ["recompute", "retain"])
def test_stream_with_a_grad_scaler(seed, strategy):
    """A float16-style loop on the CPU: a latent loss and a pixel loss (stream) both scaled by the GradScaler;
    after unscale_ the gradients are the unscaled loop's, and scaler.step accepts them."""
    model, batches = problem(seed, dtype=torch.float32)
    params = list(model.parameters())
    segments, loss_fn = batches[0]
    latent_loss = lambda: sum((p ** 2).sum() for p in params) * 1e-3
    latent_loss().backward()
    truncated_reference(model.step, model.init_state(2, dtype=torch.float32), segments, loss_fn, 2)
    expected = take_grads(params)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler.scale(latent_loss()).backward()
    stream(model.step, model.init_state(2, dtype=torch.float32), segments, loss_fn, window=2, strategy=strategy,
           backward=lambda loss: scaler.scale(loss).backward())
    scaler.unscale_(optimizer)
    assert_close([p.grad for p in params], expected, f"{strategy} seed={seed}", tolerance=1e-5)
    before = [p.detach().clone() for p in params]
    scaler.step(optimizer)
    scaler.update()
    assert all(not torch.equal(b, p) for b, p in zip(before, params)), "scaler.step skipped the update"


def test_scan_under_a_grad_scaler(seed):
    """scan's output gradients carry the scale of the caller's scaled backward."""
    model, batches = problem(seed, dtype=torch.float32)
    params = list(model.parameters())
    segments, loss_fn = batches[0]
    truncated_reference(model.step, model.init_state(2, dtype=torch.float32), segments, loss_fn, 2)
    expected = take_grads(params)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    optimizer = torch.optim.SGD(params, lr=0.1)
    outputs = scan(model.step, model.init_state(2, dtype=torch.float32), segments, window=2)
    scaler.scale(sum(loss_fn(y, i) for i, y in enumerate(outputs))).backward()
    scaler.unscale_(optimizer)
    assert_close([p.grad for p in params], expected, f"seed={seed}", tolerance=1e-5)


def test_stream_as_the_only_backward_of_a_grad_scaler_step(seed):
    """With stream's backward the only one of the iteration, scaler.step finds the scale it used."""
    model, batches = problem(seed, dtype=torch.float32)
    segments, loss_fn = batches[0]
    scaler = torch.amp.GradScaler("cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stream(model.step, model.init_state(2, dtype=torch.float32), segments, loss_fn,
           backward=lambda loss: scaler.scale(loss).backward())
    scaler.step(optimizer)
    scaler.update()


def test_backward_must_be_callable():
    model, batches = problem(0)
    segments, loss_fn = batches[0]
    with pytest.raises(TypeError, match=r"backward must be callable as backward\(loss\)"):
        stream(model.step, model.init_state(2), segments, loss_fn, backward="accelerator")


@pytest.mark.parametrize("strategy", ["recompute", "retain"])
def test_a_loss_that_does_not_require_grad_is_an_error(strategy):
    """Plain autograd refuses to backpropagate such a loss; stream used to return it and leave .grad None."""
    model, batches = problem(0)
    segments, loss_fn = batches[0]
    with pytest.raises(RuntimeError, match=r"loss_fn\(y_seg, 0\) returned a loss that does not require grad"):
        stream(model.step, model.init_state(2), segments, lambda y, i: loss_fn(y, i).detach(), strategy=strategy)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match=r"does not require grad"):
        stream(model.step, model.init_state(2), segments, lambda y, i: loss_fn(y.detach(), i), strategy=strategy)


def test_zero_losses_without_grad_are_allowed(seed):
    """A segment without a target may return a zero that does not require grad."""
    model, batches = problem(seed)
    segments, loss_fn = batches[0]
    params = list(model.parameters())
    last = lambda y, i: loss_fn(y, i) if i == N - 1 else torch.zeros((), dtype=y.dtype)
    truncated_reference(model.step, model.init_state(2), segments, lambda y, i: loss_fn(y, i) * (i == N - 1), 2)
    expected = take_grads(params)
    stream(model.step, model.init_state(2), segments, last, window=2)
    assert_close(take_grads(params), expected, f"seed={seed}")


def test_scan_under_create_graph_says_it_is_differentiable_once(seed):
    model, batches = problem(seed)
    segments, loss_fn = batches[0]
    outputs = scan(model.step, model.init_state(2), segments, window=2)
    loss = sum(loss_fn(y, i) for i, y in enumerate(outputs))
    with pytest.raises(RuntimeError, match=r"scan's backward is differentiable once.*create_graph=True"):
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)


def test_scan_refuses_a_step_that_synchronises_over_ranks():
    """scan's forward runs every step with autograd and its backward recomputes them: a DDP step would be asked
    to reduce after every forward; stream is the entry point under DDP."""
    class SyncedStep:
        def __call__(self, state, x):
            return state, x * 2

        def no_sync(self):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match=r"scan cannot run a step that synchronises.*use stream"):
        scan(SyncedStep(), [], [torch.zeros(2, requires_grad=True)])
