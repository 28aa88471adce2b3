"""``LowRankUpdate``: an operator plus or minus ``U U^T``, inverted by Woodbury."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..errors import NotPositiveDefiniteError, SingularOperatorError
from . import spectral
from .base import CurvatureOperator
from .state import SIGN, StateSchema, TensorSpec


class LowRankUpdate(CurvatureOperator):
    """``M ± U U^T`` for an operator ``M`` and ``U`` of shape ``[D, k]``.

    Adds or removes data without recomputing anything, e.g. one datum's gradient outer
    product ``g g^T`` from an empirical Fisher. With ``M_λ = M + λI``, ``W = M_λ^-1 U`` and the
    ``k x k`` capacitance ``C = I ± U^T W``:

    - inverse (Woodbury / Sherman-Morrison): ``(M_λ ± U U^T)^-1 = M_λ^-1 ∓ W C^-1 W^T``,
      returned as another ``LowRankUpdate`` of ``M_λ^-1`` (using ``M``'s own exact inverse);
    - logdet (matrix determinant lemma): ``logdet(M_λ ± U U^T) = logdet M_λ + logdet C``.

    Both cost ``k`` products with ``M_λ^-1`` and a ``k x k`` eigendecomposition. Where ``M_λ``
    itself is singular or indefinite they fall back to the dense matrix. A ``C`` with a zero
    eigenvalue (the update made the operator singular) raises
    :class:`~curvops.errors.SingularOperatorError` for ``inverse`` and gives ``-inf`` for ``logdet``.

    Args:
        base: the operator ``M``.
        factors: ``U``, ``[D, k]`` (or ``[D]`` for ``k = 1``), on ``M``'s dtype and device.
        sign: ``+1`` for ``M + U U^T``, ``-1`` for ``M - U U^T``.

    Example:
        >>> m = curvops.Identity(2, dtype=torch.float64)
        >>> u = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> op = curvops.LowRankUpdate(m, u)  # [[2, 1], [1, 2]]
        >>> (op.inverse() @ torch.tensor([3.0, 3.0], dtype=torch.float64)).tolist()
        [1.0, 1.0]
        >>> round(op.logdet().item(), 6) == round(math.log(3.0), 6)
        True
    """

    def __init__(self, base: CurvatureOperator, factors: Tensor, sign: float = 1.0) -> None:
        if not isinstance(base, CurvatureOperator):
            raise TypeError(f"LowRankUpdate's base must be a curvops operator, got {type(base).__name__}.")
        if not isinstance(factors, Tensor) or factors.ndim not in (1, 2) or factors.shape[0] != base.shape[0]:
            shape = list(factors.shape) if isinstance(factors, Tensor) else type(factors).__name__
            raise ValueError(f"LowRankUpdate factors must have shape [{base.shape[0]}, k], got {shape}.")
        if factors.ndim == 1:
            factors = factors.unsqueeze(1)
        if factors.dtype != base.dtype or factors.device != base.device:
            raise ValueError(
                f"LowRankUpdate factors ({factors.dtype}, {factors.device}) must match the base "
                f"operator ({base.dtype}, {base.device})."
            )
        if not bool(factors.isfinite().all()):
            raise ValueError("LowRankUpdate factors contain NaN or inf.")
        if isinstance(sign, bool) or sign not in (1, -1):
            raise ValueError(f"LowRankUpdate sign must be +1 or -1, got {sign}.")
        super().__init__(base.shape[0], base.dtype, base.device)
        self.base = base
        self.factors = factors
        self.sign = float(sign)

    def _matmat(self, x: Tensor) -> Tensor:
        return self.base._matmat(x) + self.sign * (self.factors @ (self.factors.T @ x))

    def _to_dense(self) -> Tensor:
        return self.base._to_dense() + self.sign * (self.factors @ self.factors.T)

    def _diagonal(self) -> Tensor:
        return self.base._diagonal() + self.sign * self.factors.square().sum(1)

    def _trace(self) -> Tensor:
        return self.base._trace() + self.sign * self.factors.square().sum()

    def _capacitance(
        self, damping: float, factored: bool
    ) -> tuple[CurvatureOperator, Tensor, Tensor, Tensor]:
        """``(M_λ^-1, W, c, V)`` with ``±C = I ± U^T W = V diag(c) V^T`` positive at a valid update."""
        base_inverse = self.base._inverse(damping, factored)
        w = base_inverse._matmat(self.factors)
        gram = self.factors.T @ w
        capacitance = self.sign * 0.5 * (gram + gram.T)
        capacitance.diagonal().add_(1.0)
        c, v = spectral.eigh(capacitance)
        return base_inverse, w, c, v

    def _capacitance_scale(self, c: Tensor) -> float:
        """Size of the terms ``I`` and ``U^T W`` that cancel in ``C``: the scale of its rounding."""
        return 1.0 + (c - 1.0).abs().max().item()

    def _logdet(self, damping: float) -> Tensor:
        try:
            _, _, c, _ = self._capacitance(damping, factored=False)
            base_logdet = self.base._logdet(damping)
        except (SingularOperatorError, NotPositiveDefiniteError):
            return super()._logdet(damping)
        scale = self._capacitance_scale(c)
        return base_logdet + spectral.logdet_from_eigenvalues(c, 0.0, self._rtol(), scale)

    def _inverse(self, damping: float, factored: bool) -> CurvatureOperator:
        try:
            base_inverse, w, c, v = self._capacitance(damping, factored)
        except SingularOperatorError:
            return super()._inverse(damping, factored)
        inverse_c = spectral.inverse_eigenvalues(c, 0.0, self._rtol(), self._capacitance_scale(c))
        if bool((inverse_c < 0).any()):
            return super()._inverse(damping, factored)
        return LowRankUpdate(base_inverse, (w @ v) * inverse_c.sqrt(), -self.sign)

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"factors": self.factors}

    def _state_children(self) -> list[CurvatureOperator]:
        return [self.base]

    def _state_config(self) -> dict[str, float]:
        return {"sign": self.sign}

    @classmethod
    def _state_schema(cls, tensors: dict[str, Any]) -> StateSchema:
        return StateSchema(tensors={"factors": TensorSpec((2,))}, children=1, config={"sign": SIGN})

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> LowRankUpdate:
        return cls(children[0], tensors["factors"], config["sign"])
