"""The memory budget for dense ``D x D`` results.

``to_dense()`` and every dense fallback (``eigenvalues``, ``logdet``, ``inverse`` and ``power``
of an operator without structure, e.g. a matrix-free :class:`~curvops.GGN`) need ``D²`` numbers:
161 GB at ``D = 203,530`` in float32. They check the size first and raise
:class:`~curvops.errors.MemoryBudgetError`, naming it, instead of starting to allocate. The
budget (default 8 GiB) is a process-wide setting, raised with :func:`set_memory_budget` or for
one block with :func:`memory_budget`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import MemoryBudgetError

DEFAULT_MEMORY_BUDGET = 8 * 2**30
_budget = DEFAULT_MEMORY_BUDGET


def get_memory_budget() -> int:
    """The budget in bytes for one dense result (default ``DEFAULT_MEMORY_BUDGET``, 8 GiB).

    Example:
        >>> get_memory_budget() == DEFAULT_MEMORY_BUDGET
        True
    """
    return _budget


def set_memory_budget(num_bytes: int | None) -> None:
    """Set the budget for one dense result to ``num_bytes`` (``None``: the default).

    Example:
        >>> set_memory_budget(2**40)  # 1 TiB, for a machine that has it
        >>> get_memory_budget()
        1099511627776
        >>> set_memory_budget(None)
    """
    global _budget
    _budget = DEFAULT_MEMORY_BUDGET if num_bytes is None else _check_bytes(num_bytes)


@contextlib.contextmanager
def memory_budget(num_bytes: int) -> Iterator[None]:
    """Within the ``with`` block the budget is ``num_bytes``; restored afterwards.

    Example:
        >>> with memory_budget(100):
        ...     try:
        ...         curvops.Identity(10).to_dense()
        ...     except curvops.MemoryBudgetError as error:
        ...         print(str(error)[:45])
        to_dense of Identity (D = 10) needs 400 B (10
    """
    global _budget
    previous, _budget = _budget, _check_bytes(num_bytes)
    try:
        yield
    finally:
        _budget = previous


def _check_bytes(num_bytes: int) -> int:
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 0:
        raise ValueError(f"The memory budget must be a number of bytes >= 0, got {num_bytes!r}.")
    return num_bytes


def _readable(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if num_bytes < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError


def check_dense(shape: tuple[int, int], dtype: torch.dtype, what: str, float64_copies: int = 0) -> None:
    """Raise :class:`~curvops.errors.MemoryBudgetError` unless a dense ``shape`` matrix of ``dtype``
    (plus ``float64_copies`` float64 matrices of that shape, e.g. for ``eigh``) fits the budget.

    Example:
        >>> check_dense((2, 2), torch.float32, "to_dense")  # 16 bytes: fine
    """
    entries = shape[0] * shape[1]
    needed = entries * (torch.empty((), dtype=dtype).element_size() + 8 * float64_copies)
    if needed > _budget:
        raise MemoryBudgetError(
            f"{what} (D = {shape[0]}) needs {_readable(needed)} ({shape[0]} x {shape[1]} {dtype} "
            f"entries{f' and {float64_copies} float64 copies' if float64_copies else ''}), over the "
            f"memory budget of {_readable(_budget)}. Use a matrix-free method (products, "
            "trace/diagonal/logdet estimators, inverse(method='cg')) or raise the budget with "
            "curvops.linalg.set_memory_budget(num_bytes) or `with curvops.linalg.memory_budget(num_bytes):`."
        )
