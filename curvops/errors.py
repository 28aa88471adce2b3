"""Exceptions and warnings raised by curvops.

Every error names what went wrong and what to do instead, so that no bad input
produces a silently wrong answer.
"""


class SingularOperatorError(ValueError):
    """An inverse was requested of an operator that is singular at the given damping.

    Pass ``damping > 0`` (the inverse of ``op + damping * I`` then exists for a PSD operator).
    """


class NotPositiveDefiniteError(ValueError):
    """A quantity that needs a positive (semi-)definite operator met a negative eigenvalue."""


class StateDictError(ValueError):
    """A state dict does not match the operator it is loaded into (type, shape or dtype)."""


class SingularOperatorWarning(RuntimeWarning):
    """``logdet`` of a singular operator with zero damping: the result is ``-inf``."""


class ConvergenceWarning(RuntimeWarning):
    """An iterative method stopped at its iteration limit before reaching its tolerance."""


class StaleParametersError(RuntimeError):
    """A model-based operator was used after a parameter or buffer of its model changed (in
    place, through ``.data``, or replaced); build a new operator."""


class NonDeterministicDataError(RuntimeError):
    """A pass over the data saw other batches than the first pass (fewer or more, other values,
    or another order where the result depends on it), or the model drew random numbers in its
    forward pass (dropout in train mode); use a fixed loader and ``model.eval()``."""


class MemoryBudgetError(MemoryError):
    """A dense ``D x D`` result would exceed the memory budget; see
    :func:`curvops.linalg.set_memory_budget`."""
