"""Kronecker-structured operators: ``Kronecker`` (and ``Dense``, its one-factor case) and
``KroneckerEigen`` (a Kronecker eigenbasis with free eigenvalues, as in EKFAC).

Convention: for factors ``F_1, ..., F_k`` of sizes ``n_1, ..., n_k`` a vector of length
``D = Π n_i`` is a row-major ``[n_1, ..., n_k]`` tensor, and ``(F_1 ⊗ ... ⊗ F_k) vec(X)``
applies ``F_i`` along axis ``i``. For two factors, ``(G ⊗ A) vec(V) = vec(G V A^T)``.
A factor given as a 1-D tensor ``d`` is the diagonal matrix ``diag(d)``: it scales axis ``i``
elementwise and is never materialised as an ``[n_i, n_i]`` matrix (except by ``to_dense``).
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
from .base import CurvatureOperator, is_widened, validation_eps
from .state import StateSchema, TensorSpec

_MATRIX = TensorSpec((2,), square=True)
_FACTOR = TensorSpec((1, 2), square=True)


def check_matrix(matrix: Any, name: str, symmetric: bool, allow_diagonal: bool = False) -> None:
    """Raise a clear error unless ``matrix`` is a finite, square, floating-point ``[n, n]`` tensor.

    With ``symmetric=True`` it must also equal its transpose up to ``sqrt(eps)`` relative
    (``eps`` of its dtype, or of the dtype it was converted from: see
    :func:`~curvops.linalg.base.validation_eps`).
    With ``allow_diagonal=True`` a finite floating-point 1-D ``[n]`` tensor (the diagonal of a
    diagonal matrix, symmetric by construction) passes too.
    """
    vector = allow_diagonal and isinstance(matrix, Tensor) and matrix.ndim == 1
    if not vector and (
        not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]
    ):
        shape = list(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        expected = "a square [n, n] tensor" + (" or a 1-D [n] diagonal" if allow_diagonal else "")
        raise ValueError(f"{name} must be {expected}, got {shape}.")
    if not matrix.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {matrix.dtype}.")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"{name} contains NaN or inf.")
    if symmetric and not vector and matrix.numel():
        tol = math.sqrt(validation_eps(matrix.dtype)) * matrix.abs().max()
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


def mode_product(matrices: Sequence[Tensor | None], x: Tensor, transpose: bool = False) -> Tensor:
    """Apply ``matrices[i]`` (or its transpose) along axis ``i`` of ``x``.

    The dense matrices go through one opt_einsum contraction (its order found once per
    shapes and cached); a 1-D entry ``d`` is ``diag(d)`` and scales axis ``i`` elementwise, and
    ``None`` is the identity, so neither is ever materialised as a matrix.

    Args:
        matrices: ``k`` entries: ``[m_i, n_i]`` matrices, ``[n_i]`` diagonals or ``None``.
        x: ``[n_1, ..., n_k, ...]``; trailing axes are carried along.
        transpose: apply ``M_i^T`` instead of ``M_i``.

    Returns:
        ``[m_1, ..., m_k, ...]`` (``[n_i]`` axes when transposed).

    Example:
        >>> g, a, v = torch.randn(2, 2), torch.randn(3, 3), torch.randn(2, 3)
        >>> torch.allclose(mode_product([g, a], v), g @ v @ a.T, atol=1e-6)
        True
        >>> d = torch.tensor([1.0, 2.0, 3.0])
        >>> torch.allclose(mode_product([g, d], v), g @ v @ torch.diag(d), atol=1e-6)
        True
    """
    for axis, m in enumerate(matrices):
        if m is not None and m.ndim == 1:
            x = x * m.reshape(-1, *[1] * (x.ndim - axis - 1))
    dense = [(axis, m) for axis, m in enumerate(matrices) if m is not None and m.ndim == 2]
    if not dense:
        return x
    symbols = [opt_einsum.get_symbol(i) for i in range(x.ndim)]
    outs = list(symbols)
    terms = []
    for axis, _ in dense:
        outs[axis] = opt_einsum.get_symbol(x.ndim + axis)
        terms.append(symbols[axis] + outs[axis] if transpose else outs[axis] + symbols[axis])
    expr = f"{','.join(terms)},{''.join(symbols)}->{''.join(outs)}"
    matrices = [m for _, m in dense]
    return _contraction(expr, *(tuple(t.shape) for t in (*matrices, x)))(*matrices, x)


@functools.lru_cache(maxsize=256)
def _contraction(expr: str, *shapes: tuple[int, ...]) -> opt_einsum.contract.ContractExpression:
    """opt_einsum's contraction order for ``expr`` on these shapes, found once and reused."""
    return opt_einsum.contract_expression(expr, *shapes)


def _kron(matrices: Sequence[Tensor]) -> Tensor:
    """``M_1 ⊗ ... ⊗ M_k`` (``torch.kron`` on contiguous copies: it fails on some mixed strides)."""
    return functools.reduce(torch.kron, [m.contiguous() for m in matrices])


def _outer(vectors: Sequence[Tensor]) -> Tensor:
    """``v_1 ∘ ... ∘ v_k`` of shape ``[n_1, ..., n_k]``: the Kronecker product's eigenvalues."""
    return functools.reduce(lambda acc, v: acc.unsqueeze(-1) * v, vectors[1:], vectors[0])


def _rounding_bound(factor: Tensor, e: Tensor, q: Tensor) -> Tensor:
    """``ε n |q_j|^T |F| |q_j| + ε_64 n max|e|`` per eigenpair ``(e_j, q_j)`` of ``F``: see
    :meth:`Kronecker._factor_noise`."""
    n = factor.shape[0]
    entries = torch.finfo(factor.dtype).eps * n * ((factor.abs() @ q.abs()) * q.abs()).sum(0)
    return entries + spectral.EIGH_EPS * n * e.abs().max()


def _orthonormalised(q: Tensor) -> Tensor:
    """The orthonormal matrix nearest ``q`` column by column (QR with ``diag(R) > 0``)."""
    basis, r = torch.linalg.qr(q)
    return basis * torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)


def _factor_diagonal(factor: Tensor) -> Tensor:
    """The diagonal of a factor: the factor itself if it is 1-D, else its matrix diagonal."""
    return factor if factor.ndim == 1 else factor.diagonal()


class Kronecker(CurvatureOperator):
    """``F_1 ⊗ F_2 ⊗ ... ⊗ F_k`` for symmetric factors; KFAC's block is ``G ⊗ A``.

    With eigendecompositions ``F_i = Q_i diag(e_i) Q_i^T`` (computed once, in float64, and
    cached) every quantity is exact and cheap. The factors are taken as the exact matrices:
    an eigenvalue counts as zero only within the bound that rounding of the factor's entries
    puts on it (see :meth:`_factor_noise`), so a diagonal matrix stored as a dense factor gives
    the same answers as :class:`~curvops.Diagonal`.

    - ``tr = Π tr F_i``; ``diag = ⊗ diag F_i``;
    - ``logdet(F + λI) = Σ log(e_1 ∘ ... ∘ e_k + λ)``, ``-inf`` (with a warning) for a
      singular product at ``λ = 0``;
    - ``(F + λI)^p = (⊗ Q_i) diag((e_1 ∘ ... ∘ e_k + λ)^p) (⊗ Q_i)^T`` exactly, returned as a
      :class:`KroneckerEigen` (``p = -1`` is the inverse);
    - the inverse's ``factored=True`` gives the π-damped
      ``⊗_i (F_i + π_i λ^{1/k} I)^-1`` with ``π_i = (tr F_i / n_i) / (geometric mean over j)``,
      for two factors Martens & Grosse's ``(G + λ^½/π I)^-1 ⊗ (A + π λ^½ I)^-1``.

    A factor may be a 1-D tensor ``d``, meaning ``diag(d)`` (e.g. the input factor of an
    ``nn.Embedding``, of the vocabulary's size). It is never materialised as a matrix except
    by ``to_dense``: products scale its axis elementwise, its eigenvalues are ``d`` itself
    (exact, in ``d``'s order) with identity eigenvectors, represented by ``None`` (see
    :meth:`eigendecompositions`), and its factored damped inverse is again diagonal.

    Products cost ``O(D Σ n_i)`` over the dense factors instead of ``O(D²)``.

    Args:
        *factors: on one device and dtype, finite, floating point: symmetric ``[n_i, n_i]``
            matrices or 1-D ``[n_i]`` diagonals.

    Example:
        >>> g = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
        >>> a = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
        >>> op = curvops.Kronecker(g, a)
        >>> torch.allclose(op.to_dense(), torch.kron(g, a))
        True
        >>> v = torch.randn(2, 2)
        >>> torch.allclose(op @ v.flatten(), (g @ v @ a.T).flatten(), atol=1e-6)
        True
        >>> diagonal = curvops.Kronecker(g, torch.tensor([1.0, 3.0]))  # the same operator
        >>> torch.allclose(diagonal @ v.flatten(), op @ v.flatten(), atol=1e-6)
        True
    """

    def __init__(self, *factors: Tensor) -> None:
        if not factors:
            raise ValueError("Kronecker needs at least one factor.")
        for i, factor in enumerate(factors):
            check_matrix(factor, f"{type(self).__name__} factor {i}", symmetric=True, allow_diagonal=True)
        dtype, device = check_same_place(factors, "Kronecker factors")
        if is_widened(dtype):  # converted from a coarser dtype: symmetric to its precision only
            factors = [f if f.ndim == 1 else 0.5 * (f + f.T) for f in factors]
        super().__init__(math.prod(f.shape[0] for f in factors), dtype, device)
        self.factors = tuple(factors)
        self._eigen: list[tuple[Tensor, Tensor | None]] | None = None
        self._noise: list[Tensor] | None = None

    @property
    def sizes(self) -> tuple[int, ...]:
        """The factors' sizes ``(n_1, ..., n_k)``."""
        return tuple(f.shape[0] for f in self.factors)

    def eigendecompositions(self) -> list[tuple[Tensor, Tensor | None]]:
        """``[(e_i, Q_i)]`` with ``F_i = Q_i diag(e_i) Q_i^T``; computed once in float64, cached.

        A diagonal (1-D) factor ``d`` gives ``(d, None)``: its eigenvalues are its entries, in
        their order, and ``None`` stands for the identity eigenvectors, which are never built.
        """
        if self._eigen is None:
            self._eigen = [(f, None) if f.ndim == 1 else spectral.eigh(f) for f in self.factors]
        return self._eigen

    def _spectrum(self) -> Tensor:
        """The ``D`` eigenvalues ``e_1 ∘ ... ∘ e_k``, ``[n_1, ..., n_k]``, in the eigenbasis' order."""
        return _outer([e for e, _ in self.eigendecompositions()])

    def _eigenvalues(self) -> Tensor:
        return self._spectrum().flatten()

    def _factor_noise(self) -> list[Tensor]:
        """Per factor, per eigenvalue ``e_ij``: how far rounding can have moved it, ``t_ij``.

        A factor's entries carry rounding errors ``|δF| <= ε n |F|`` (``ε`` of its dtype); to first
        order they move ``e_ij`` by ``|q_j^T δF q_j| <= ε n |q_j|^T |F| |q_j|``, and ``eigh`` (in
        float64) adds ``ε_64 n max|e_i|``. So a small eigenvalue of a dense, well-mixed factor is
        noise, while that of a diagonal matrix (``|q_j|^T |F| |q_j| = |e_ij|``) is resolved to its
        dtype's relative precision, as :class:`~curvops.Diagonal` takes it. A 1-D (diagonal)
        factor is exact: ``t = 0``.
        """
        if self._noise is None:
            self._noise = [
                torch.zeros_like(e) if q is None else _rounding_bound(f, e, q)
                for f, (e, q) in zip(self.factors, self.eigendecompositions(), strict=True)
            ]
        return self._noise

    def _spectrum_noise(self) -> Tensor:
        """``Π_i (|e_i| + t_i) - Π_i |e_i|``: how far the product's eigenvalues can have moved."""
        eigen, noise = self.eigendecompositions(), self._factor_noise()
        widened = _outer([e.abs() + t for (e, _), t in zip(eigen, noise, strict=True)])
        return widened - _outer([e.abs() for e, _ in eigen])

    def _matmat(self, x: Tensor) -> Tensor:
        return mode_product(self.factors, x.reshape(*self.sizes, -1)).reshape(x.shape)

    def _to_dense(self) -> Tensor:
        return _kron([torch.diag(f) if f.ndim == 1 else f for f in self.factors])

    def _diagonal(self) -> Tensor:
        return _kron([_factor_diagonal(f) for f in self.factors])

    def _trace(self) -> Tensor:
        return functools.reduce(operator.mul, [_factor_diagonal(f).sum() for f in self.factors])

    def _logdet(self, damping: float) -> Tensor:
        return spectral.logdet_from_eigenvalues(
            self._spectrum().flatten(), damping, 1.0, self._spectrum_noise().flatten()
        )

    def _inverse(self, damping: float, factored: bool) -> CurvatureOperator:
        if factored and len(self.factors) > 1:
            return self._factored_inverse(damping)
        return self._power(-1.0, damping)

    def _power(self, p: float, damping: float) -> KroneckerEigen:
        values = spectral.power_eigenvalues(self._spectrum(), p, damping, 1.0, self._spectrum_noise())
        return KroneckerEigen([q for _, q in self.eigendecompositions()], values)

    def _factored_inverse(self, damping: float) -> Kronecker:
        mean_eigenvalues = torch.stack([_factor_diagonal(f).mean() for f in self.factors])
        if bool((mean_eigenvalues <= 0).any()):
            raise SingularOperatorError(
                "Factored (π) damping needs every Kronecker factor to have a positive trace; "
                "use factored=False for the exact damped inverse."
            )
        pis = mean_eigenvalues / mean_eigenvalues.log().mean().exp()
        strength = damping ** (1.0 / len(self.factors))
        inverses = []
        pairs = zip(self.eigendecompositions(), self._factor_noise(), pis, strict=True)
        for (e, q), noise, pi in pairs:
            inverse = spectral.inverse_eigenvalues(e, strength * pi, 1.0, noise)
            if q is None:  # a diagonal factor: exact entries, and its inverse stays diagonal
                inverses.append(inverse)
                continue
            matrix = (q * inverse) @ q.T
            inverses.append(0.5 * (matrix + matrix.T))
        return Kronecker(*inverses)

    def _state_tensors(self) -> dict[str, Tensor]:
        return {f"factor{i}": f for i, f in enumerate(self.factors)}

    @classmethod
    def _state_schema(cls, tensors: dict[str, Any]) -> StateSchema:
        return StateSchema(tensors={f"factor{i}": _FACTOR for i in range(max(len(tensors), 1))})

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> Kronecker:
        return cls(*(tensors[f"factor{i}"] for i in range(len(tensors))))


class Dense(Kronecker):
    """A symmetric dense matrix ``M`` as an operator (a Kronecker product of one factor).

    ``logdet``, ``inverse``, ``power`` and ``eigenvalues`` go through the cached
    eigendecomposition of ``M`` (float64).

    Args:
        matrix: symmetric ``[D, D]`` tensor, finite.

    Example:
        >>> op = curvops.Dense(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> round(op.logdet().item(), 4), (op.inverse() @ torch.tensor([3.0, 3.0])).tolist()
        (1.0986, [1.0, 1.0])
    """

    def __init__(self, matrix: Tensor) -> None:
        if isinstance(matrix, Tensor) and matrix.ndim == 1:
            raise ValueError("Dense takes a square [D, D] matrix; use Diagonal for a 1-D diagonal.")
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
    def _state_schema(cls, tensors: dict[str, Any]) -> StateSchema:
        return StateSchema(tensors={"matrix": _MATRIX})

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> Dense:
        return cls(tensors["matrix"])


class KroneckerEigen(CurvatureOperator):
    """``(Q_1 ⊗ ... ⊗ Q_k) diag(vec s) (Q_1 ⊗ ... ⊗ Q_k)^T`` for orthonormal ``Q_i``.

    EKFAC's block: the KFAC eigenbasis ``Q_G ⊗ Q_A`` with corrected eigenvalues ``s``. Since
    the eigenvalues are explicit, every quantity is exact:
    ``tr = Σ s``, ``logdet(· + λI) = Σ log(s + λ)`` and
    ``(· + λI)^p = KroneckerEigen(Q, (s + λ)^p)`` (``p = -1`` the inverse).

    The attributes ``eigenvectors`` (the ``Q_i``) and ``spectrum`` (``s`` as a
    ``[n_1, ..., n_k]`` tensor: ``s[i_1, ..., i_k]`` belongs to the eigenvector
    ``Q_1[:, i_1] ⊗ ... ⊗ Q_k[:, i_k]``) hold the decomposition; :meth:`eigenvalues` gives
    ``s`` sorted.

    Args:
        eigenvectors: orthonormal ``[n_i, n_i]`` tensors (checked to ``sqrt(eps n_i)``), or
            ``None`` for an identity ``Q_i`` that is never built (as for a diagonal factor of a
            :class:`Kronecker`); ``n_i`` is then read from the eigenvalues' axis ``i``.
        eigenvalues: ``D = Π n_i`` finite values, of shape ``[n_1, ..., n_k]`` or ``[D]``
            (row-major; only ``[n_1, ..., n_k]`` if an eigenvector entry is ``None``).
            ``logdet`` needs them non-negative.

    Example:
        >>> q = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
        >>> op = curvops.KroneckerEigen([q, torch.eye(2)], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> op.trace().item(), round(op.logdet().item(), 4)  # log(1 * 2 * 3 * 4)
        (10.0, 3.1781)
        >>> same = curvops.KroneckerEigen([q, None], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> torch.allclose(same.to_dense(), op.to_dense())
        True
    """

    def __init__(self, eigenvectors: Sequence[Tensor | None], eigenvalues: Tensor) -> None:
        eigenvectors = tuple(eigenvectors)
        if not eigenvectors:
            raise ValueError("KroneckerEigen needs at least one eigenvector matrix.")
        for i, q in enumerate(eigenvectors):
            if q is None:
                continue
            check_matrix(q, f"KroneckerEigen eigenvectors[{i}]", symmetric=False)
            eye = torch.eye(q.shape[0], dtype=q.dtype, device=q.device)
            tol = math.sqrt(validation_eps(q.dtype) * max(q.shape[0], 1))
            if q.numel() and bool((q.T @ q - eye).abs().max() > tol):
                raise ValueError(f"KroneckerEigen eigenvectors[{i}] is not orthonormal (Q^T Q != I).")
        matrices = [q for q in eigenvectors if q is not None]
        dtype, device = check_same_place([*matrices, eigenvalues], "eigenvectors and eigenvalues")
        if is_widened(dtype):  # converted from a coarser dtype: orthonormal to its precision only
            eigenvectors = tuple(None if q is None else _orthonormalised(q) for q in eigenvectors)
        if len(matrices) < len(eigenvectors) and eigenvalues.ndim != len(eigenvectors):
            raise ValueError(
                f"With None (identity) eigenvectors the eigenvalues must have one axis per factor, "
                f"[n_1, ..., n_{len(eigenvectors)}], got {list(eigenvalues.shape)}."
            )
        sizes = tuple(eigenvalues.shape[i] if q is None else q.shape[0] for i, q in enumerate(eigenvectors))
        if eigenvalues.numel() != math.prod(sizes) or eigenvalues.shape not in ((math.prod(sizes),), sizes):
            raise ValueError(
                f"eigenvalues must have shape {list(sizes)} or [{math.prod(sizes)}] to match the "
                f"eigenvectors, got {list(eigenvalues.shape)}."
            )
        if not bool(torch.isfinite(eigenvalues).all()):
            raise ValueError("KroneckerEigen eigenvalues contain NaN or inf.")
        super().__init__(math.prod(sizes), dtype, device)
        self.eigenvectors = eigenvectors
        self.spectrum = eigenvalues.reshape(sizes)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The eigenbasis factors' sizes ``(n_1, ..., n_k)``."""
        return tuple(self.spectrum.shape)

    def _matmat(self, x: Tensor) -> Tensor:
        rotated = mode_product(self.eigenvectors, x.reshape(*self.sizes, -1), transpose=True)
        return mode_product(self.eigenvectors, rotated * self.spectrum.unsqueeze(-1)).reshape(x.shape)

    def _to_dense(self) -> Tensor:
        eye = functools.partial(torch.eye, dtype=self.dtype, device=self.device)
        basis = _kron(
            [eye(n) if q is None else q for n, q in zip(self.sizes, self.eigenvectors, strict=True)]
        )
        return (basis * self.spectrum.flatten()) @ basis.T

    def _diagonal(self) -> Tensor:
        squares = [None if q is None else q.square() for q in self.eigenvectors]
        return mode_product(squares, self.spectrum).flatten()

    def _trace(self) -> Tensor:
        return self.spectrum.sum()

    def _logdet(self, damping: float) -> Tensor:
        return spectral.logdet_from_eigenvalues(self.spectrum.flatten(), damping, 0.0)

    def _inverse(self, damping: float, factored: bool) -> KroneckerEigen:
        return self._power(-1.0, damping)

    def _power(self, p: float, damping: float) -> KroneckerEigen:
        return KroneckerEigen(self.eigenvectors, spectral.power_eigenvalues(self.spectrum, p, damping, 0.0))

    def _eigenvalues(self) -> Tensor:
        return self.spectrum.flatten()

    def _state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"eigenvectors{i}": q for i, q in enumerate(self.eigenvectors) if q is not None}
        return {**tensors, "eigenvalues": self.spectrum}

    @classmethod
    def _state_schema(cls, tensors: dict[str, Any]) -> StateSchema:
        # eigenvectors{i} per axis of the [n_1, ..., n_k] eigenvalues; a missing one is an identity
        eigenvalues = tensors.get("eigenvalues")
        count = eigenvalues.ndim if isinstance(eigenvalues, Tensor) else 0
        return StateSchema(
            tensors={"eigenvalues": TensorSpec(None)},
            optional_tensors={f"eigenvectors{i}": _MATRIX for i in range(count)},
        )

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> KroneckerEigen:
        # the eigenvalues are stored as [n_1, ..., n_k]; a missing eigenvectors{i} is an identity
        count = tensors["eigenvalues"].ndim
        return cls([tensors.get(f"eigenvectors{i}") for i in range(count)], tensors["eigenvalues"])
