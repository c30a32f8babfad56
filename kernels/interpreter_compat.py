"""Keeps Triton's CPU interpreter (TRITON_INTERPRET=1) working, and its tl.dot independent of the host's BLAS.

Index fix: the interpreter holds every scalar as a one-element 1-d array and turns it into a Python int with
``int()``, which NumPy 2.4 refuses for arrays of one dimension; so ``range(0, S, BLOCK)`` over a runtime bound
fails in a kernel. The patched tensors convert with ``.item()`` instead.

Dot: the interpreter computes tl.dot with ``numpy.matmul``, i.e. the host's BLAS, whose rounding depends on the
CPU it picks kernels for: numpy's OpenBLAS on an AVX2 CPU (its Haswell kernels) gives A @ B.T and (B @ A.T).T
that differ by a few float32 ulps, where other kernels give them bit for bit. The attention backward kernels
recompute the forward's scores transposed (K Q^T against the forward's Q K^T) and rely on getting the same
values: a score that comes back 3 ulps off at |q k| ~ 400 moves exp(s - lse) by ~1e-5, which a saturated
softmax (p = 1 exactly in the torch path) turns into a gradient error. The patched dot of float16/float32
operands into a float32 accumulator forms every product exactly in float64, adds them in order of k (a
reduction over the outermost axis, which numpy performs element by element), adds the accumulator and rounds
once to float32: the same bits for either operand order and on every CPU. Other dots keep the interpreter's own.

``apply()`` changes nothing outside the interpreter.
"""

from __future__ import annotations

import numpy


def _needs_index_fix() -> bool:
    try:
        int(numpy.zeros(1, dtype=numpy.int32))
        return False
    except TypeError:
        return True


def ordered_dot(a: numpy.ndarray, b: numpy.ndarray, acc: numpy.ndarray) -> numpy.ndarray:
    """acc + a @ b for (..., M, K) and (..., K, N) float16/float32 arrays and a float32 accumulator: exact
    products summed in float64 in order of k, rounded once to float32."""
    products = (numpy.moveaxis(a, -1, 0).astype(numpy.float64)[..., :, None]
                * numpy.moveaxis(b, -2, 0).astype(numpy.float64)[..., None, :])
    return (numpy.add.reduce(products, axis=0) + acc).astype(numpy.float32)


def _patch_dot(interpreter) -> None:
    builder = interpreter.InterpreterBuilder
    original = builder.create_dot
    exact_inputs = (numpy.float16, numpy.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype in exact_inputs and b.data.dtype in exact_inputs and d.data.dtype == numpy.float32:
            return interpreter.TensorHandle(ordered_dot(a.data, b.data, d.data), d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot.pychop_compat = True
    builder.create_dot = create_dot


def _patch_index(interpreter) -> None:
    patch = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_lang_tensor.pychop_compat = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def apply() -> None:
    """Idempotent; call only when TRITON_INTERPRET=1."""
    from triton.runtime import interpreter

    if not getattr(interpreter.InterpreterBuilder.create_dot, "pychop_compat", False):
        _patch_dot(interpreter)
    if _needs_index_fix() and not getattr(interpreter._patch_lang_tensor, "pychop_compat", False):
        _patch_index(interpreter)
