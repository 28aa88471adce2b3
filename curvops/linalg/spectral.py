"""Spectral helpers shared by every operator that knows its eigenvalues.

One place decides when an eigenvalue counts as zero, when ``logdet`` is ``-inf`` and
when an inverse does not exist, so all structured operators answer these alike.
"""

import warnings

import torch
from torch import Tensor

from ..errors import NotPositiveDefiniteError, SingularOperatorError, SingularOperatorWarning


def eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition ``matrix = Q diag(e) Q^T`` of a symmetric matrix.

    The decomposition runs in float64 (for accuracy on float32 and lower inputs) and is
    cast back to the input's dtype.

    Args:
        matrix: symmetric ``[n, n]``.

    Returns:
        ``(e, Q)`` with ``e`` of shape ``[n]`` ascending and ``Q`` of shape ``[n, n]``.

    Example:
        >>> e, q = eigh(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        >>> e.tolist()
        [1.0, 2.0]
    """
    e, q = torch.linalg.eigh(matrix.to(torch.float64))
    return e.to(matrix.dtype), q.to(matrix.dtype)


def eigenvalue_tolerance(eigenvalues: Tensor, rtol: float, scale: float | None = None) -> Tensor:
    """Threshold ``rtol * scale`` under which a (damped) eigenvalue counts as zero.

    ``scale`` is the size of the numbers whose rounding errors the eigenvalues carry;
    by default ``max|e|``.
    """
    if scale is not None:
        return eigenvalues.new_tensor(rtol * scale)
    if eigenvalues.numel() == 0:
        return eigenvalues.new_zeros(())
    return rtol * eigenvalues.abs().max()


def logdet_from_eigenvalues(
    eigenvalues: Tensor, damping: float, rtol: float, scale: float | None = None
) -> Tensor:
    """``Σ_i log(e_i + λ)`` for the eigenvalues ``e`` of a positive semi-definite operator.

    Eigenvalues within ``rtol * scale`` (default ``scale = max|e + λ|``) of zero count as
    zero: the operator is singular, a :class:`~curvops.errors.SingularOperatorWarning` is
    issued and ``-inf`` returned.
    A clearly negative eigenvalue raises :class:`~curvops.errors.NotPositiveDefiniteError`.
    The sum is accumulated in float64 and returned in the eigenvalues' dtype.

    Example:
        >>> round(logdet_from_eigenvalues(torch.tensor([1.0, 3.0]), 1.0, 0.0).item(), 4)  # log 8
        2.0794
    """
    values = eigenvalues.to(torch.float64) + damping
    tol = eigenvalue_tolerance(values, rtol, scale)
    if bool((values < -tol).any()):
        raise NotPositiveDefiniteError(
            f"logdet needs a positive semi-definite operator, but an eigenvalue of op + {damping}*I "
            f"is {values.min().item():.3e}; logdet is undefined (use a larger damping)."
        )
    if bool((values <= tol).any()):
        warnings.warn(
            "logdet of a singular operator with damping=0 is -inf; pass damping > 0 "
            "for a finite, exact log-determinant of op + damping*I.",
            SingularOperatorWarning,
            stacklevel=3,
        )
        return torch.tensor(-torch.inf, dtype=eigenvalues.dtype, device=eigenvalues.device)
    return values.log().sum().to(eigenvalues.dtype)


def inverse_eigenvalues(
    eigenvalues: Tensor, damping: float, rtol: float, scale: float | None = None
) -> Tensor:
    """``1 / (e + λ)``, raising :class:`~curvops.errors.SingularOperatorError` at a zero.

    An eigenvalue ``e + λ`` within ``rtol * scale`` (default ``max|e + λ|``) of zero means ``op + λI`` is
    singular; the error says to pass ``damping > 0``.

    Example:
        >>> inverse_eigenvalues(torch.tensor([1.0, 3.0]), 1.0, 0.0).tolist()
        [0.5, 0.25]
    """
    values = eigenvalues + damping
    tol = eigenvalue_tolerance(values, rtol, scale)
    if bool((values.abs() <= tol).any()):
        raise SingularOperatorError(
            f"op + {damping}*I is singular (an eigenvalue is {values.abs().min().item():.3e}), "
            "so its inverse does not exist; pass damping > 0."
        )
    return values.reciprocal()
