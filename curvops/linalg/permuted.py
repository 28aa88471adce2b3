"""``Permuted``: an operator seen through a reordering of its coordinates."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import CurvatureOperator
from .state import StateSchema, TensorSpec

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class Permuted(CurvatureOperator):
    """``M = P op P^T``: the operator ``op`` on a vector laid out in another order.

    ``permutation`` says where each of ``op``'s coordinates sits in ``M``'s vector: ``op``'s
    coordinate ``j`` is ``M``'s coordinate ``perm[j]``, so ``op`` sees ``x[perm]``. With
    ``P = I[:, perm]`` (``P^T x = x[perm]``) and ``inv = argsort(perm)``:

    - ``y = M @ x`` is ``y[perm] = op @ x[perm]``, i.e. ``y = (op @ x[perm])[inv]``;
    - ``M = op.to_dense()[inv][:, inv]``, i.e. ``M[perm][:, perm] = op.to_dense()``;
    - ``diag M = (diag op)[inv]``.

    A KFAC block's Kronecker layout is ``vec([W b])``, while a model's flat parameter vector
    is ``[vec(W), b]``; ``perm`` lists, in the block's order, the indices of the parameter
    vector, and ``Permuted(block, perm)`` is the block on the parameter vector.

    A similarity transform by a permutation changes no eigenvalue, so every quantity stays
    exact through ``op``'s structure: ``tr M = tr op``, ``logdet(M + λI) = logdet(op + λI)``,
    the eigenvalues are ``op``'s, ``(M + λI)^p = Permuted((op + λI)^p, perm)`` and
    ``(M + λI)^-1 = Permuted((op + λI)^-1, perm)`` (``factored`` passed on to ``op``).
    ``Permuted(Permuted(op, p), q)`` is built as the single ``Permuted(op, q[p])``.

    Args:
        op: the operator ``op``, of size ``D``.
        permutation: 1-D integer tensor holding each of ``0, ..., D-1`` once, on ``op``'s
            device (stored as int64).

    Example:
        >>> op = curvops.Diagonal(torch.tensor([1.0, 2.0, 3.0]))
        >>> perm = torch.tensor([2, 0, 1])  # op's coordinates 0, 1, 2 are M's 2, 0, 1
        >>> m = curvops.Permuted(op, perm)
        >>> m.diagonal().tolist(), (m @ torch.tensor([1.0, 10.0, 100.0])).tolist()
        ([2.0, 3.0, 1.0], [2.0, 30.0, 100.0])
        >>> torch.equal(m.to_dense()[perm][:, perm], op.to_dense())
        True
    """

    def __init__(self, op: CurvatureOperator, permutation: Tensor) -> None:
        if not isinstance(op, CurvatureOperator):
            raise TypeError(f"Permuted takes a curvops operator, got {type(op).__name__}.")
        size = op.shape[0]
        if not isinstance(permutation, Tensor) or permutation.ndim != 1 or permutation.shape[0] != size:
            shape = list(permutation.shape) if isinstance(permutation, Tensor) else type(permutation).__name__
            raise ValueError(f"Permuted needs a 1-D permutation of length {size}, got {shape}.")
        if permutation.dtype not in _INTEGER_DTYPES:
            raise ValueError(f"Permuted needs an integer permutation, got dtype {permutation.dtype}.")
        if permutation.device != op.device:
            raise ValueError(
                f"The permutation is on {permutation.device} but the operator is on {op.device}."
            )
        permutation = permutation.to(torch.int64)
        if not torch.equal(permutation.sort().values, torch.arange(size, device=op.device)):
            raise ValueError(f"Permuted's permutation must hold each of 0, ..., {size - 1} exactly once.")
        if isinstance(op, Permuted):
            op, permutation = op.op, permutation[op.permutation]
        super().__init__(size, op.dtype, op.device)
        self.op = op
        self.permutation = permutation
        self.inverse_permutation = permutation.argsort()
        self._inverse_method = op._inverse_method
        self._logdet_method = op._logdet_method
        self._power_method = op._power_method

    def _matmat(self, x: Tensor) -> Tensor:
        return self.op._matmat(x[self.permutation])[self.inverse_permutation]

    def _to_dense(self) -> Tensor:
        inv = self.inverse_permutation
        return self.op._to_dense()[inv][:, inv]

    def _diagonal(self) -> Tensor:
        return self.op._diagonal()[self.inverse_permutation]

    def _trace(self) -> Tensor:
        return self.op._trace()

    def _logdet(self, damping: float) -> Tensor:
        return self.op._logdet(damping)

    def _inverse(self, damping: float, factored: bool) -> Permuted:
        return Permuted(self.op._inverse(damping, factored), self.permutation)

    def _power(self, p: float, damping: float) -> Permuted:
        return Permuted(self.op._power(p, damping), self.permutation)

    def _eigenvalues(self) -> Tensor:
        return self.op._eigenvalues()

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"permutation": self.permutation}

    def _state_children(self) -> list[CurvatureOperator]:
        return [self.op]

    @classmethod
    def _state_schema(cls, tensors: dict[str, Any]) -> StateSchema:
        return StateSchema(tensors={"permutation": TensorSpec((1,), integer=True)}, children=1)

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> Permuted:
        return cls(children[0], tensors["permutation"])
