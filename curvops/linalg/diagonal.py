"""Diagonal operators: ``Diagonal(d)`` and ``Identity(D)``."""

from __future__ import annotations

from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from . import spectral
from .base import CurvatureOperator
from .state import NONNEGATIVE_INT, StateSchema, TensorSpec


class Diagonal(CurvatureOperator):
    """``diag(d)``: products, trace, logdet, inverse and powers are all elementwise and exact.

    ``logdet(diag(d) + λI) = Σ log(d_i + λ)``; ``(diag(d) + λI)^p = diag((d + λ)^p)`` (``p = -1``
    the inverse); the eigenvalues are ``d``. The entries are taken as exact: only an entry
    ``d_i + λ == 0`` is singular.

    Args:
        diagonal: ``[D]`` finite floating-point tensor.

    Example:
        >>> op = curvops.Diagonal(torch.tensor([1.0, 4.0]))
        >>> (op.inverse() @ torch.tensor([1.0, 1.0])).tolist()
        [1.0, 0.25]
    """

    def __init__(self, diagonal: Tensor) -> None:
        if not isinstance(diagonal, Tensor) or diagonal.ndim != 1 or not diagonal.is_floating_point():
            raise ValueError("Diagonal takes a 1-D floating-point tensor.")
        if not bool(torch.isfinite(diagonal).all()):
            raise ValueError("Diagonal entries contain NaN or inf.")
        super().__init__(diagonal.shape[0], diagonal.dtype, diagonal.device)
        self.entries = diagonal

    def _matmat(self, x: Tensor) -> Tensor:
        return self.entries.unsqueeze(1) * x

    def _to_dense(self) -> Tensor:
        return torch.diag(self.entries)

    def _diagonal(self) -> Tensor:
        return self.entries.clone()

    def _trace(self) -> Tensor:
        return self.entries.sum()

    def _logdet(self, damping: float) -> Tensor:
        return spectral.logdet_from_eigenvalues(self.entries, damping, 0.0)

    def _inverse(self, damping: float, factored: bool) -> CurvatureOperator:
        return self._power(-1.0, damping)

    def _power(self, p: float, damping: float) -> CurvatureOperator:
        return Diagonal(spectral.power_eigenvalues(self.entries, p, damping, 0.0))

    def _eigenvalues(self) -> Tensor:
        return self.entries

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"diagonal": self.entries}

    @classmethod
    def _state_schema(cls, tensors: dict[str, Any]) -> StateSchema:
        return StateSchema(tensors={"diagonal": TensorSpec((1,))})

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> Diagonal:
        return cls(tensors["diagonal"])


class Identity(Diagonal):
    """The ``D x D`` identity; stores nothing. ``op + λ * Identity(D)`` is damping.

    Args:
        size: ``D``.
        dtype: default ``torch.get_default_dtype()``.
        device: default CPU.

    Example:
        >>> eye = curvops.Identity(3, dtype=torch.float64)
        >>> eye.trace().item(), eye.logdet(damping=1.0).item() == 3 * math.log(2.0)
        (3.0, True)
    """

    def __init__(
        self, size: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, Integral):
            raise TypeError(f"Identity size must be an integer, got {size!r}.")
        if size < 0:
            raise ValueError(f"Identity size must be >= 0, got {size}.")
        dtype = dtype or torch.get_default_dtype()
        super().__init__(torch.ones((), dtype=dtype, device=device).expand(int(size)))

    def _matmat(self, x: Tensor) -> Tensor:
        return x.clone()

    def _power(self, p: float, damping: float) -> CurvatureOperator:
        return (1.0 + damping) ** p * Identity(self.shape[0], self.dtype, self.device)

    def _state_tensors(self) -> dict[str, Tensor]:
        return {}

    def _state_config(self) -> dict[str, int]:
        return {"size": self.shape[0]}

    @classmethod
    def _state_schema(cls, tensors: dict[str, Any]) -> StateSchema:
        return StateSchema(config={"size": NONNEGATIVE_INT})

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> Identity:
        return cls(config["size"], dtype, device)
