"""Precision: the dtype computations run in, and the tolerance checks of rebuilt tensors use.

- :func:`computation_dtype`: curvops accumulates and decomposes bfloat16 / float16 data in
  float32 (:meth:`~curvops.CurvatureOperator.to` and :class:`~curvops.linalg.Cast` follow it).
- :func:`converted_from`: while operators are rebuilt from tensors converted from a coarser
  dtype (``op.to(dtype=torch.float64)`` of a float32 operator), :func:`validation_eps` is that
  dtype's epsilon, so symmetry and orthonormality checks hold the tensors to the precision
  they have, and :func:`is_widened` tells constructors to restore ``dtype``'s.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

_SOURCE_EPS = contextvars.ContextVar("curvops_source_eps", default=0.0)


def computation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype curvops accumulates statistics and runs decompositions in for data of ``dtype``:
    ``dtype`` itself for float32 and float64, float32 for bfloat16 and float16.

    Example:
        >>> computation_dtype(torch.bfloat16), computation_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.promote_types(dtype, torch.float32)


def validation_eps(dtype: torch.dtype) -> float:
    """The machine epsilon that checks of a tensor's properties (symmetry, orthonormality) use.

    That of ``dtype``, or of the coarser dtype the tensor was converted from inside
    :func:`converted_from`: ``op.to(dtype=torch.float64)`` of a float32 operator keeps its
    float32 rounding, which must not fail float64's tolerance.

    Example:
        >>> with converted_from(torch.float32):
        ...     validation_eps(torch.float64) == torch.finfo(torch.float32).eps
        True
    """
    return max(torch.finfo(dtype).eps, _SOURCE_EPS.get())


def is_widened(dtype: torch.dtype) -> bool:
    """Whether tensors of ``dtype`` are being rebuilt from a coarser dtype (see
    :func:`converted_from`): their symmetry or orthonormality then holds only to the coarser
    precision, and constructors restore it to ``dtype``'s (``Kronecker`` symmetrises its
    factors, ``KroneckerEigen`` re-orthonormalises its eigenvectors), changing the matrix by
    no more than the coarser dtype's rounding.

    Example:
        >>> is_widened(torch.float64)
        False
    """
    return validation_eps(dtype) > torch.finfo(dtype).eps


@contextlib.contextmanager
def converted_from(dtype: torch.dtype) -> Iterator[None]:
    """Within this block, operators are rebuilt from tensors converted from ``dtype``
    (see :func:`validation_eps`)."""
    token = _SOURCE_EPS.set(validation_eps(dtype) if dtype.is_floating_point else _SOURCE_EPS.get())
    try:
        yield
    finally:
        _SOURCE_EPS.reset(token)
