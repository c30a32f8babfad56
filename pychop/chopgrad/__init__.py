"""ChopGrad: truncated backpropagation through a recurrence such as a causal video decoder.

A recurrence is a pure ``step(state, x_seg) -> (new_state, y_seg)`` run over segments ``x_0 .. x_{n-1}``
from an initial state ``s_0``: ``s_{i+1}, y_i = step(s_i, x_i)``. Decoders with a causal feature cache (the
Wan VAE) are such recurrences: the state is the list of cached frames of every causal convolution.

Semantics, for a window ``k >= 1``:

- Forward values are exact: every ``y_i`` and ``s_i`` equals the plain recurrence's (the caches carry real
  values). On the CPU they are bit-identical to it; on a GPU, recomputation can differ in the last bits where
  kernels are nondeterministic (atomics in some backward/conv algorithms), never in the recurrence itself.
- The loss (or output gradient) of segment ``i`` flows back through segments ``i-k+1 .. i`` only; the state
  entering segment ``max(0, i-k+1)`` is a constant for it. When the window reaches segment 0, the gradient
  reaches the initial state's tensors that require grad. So ``k >= n`` is exactly full backpropagation
  through time, and ``k = 1`` backpropagates each segment's loss through its own segment alone.
- Gradients reach every leaf tensor the step uses: ``stream`` accumulates them into ``.grad`` (as
  ``loss.backward()`` would); ``scan`` is an autograd op whose inputs include those leaves (found by walking
  the step's graph during the forward), so ``torch.autograd.grad`` works on parameters too.
- A recomputed segment runs as its first run did: from the random-number state it started from (dropout
  masks and noise are drawn again identically; the global RNG is left where the plain run leaves it) and,
  in ``scan``'s backward, under the forward's autocast state (``replay.SegmentReplay``). As in
  ``torch.utils.checkpoint``, that covers the default generators of the CPU and of the CUDA devices the
  segments and the initial state are on, not a ``torch.Generator`` the step draws from explicitly.
- The step must be pure: it may build new containers and tensors, never write into a state tensor or its
  input in place (checked with version counters; the error names the step and the state entry). It receives
  fresh containers, so assigning into the state list (as diffusers' caches do) is harmless. Writes through
  ``.data`` bypass version counters and so escape the check.
- Segments may differ in shape (CogVideoX's VAE decodes a longer first chunk); the window is counted in
  segments, whatever their lengths.

Entry points: ``stream`` (loss per segment, constant memory, strategies ``"recompute"`` and ``"retain"``)
and ``scan`` (differentiable, returns all outputs; the backward recomputes window by window). Before choosing
a window, run ``fidelity`` on your own recurrence, latents and loss: per window and segment, the cosine and norm
ratio of the truncated parameter and latent gradients against full backpropagation.
"""

from pychop.chopgrad.fidelity import fidelity
from pychop.chopgrad.scan import scan
from pychop.chopgrad.stream import STRATEGIES, stream

__all__ = ["stream", "scan", "fidelity", "STRATEGIES"]
