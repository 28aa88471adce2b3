"""``LanczosPower``: a matrix power ``(op + λI)^p`` applied matrix-free by the Lanczos method."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import spectral
from .base import CurvatureOperator
from .checks import check_damping, check_positive_int, check_power
from .estimators import lanczos_basis, ritz_pairs
from .state import NONNEGATIVE_REAL, POSITIVE_INT, REAL, StateSchema


class LanczosPower(CurvatureOperator):
    """``(op + λI)^p`` applied by Lanczos: ``f(A) v ≈ ‖v‖ Q f(T) e_1`` with ``f(x) = (x + λ)^p``.

    Each column ``v`` of a product runs ``k = num_steps`` Lanczos steps on ``op`` from ``v``
    (full reorthogonalisation, all columns side by side; :func:`~curvops.linalg.lanczos_basis`),
    giving an orthonormal Krylov basis ``Q`` (``[D, k]``) and the tridiagonal ``T = Q^T op Q``
    with eigenvalues ``θ`` (the Ritz values), so that ``f(op) v ≈ ‖v‖ Q f(T) e_1``. The Krylov
    space of ``op + λI`` is that of ``op``, so the damping enters only through ``f``. Each
    product costs ``k`` products with ``op`` and ``k D`` numbers of memory per column.

    The result is exact (to rounding) when the Krylov space is invariant: ``k = D``, or an
    earlier breakdown. For ``k < D`` it is an approximation whose error falls with the
    condition number of ``op + λI`` (fast for a well-damped operator); the map
    ``v -> f(op) v`` is then not exactly linear nor symmetric.

    The Ritz values follow the rules of :func:`~curvops.linalg.spectral.power_eigenvalues`
    (with the rounding tolerance ``eps k`` relative to the largest): for ``p < 0`` a Ritz value
    ``θ + λ`` that is zero raises :class:`~curvops.errors.SingularOperatorError`, and for a
    non-integer ``p`` a negative one :class:`~curvops.errors.NotPositiveDefiniteError`. They
    are raised by the product, not when the operator is built; a singular ``op`` is only
    detected where the Krylov space finds its null space, so pass ``damping > 0`` for ``p < 0``.

    Args:
        op: a symmetric operator.
        p: a finite real exponent.
        damping: ``λ >= 0``.
        num_steps: Lanczos steps per product, ``k`` (default ``min(D, 50)``).

    Example:
        >>> op = curvops.Dense(torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
        >>> root = op.power(-0.5, damping=1.0, method="lanczos")
        >>> torch.allclose(root.to_dense(), op.power(-0.5, damping=1.0).to_dense())
        True
    """

    def __init__(
        self, op: CurvatureOperator, p: float, damping: float = 0.0, num_steps: int | None = None
    ) -> None:
        if not isinstance(op, CurvatureOperator):
            raise TypeError(f"LanczosPower takes a curvops operator, got {type(op).__name__}.")
        num_steps = min(op.shape[0], 50) if num_steps is None else num_steps
        check_positive_int(num_steps, "num_steps")
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op = op
        self.p = check_power(p)
        self.damping = check_damping(damping)
        self.num_steps = num_steps

    def _matmat(self, x: Tensor) -> Tensor:
        norms = x.norm(dim=0)
        nonzero = norms > 0
        result = torch.zeros_like(x)
        if not bool(nonzero.any()):
            return result
        basis, alphas, betas, lengths = lanczos_basis(self.op._matmat, x[:, nonzero], self.num_steps)
        rtol = torch.finfo(self.dtype).eps * basis.shape[0]
        coefficients = torch.zeros(alphas.shape, dtype=torch.float64, device=self.device)
        for p, (ritz, vectors) in enumerate(ritz_pairs(alphas, betas, lengths)):
            values = spectral.power_eigenvalues(ritz, self.p, self.damping, rtol)
            coefficients[: len(ritz), p] = vectors @ (values * vectors[0])  # f(T) e_1
        columns = torch.einsum("jdp,jp->dp", basis, coefficients.to(self.dtype))
        result[:, nonzero] = columns * norms[nonzero]
        return result

    def _state_children(self) -> list[CurvatureOperator]:
        return [self.op]

    def _state_config(self) -> dict[str, float | int]:
        return {"p": self.p, "damping": self.damping, "num_steps": self.num_steps}

    @classmethod
    def _state_schema(cls, tensors: dict[str, Any]) -> StateSchema:
        return StateSchema(
            children=1, config={"p": REAL, "damping": NONNEGATIVE_REAL, "num_steps": POSITIVE_INT}
        )

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> LanczosPower:
        return cls(children[0], config["p"], config["damping"], config["num_steps"])
