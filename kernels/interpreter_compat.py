"""Makes Triton's CPU interpreter (TRITON_INTERPRET=1) work with NumPy 2.4 and later, and multiply as a GPU does.

1. The interpreter holds every scalar as a one-element 1-d array and turns it into a Python int with ``int()``,
   which NumPy 2.4 refuses for arrays of one dimension; so ``range(0, S, BLOCK)`` over a runtime bound fails in
   a kernel. The interpreter's tensor patching is wrapped to convert with ``.item()`` instead.
2. The interpreter's ``tl.dot`` is NumPy's float32 ``matmul``, whose summation order depends on the operands'
   layout: ``tl.dot(k, tl.trans(q))`` is not bitwise the transpose of ``tl.dot(q, tl.trans(k))``. On a GPU a
   float32 dot is (Triton's "ieee" dot accumulates each element over K in order, whichever operand is which),
   and the attention backward relies on it: a key kernel recomputing the forward's scores as ``K Q^T`` gets,
   for a query dominated by one key 200 above the others, probability exactly 1 and ``dp - delta`` exactly 0
   (tests/test_attention_conformance.py, scores falling by more than the exponent range). Float32 dots here
   accumulate in float64 and round once: the same result in either orientation.

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


def _patch_index(interpreter) -> None:
    patch = interpreter._patch_lang_tensor
    if not _needs_index_fix():
        return

    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_lang_tensor


def _patch_dot(interpreter) -> None:
    create_dot = interpreter.InterpreterBuilder.create_dot

    def orientation_free_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if d.data.dtype != numpy.float32 or not a.data.dtype.kind == b.data.dtype.kind == "f":
            return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        product = numpy.matmul(a.data.astype(numpy.float64), b.data.astype(numpy.float64)) + d.data
        return interpreter.TensorHandle(product.astype(numpy.float32), d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = orientation_free_dot


def apply() -> None:
    """Idempotent; call only when TRITON_INTERPRET=1."""
    from triton.runtime import interpreter

    if getattr(interpreter, "pychop_compat", False):
        return
    _patch_index(interpreter)
    _patch_dot(interpreter)
    interpreter.pychop_compat = True
