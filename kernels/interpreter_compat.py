"""Keeps Triton's CPU interpreter (TRITON_INTERPRET=1) working with NumPy 2.4 and later.

The interpreter holds every scalar as a one-element 1-d array and turns it into a Python int with ``int()``,
which NumPy 2.4 refuses for arrays of one dimension; so ``range(0, S, BLOCK)`` over a runtime bound fails in
a kernel. ``apply()`` wraps the interpreter's tensor patching to convert with ``.item()`` instead. It changes
nothing outside the interpreter, and nothing when the interpreter already works.
"""

from __future__ import annotations

import numpy


def _needs_fix() -> bool:
    try:
        int(numpy.zeros(1, dtype=numpy.int32))
        return False
    except TypeError:
        return True


def apply() -> None:
    """Idempotent; call only when TRITON_INTERPRET=1."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "pychop_compat", False) or not _needs_fix():
        return

    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_lang_tensor.pychop_compat = True
    interpreter._patch_lang_tensor = patch_lang_tensor
