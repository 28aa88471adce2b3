"""``Dense``: a symmetric dense matrix as an operator, the one-factor case of ``Kronecker``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import spectral
from .factor import Factor
from .kronecker import DECOMPOSITION_SETTING, Kronecker, decomposition_dtype_of, restored_factor
from .state import StateSchema, TensorSpec

_MATRIX = TensorSpec((2,), square=True)


class Dense(Kronecker):
    """A symmetric dense matrix ``M`` as an operator (a Kronecker product of one factor).

    ``logdet``, ``inverse``, ``power`` and ``eigenvalues`` go through the cached
    eigendecomposition of ``M`` (in ``decomposition_dtype``; shared with every block built on
    the same :class:`~curvops.linalg.Factor`, such as KFAC's bias block ``G`` and weight block
    ``G ⊗ A``).

    Args:
        matrix: symmetric ``[D, D]`` tensor, finite, or a :class:`~curvops.linalg.Factor` of one.
        decomposition_dtype: as for :class:`~curvops.Kronecker`.

    Example:
        >>> op = curvops.Dense(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> round(op.logdet().item(), 4), (op.inverse() @ torch.tensor([3.0, 3.0])).tolist()
        (1.0986, [1.0, 1.0])
    """

    def __init__(
        self, matrix: Tensor | Factor, decomposition_dtype: torch.dtype = spectral.EIGH_DTYPE
    ) -> None:
        tensor = matrix.matrix if isinstance(matrix, Factor) else matrix
        if isinstance(tensor, Tensor) and tensor.ndim == 1:
            raise ValueError("Dense takes a square [D, D] matrix; use Diagonal for a 1-D diagonal.")
        super().__init__(matrix, decomposition_dtype=decomposition_dtype)

    @property
    def matrix(self) -> Tensor:
        """The ``[D, D]`` matrix."""
        return self.factors[0]

    def _matmat(self, x: Tensor) -> Tensor:
        return self.matrix @ x

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"matrix": self.matrix}

    @classmethod
    def _state_schema(cls, tensors: dict[str, Any]) -> StateSchema:
        return StateSchema(tensors={"matrix": _MATRIX}, config={"decomposition_dtype": DECOMPOSITION_SETTING})

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> Dense:
        factor = restored_factor(tensors["matrix"], config)
        return cls(factor, decomposition_dtype=decomposition_dtype_of(config))
