"""Kronecker-structured operators: ``Kronecker`` (and ``Dense``, its one-factor case) and
``KroneckerEigen`` (a Kronecker eigenbasis with free eigenvalues, as in EKFAC).

Convention: for factors ``F_1, ..., F_k`` of sizes ``n_1, ..., n_k`` a vector of length
``D = Π n_i`` is a row-major ``[n_1, ..., n_k]`` tensor, and ``(F_1 ⊗ ... ⊗ F_k) vec(X)``
applies ``F_i`` along axis ``i``. For two factors, ``(G ⊗ A) vec(V) = vec(G V A^T)``.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from typing import Any

import opt_einsum
import torch
from torch import Tensor

from ..errors import SingularOperatorError
from . import spectral
from .base import CurvatureOperator


def check_matrix(matrix: Any, name: str, symmetric: bool) -> None:
    """Raise a clear error unless ``matrix`` is a finite, square, floating-point ``[n, n]`` tensor.

    With ``symmetric=True`` it must also equal its transpose up to ``sqrt(eps)`` relative.
    """
    if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        shape = list(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"{name} must be a square [n, n] tensor, got {shape}.")
    if not matrix.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {matrix.dtype}.")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"{name} contains NaN or inf.")
    if symmetric and matrix.numel():
        tol = math.sqrt(torch.finfo(matrix.dtype).eps) * matrix.abs().max()
        if bool((matrix - matrix.T).abs().max() > tol):
            raise ValueError(f"{name} is not symmetric; curvops operators are symmetric.")


def check_same_place(tensors: Sequence[Tensor], what: str) -> tuple[torch.dtype, torch.device]:
    """The common dtype and device of ``tensors``; a clear error if they differ."""
    dtypes = {t.dtype for t in tensors}
    devices = {t.device for t in tensors}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"All {what} must share one dtype and device, got dtypes {sorted(map(str, dtypes))} "
            f"and devices {sorted(map(str, devices))}."
        )
    return tensors[0].dtype, tensors[0].device


def mode_product(matrices: Sequence[Tensor], x: Tensor, transpose: bool = False) -> Tensor:
    """Apply ``matrices[i]`` (or its transpose) along axis ``i`` of ``x``.

    Args:
        matrices: ``k`` matrices, the ``i``-th of shape ``[m_i, n_i]``.
        x: ``[n_1, ..., n_k, ...]``; trailing axes are carried along.
        transpose: apply ``M_i^T`` instead of ``M_i``.

    Returns:
        ``[m_1, ..., m_k, ...]`` (``[n_i]`` axes when transposed).

    Example:
        >>> g, a, v = torch.randn(2, 2), torch.randn(3, 3), torch.randn(2, 3)
        >>> torch.allclose(mode_product([g, a], v), g @ v @ a.T, atol=1e-6)
        True
    """
    k = len(matrices)
    outs = [opt_einsum.get_symbol(i) for i in range(k)]
    ins = [opt_einsum.get_symbol(k + i) for i in range(k)]
    rest = "".join(opt_einsum.get_symbol(2 * k + i) for i in range(x.ndim - k))
    terms = [i + o if transpose else o + i for o, i in zip(outs, ins, strict=True)]
    expr = f"{','.join(terms)},{''.join(ins)}{rest}->{''.join(outs)}{rest}"
    return _contraction(expr, *(tuple(t.shape) for t in (*matrices, x)))(*matrices, x)


@functools.lru_cache(maxsize=256)
def _contraction(expr: str, *shapes: tuple[int, ...]) -> opt_einsum.contract.ContractExpression:
    """opt_einsum's contraction order for ``expr`` on these shapes, found once and reused."""
    return opt_einsum.contract_expression(expr, *shapes)


def _outer(vectors: Sequence[Tensor]) -> Tensor:
    """``v_1 ∘ ... ∘ v_k`` of shape ``[n_1, ..., n_k]``: the Kronecker product's eigenvalues."""
    return functools.reduce(lambda acc, v: acc.unsqueeze(-1) * v, vectors[1:], vectors[0])


class Kronecker(CurvatureOperator):
    """``F_1 ⊗ F_2 ⊗ ... ⊗ F_k`` for symmetric factors; KFAC's block is ``G ⊗ A``.

    With eigendecompositions ``F_i = Q_i diag(e_i) Q_i^T`` (computed once, in float64, and
    cached) every quantity is exact and cheap:

    - ``tr = Π tr F_i``; ``diag = ⊗ diag F_i``;
    - ``logdet(F + λI) = Σ log(e_1 ∘ ... ∘ e_k + λ)``, ``-inf`` (with a warning) for a
      singular product at ``λ = 0``;
    - ``(F + λI)^-1 = (⊗ Q_i) diag(1 / (e_1 ∘ ... ∘ e_k + λ)) (⊗ Q_i)^T`` exactly, returned as
      a :class:`KroneckerEigen`; ``factored=True`` gives the π-damped
      ``⊗_i (F_i + π_i λ^{1/k} I)^-1`` with ``π_i = (tr F_i / n_i) / (geometric mean over j)``,
      for two factors Martens & Grosse's ``(G + λ^½/π I)^-1 ⊗ (A + π λ^½ I)^-1``.

    Products cost ``O(D Σ n_i)`` instead of ``O(D²)``.

    Args:
        *factors: symmetric ``[n_i, n_i]`` tensors on one device and dtype, finite.

    Example:
        >>> g = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> a = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
        >>> op = curvops.Kronecker(g, a)
        >>> torch.allclose(op.to_dense(), torch.kron(g, a))
        True
        >>> v = torch.randn(2, 2)
        >>> torch.allclose(op @ v.flatten(), (g @ v @ a.T).flatten(), atol=1e-6)
        True
    """

    def __init__(self, *factors: Tensor) -> None:
        if not factors:
            raise ValueError("Kronecker needs at least one factor.")
        for i, factor in enumerate(factors):
            check_matrix(factor, f"{type(self).__name__} factor {i}", symmetric=True)
        dtype, device = check_same_place(factors, "Kronecker factors")
        super().__init__(math.prod(f.shape[0] for f in factors), dtype, device)
        self.factors = tuple(factors)
        self._eigen: list[tuple[Tensor, Tensor]] | None = None

    @property
    def sizes(self) -> tuple[int, ...]:
        """The factors' sizes ``(n_1, ..., n_k)``."""
        return tuple(f.shape[0] for f in self.factors)

    def eigendecompositions(self) -> list[tuple[Tensor, Tensor]]:
        """``[(e_i, Q_i)]`` with ``F_i = Q_i diag(e_i) Q_i^T``; computed once in float64, cached."""
        if self._eigen is None:
            self._eigen = [spectral.eigh(f) for f in self.factors]
        return self._eigen

    def eigenvalues(self) -> Tensor:
        """The ``D`` eigenvalues ``e_1 ∘ ... ∘ e_k`` as a ``[n_1, ..., n_k]`` tensor."""
        return _outer([e for e, _ in self.eigendecompositions()])

    def _rtol(self) -> float:
        return torch.finfo(self.dtype).eps * max(self.sizes)

    def _matmat(self, x: Tensor) -> Tensor:
        return mode_product(self.factors, x.reshape(*self.sizes, -1)).reshape(x.shape)

    def _to_dense(self) -> Tensor:
        return functools.reduce(torch.kron, self.factors)

    def _diagonal(self) -> Tensor:
        return functools.reduce(torch.kron, [f.diagonal() for f in self.factors])

    def _trace(self) -> Tensor:
        return functools.reduce(operator.mul, [f.diagonal().sum() for f in self.factors])

    def _logdet(self, damping: float) -> Tensor:
        return spectral.logdet_from_eigenvalues(self.eigenvalues().flatten(), damping, self._rtol())

    def _inverse(self, damping: float, factored: bool) -> CurvatureOperator:
        if factored and len(self.factors) > 1:
            return self._factored_inverse(damping)
        inverse = spectral.inverse_eigenvalues(self.eigenvalues(), damping, self._rtol())
        return KroneckerEigen([q for _, q in self.eigendecompositions()], inverse)

    def _factored_inverse(self, damping: float) -> Kronecker:
        mean_eigenvalues = torch.stack([f.diagonal().mean() for f in self.factors])
        if bool((mean_eigenvalues <= 0).any()):
            raise SingularOperatorError(
                "Factored (π) damping needs every Kronecker factor to have a positive trace; "
                "use factored=False for the exact damped inverse."
            )
        pis = mean_eigenvalues / mean_eigenvalues.log().mean().exp()
        strength = damping ** (1.0 / len(self.factors))
        inverses = []
        for (e, q), pi in zip(self.eigendecompositions(), pis, strict=True):
            inverse = spectral.inverse_eigenvalues(e, strength * pi, self._rtol())
            matrix = (q * inverse) @ q.T
            inverses.append(0.5 * (matrix + matrix.T))
        return Kronecker(*inverses)

    def _state_tensors(self) -> dict[str, Tensor]:
        return {f"factor{i}": f for i, f in enumerate(self.factors)}

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> Kronecker:
        return cls(*(tensors[f"factor{i}"] for i in range(len(tensors))))


class Dense(Kronecker):
    """A symmetric dense matrix ``M`` as an operator (a Kronecker product of one factor).

    ``logdet`` and ``inverse`` go through the cached eigendecomposition of ``M`` (float64).

    Args:
        matrix: symmetric ``[D, D]`` tensor, finite.

    Example:
        >>> op = curvops.Dense(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> round(op.logdet().item(), 4), (op.inverse() @ torch.tensor([3.0, 3.0])).tolist()
        (1.0986, [1.0, 1.0])
    """

    def __init__(self, matrix: Tensor) -> None:
        super().__init__(matrix)

    @property
    def matrix(self) -> Tensor:
        """The ``[D, D]`` matrix."""
        return self.factors[0]

    def _matmat(self, x: Tensor) -> Tensor:
        return self.matrix @ x

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"matrix": self.matrix}

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> Dense:
        return cls(tensors["matrix"])


class KroneckerEigen(CurvatureOperator):
    """``(Q_1 ⊗ ... ⊗ Q_k) diag(vec s) (Q_1 ⊗ ... ⊗ Q_k)^T`` for orthonormal ``Q_i``.

    EKFAC's block: the KFAC eigenbasis ``Q_G ⊗ Q_A`` with corrected eigenvalues ``s``. Since
    the eigenvalues are explicit, every quantity is exact:
    ``tr = Σ s``, ``logdet(· + λI) = Σ log(s + λ)`` and
    ``(· + λI)^-1 = KroneckerEigen(Q, 1 / (s + λ))``.

    Args:
        eigenvectors: orthonormal ``[n_i, n_i]`` tensors (checked to ``sqrt(eps n_i)``).
        eigenvalues: ``D = Π n_i`` finite values, of shape ``[n_1, ..., n_k]`` or ``[D]``
            (row-major). ``logdet`` needs them non-negative.

    Example:
        >>> q = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
        >>> op = curvops.KroneckerEigen([q, torch.eye(2)], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> op.trace().item(), round(op.logdet().item(), 4)  # log(1 * 2 * 3 * 4)
        (10.0, 3.1781)
    """

    def __init__(self, eigenvectors: Sequence[Tensor], eigenvalues: Tensor) -> None:
        eigenvectors = tuple(eigenvectors)
        if not eigenvectors:
            raise ValueError("KroneckerEigen needs at least one eigenvector matrix.")
        for i, q in enumerate(eigenvectors):
            check_matrix(q, f"KroneckerEigen eigenvectors[{i}]", symmetric=False)
            eye = torch.eye(q.shape[0], dtype=q.dtype, device=q.device)
            tol = math.sqrt(torch.finfo(q.dtype).eps * max(q.shape[0], 1))
            if q.numel() and bool((q.T @ q - eye).abs().max() > tol):
                raise ValueError(f"KroneckerEigen eigenvectors[{i}] is not orthonormal (Q^T Q != I).")
        dtype, device = check_same_place([*eigenvectors, eigenvalues], "eigenvectors and eigenvalues")
        sizes = tuple(q.shape[0] for q in eigenvectors)
        if eigenvalues.numel() != math.prod(sizes) or eigenvalues.shape not in ((math.prod(sizes),), sizes):
            raise ValueError(
                f"eigenvalues must have shape {list(sizes)} or [{math.prod(sizes)}] to match the "
                f"eigenvectors, got {list(eigenvalues.shape)}."
            )
        if not bool(torch.isfinite(eigenvalues).all()):
            raise ValueError("KroneckerEigen eigenvalues contain NaN or inf.")
        super().__init__(math.prod(sizes), dtype, device)
        self.eigenvectors = eigenvectors
        self.eigenvalues = eigenvalues.reshape(sizes)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The eigenbasis factors' sizes ``(n_1, ..., n_k)``."""
        return tuple(q.shape[0] for q in self.eigenvectors)

    def _matmat(self, x: Tensor) -> Tensor:
        rotated = mode_product(self.eigenvectors, x.reshape(*self.sizes, -1), transpose=True)
        return mode_product(self.eigenvectors, rotated * self.eigenvalues.unsqueeze(-1)).reshape(x.shape)

    def _to_dense(self) -> Tensor:
        basis = functools.reduce(torch.kron, self.eigenvectors)
        return (basis * self.eigenvalues.flatten()) @ basis.T

    def _diagonal(self) -> Tensor:
        return mode_product([q.square() for q in self.eigenvectors], self.eigenvalues).flatten()

    def _trace(self) -> Tensor:
        return self.eigenvalues.sum()

    def _logdet(self, damping: float) -> Tensor:
        return spectral.logdet_from_eigenvalues(self.eigenvalues.flatten(), damping, 0.0)

    def _inverse(self, damping: float, factored: bool) -> KroneckerEigen:
        return KroneckerEigen(self.eigenvectors, spectral.inverse_eigenvalues(self.eigenvalues, damping, 0.0))

    def _state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"eigenvectors{i}": q for i, q in enumerate(self.eigenvectors)}
        return {**tensors, "eigenvalues": self.eigenvalues}

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> KroneckerEigen:
        count = len(tensors) - 1
        return cls([tensors[f"eigenvectors{i}"] for i in range(count)], tensors["eigenvalues"])
