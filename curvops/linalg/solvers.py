"""Conjugate gradients on torch tensors (batched over columns, any device), and the
``CGInverse`` operator built on it."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import ConvergenceWarning, NotPositiveDefiniteError, SingularOperatorError
from .base import CurvatureOperator
from .checks import check_damping, check_positive, check_positive_int
from .precision import computation_dtype
from .state import NONNEGATIVE_REAL, POSITIVE_INT, POSITIVE_REAL, StateSchema


def cg(
    matmat: Callable[[Tensor], Tensor],
    rhs: Tensor,
    damping: float = 0.0,
    rtol: float | None = None,
    maxiter: int | None = None,
) -> Tensor:
    """Solve ``(A + λI) X = B`` by conjugate gradients, all columns of ``B`` at once.

    Each iteration costs one product of ``A`` with a ``[D, K]`` block. Column ``k`` stops
    when ``‖B_k - (A + λI) X_k‖ <= rtol ‖B_k‖``. ``A + λI`` must be symmetric positive
    definite: a direction of negative curvature raises
    :class:`~curvops.errors.NotPositiveDefiniteError`, and one of zero curvature up to rounding
    (``|p^T (A + λI) p| <= ε D ‖A + λI‖ ‖p‖²`` with a small ``(A + λI) p``: a singular ``A + λI``,
    at the exact method's tolerance) raises :class:`~curvops.errors.SingularOperatorError`; hitting
    ``maxiter`` first issues a :class:`~curvops.errors.ConvergenceWarning` with the worst
    relative residual. A bfloat16 / float16 ``B`` is solved in float32 (the precision policy:
    products of ``A`` in ``B``'s dtype, iterates and tolerances in float32).

    Args:
        matmat: ``A``'s product with ``[D, K]`` tensors.
        rhs: ``B``, ``[D, K]``.
        damping: ``λ``.
        rtol: relative residual tolerance (default ``sqrt(eps)`` of ``B``'s dtype).
        maxiter: iteration limit (default ``10 D``).

    Example:
        >>> a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x = cg(lambda v: a @ v, torch.tensor([[1.0], [2.0]], dtype=torch.float64))
        >>> torch.allclose(a @ x, torch.tensor([[1.0], [2.0]], dtype=torch.float64))
        True
    """
    compute = computation_dtype(rhs.dtype)
    if compute != rhs.dtype:  # the precision policy: bf16 iterates would drown in rounding
        solution = cg(lambda v: matmat(v.to(rhs.dtype)).to(compute), rhs.to(compute), damping, rtol, maxiter)
        return solution.to(rhs.dtype)
    rtol = math.sqrt(torch.finfo(rhs.dtype).eps) if rtol is None else check_positive(rtol, "rtol")
    maxiter = 10 * rhs.shape[0] if maxiter is None else check_positive_int(maxiter, "maxiter")
    x = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    squared = (residual * residual).sum(0)
    target = rtol * rhs.norm(dim=0)
    largest = torch.zeros(rhs.shape[1], dtype=rhs.dtype, device=rhs.device)
    for _ in range(maxiter):
        active = squared.sqrt() > target
        if not bool(active.any()):
            return x
        product = matmat(direction) + damping * direction
        curvature = (direction * product).sum(0)
        largest[active] = _check_curvature(direction[:, active], product[:, active], largest[active], damping)
        step = torch.where(active, squared / curvature, 0)
        x = x + step * direction
        residual = residual - step * product
        new_squared = (residual * residual).sum(0)
        direction = residual + torch.where(active, new_squared / squared, 0) * direction
        squared = new_squared
    worst = (squared.sqrt() / rhs.norm(dim=0).clamp_min(torch.finfo(rhs.dtype).tiny)).max().item()
    if worst > rtol:
        warnings.warn(
            f"CG stopped after maxiter={maxiter} iterations with relative residual {worst:.3e} > "
            f"rtol={rtol:.3e}; raise maxiter or damping.",
            ConvergenceWarning,
            stacklevel=2,
        )
    return x


def _check_curvature(direction: Tensor, product: Tensor, largest: Tensor, damping: float) -> Tensor:
    """Raise where a CG direction ``p`` shows ``M = A + λI`` singular or indefinite; return the
    updated ``largest``, the running maximum of ``‖M p‖ / ‖p‖`` (a lower bound of ``‖M‖``).

    ``r = p^T M p / ‖p‖²`` within ``tol = ε D largest`` of zero (the exact eigendecomposition's
    tolerance) is zero up to rounding, and CG would divide by rounding noise (a huge,
    meaningless ``x``). For a positive semi-definite ``M`` then ``‖M p‖² <= ‖M‖ p^T M p`` is small
    too: ``M`` is singular (:class:`~curvops.errors.SingularOperatorError`). A clearly negative
    ``r``, or a zero ``r`` with a large ``‖M p‖``, means ``M`` is indefinite
    (:class:`~curvops.errors.NotPositiveDefiniteError`).
    """
    tiny = torch.finfo(direction.dtype).tiny
    norms = direction.norm(dim=0).clamp_min(tiny)
    rayleigh = (direction * product).sum(0) / norms.square()
    largest = torch.maximum(largest, product.norm(dim=0) / norms)
    eps = torch.finfo(direction.dtype).eps * direction.shape[0]
    tol = eps * largest
    flat = rayleigh.abs() <= tol
    singular = flat & (product.norm(dim=0) / norms <= 10 * math.sqrt(eps) * largest)
    if bool((rayleigh < -tol).any() or (flat & ~singular).any()):
        raise NotPositiveDefiniteError(
            f"CG met non-positive curvature p^T (op + {damping}*I) p <= 0: op + {damping}*I is not "
            "positive definite. Pass a larger damping or use method='exact'."
        )
    if bool(singular.any()):
        worst = (rayleigh.abs() / largest.clamp_min(tiny))[singular].max().item()
        raise SingularOperatorError(
            f"CG met a direction p with |p^T (op + {damping}*I) p| / ‖p‖² = {worst:.3e} times ‖op + "
            f"{damping}*I‖, zero up to rounding: op + {damping}*I is singular, so its inverse does "
            "not exist; pass damping > 0."
        )
    return largest


class CGInverse(CurvatureOperator):
    """``(op + λI)^-1`` applied by conjugate gradients: matrix-free, any operator.

    Every product runs :func:`cg` (all columns of a ``[D, K]`` input together). Other
    quantities use the generic exact paths (through products) or the estimators.

    Args:
        op: a symmetric operator with ``op + λI`` positive definite.
        damping: ``λ >= 0``.
        rtol: CG's relative residual tolerance (default ``sqrt(eps)`` of the computation dtype:
            float32's for a bf16 operator, see :func:`cg`).
        maxiter: CG's iteration limit (default ``10 D``).

    Example:
        >>> op = curvops.Dense(torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
        >>> inv = op.inverse(damping=1.0, method="cg")
        >>> torch.allclose(inv.to_dense(), op.inverse(damping=1.0).to_dense())
        True
    """

    def __init__(
        self, op: CurvatureOperator, damping: float, rtol: float | None = None, maxiter: int | None = None
    ) -> None:
        if not isinstance(op, CurvatureOperator):
            raise TypeError(f"CGInverse takes a curvops operator, got {type(op).__name__}.")
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op = op
        self.damping = check_damping(damping)
        default = math.sqrt(torch.finfo(computation_dtype(op.dtype)).eps)
        self.rtol = default if rtol is None else check_positive(rtol, "rtol")
        self.maxiter = 10 * op.shape[0] if maxiter is None else check_positive_int(maxiter, "maxiter")

    def _matmat(self, x: Tensor) -> Tensor:
        return cg(self.op._matmat, x, self.damping, self.rtol, self.maxiter)

    def _state_children(self) -> list[CurvatureOperator]:
        return [self.op]

    def _state_config(self) -> dict[str, float | int]:
        return {"damping": self.damping, "rtol": self.rtol, "maxiter": self.maxiter}

    @classmethod
    def _state_schema(cls, tensors: dict[str, Any]) -> StateSchema:
        return StateSchema(
            children=1,
            config={"damping": NONNEGATIVE_REAL, "rtol": POSITIVE_REAL, "maxiter": POSITIVE_INT},
        )

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> CGInverse:
        return cls(children[0], config["damping"], config["rtol"], config["maxiter"])
