"""pychop.memory: less memory for the frozen parts of a model being fine-tuned.

- ``lean_frozen(module, *, recompute=False) -> LeanFrozen``: frozen convolutions keep only their weight, frozen
  GEGLUs only their input, frozen cross-attention one copy of the text's keys and values per video; with
  ``recompute=True`` frozen regions are recomputed in the backward. Exact; ``handle.remove()`` undoes it.
- ``recomputed(fn, args, kwargs)``: a call whose backward runs it again, keeping only its inputs.
"""

from pychop.memory.lean import LeanFrozen, frozen_regions, lean_frozen
from pychop.memory.recompute import recomputed

__all__ = ["lean_frozen", "LeanFrozen", "frozen_regions", "recomputed"]
