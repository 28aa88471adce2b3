"""Grouped Kronecker operators: ``diag_j(F_1^(j) ⊗ ... ⊗ F_k^(j))`` over ``g`` groups, each
factor stored as one ``[g, n_i, n_i]`` tensor and every quantity computed for all groups at
once (batched products and ``eigh``): the block of a grouped convolution, one Kronecker block
per group, without a Python-level block per group.

Convention: group ``j``'s ``Π n_i`` entries are the ``j``-th range of the vector, as for
:class:`~curvops.Kronecker` (a vector is a row-major ``[g, n_1, ..., n_k]`` tensor).
"""

from __future__ import annotations

import copy
import functools
import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import SingularOperatorError
from . import spectral
from .base import CurvatureOperator
from .checks import all_finite, check_choice, check_damping, check_same_place
from .factor import Factor, shared_factors
from .kronecker import PI_BALANCES, FactorState
from .precision import is_widened, validation_eps
from .state import StateSchema, TensorSpec
from .tensor_products import kron

_GROUPED = TensorSpec((3,))


def _check_grouped(matrices: Sequence[Tensor], what: str, symmetric: bool) -> tuple[int, torch.dtype]:
    """Raise unless every matrix is a finite floating-point ``[g, n, n]`` tensor (symmetric, or
    orthonormal if not) of one ``g``; the number of groups and the dtype."""
    if not matrices:
        raise ValueError(f"{what} needs at least one [g, n, n] tensor.")
    for i, m in enumerate(matrices):
        if not isinstance(m, Tensor) or m.ndim != 3 or m.shape[1] != m.shape[2]:
            shape = list(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"{what} {i} must be a [g, n, n] tensor (one matrix per group), got {shape}.")
        if not m.is_floating_point() or not all_finite(m):
            raise ValueError(f"{what} {i} must be finite and floating point.")
    groups = {m.shape[0] for m in matrices}
    if len(groups) > 1:
        raise ValueError(f"{what}s must have one number of groups, got {sorted(groups)}.")
    dtype, _ = check_same_place(matrices, f"{what}s")
    for i, m in enumerate(matrices):
        if not m.numel():
            continue
        if symmetric:
            tol, error = math.sqrt(validation_eps(dtype)) * m.abs().max(), (m - m.mT).abs().max()
        else:
            eye = torch.eye(m.shape[-1], dtype=dtype, device=m.device)
            tol, error = math.sqrt(validation_eps(dtype) * m.shape[-1]), (m.mT @ m - eye).abs().max()
        if bool(error > tol):
            kind = "symmetric" if symmetric else "orthonormal (Q^T Q = I)"
            raise ValueError(f"{what} {i} is not {kind} in every group.")
    return groups.pop(), dtype


def _mode_product(matrices: Sequence[Tensor], x: Tensor, transpose: bool = False) -> Tensor:
    """Apply group ``j``'s ``matrices[i][j]`` (or its transpose) along axis ``1 + i`` of
    ``x[j]`` (``x``: ``[g, n_1, ..., n_k, ...]``)."""
    for axis, m in enumerate(matrices):
        moved = x.movedim(1 + axis, -1)
        rows = moved.reshape(moved.shape[0], -1, moved.shape[-1]) @ (m if transpose else m.mT)
        x = rows.reshape(*moved.shape[:-1], rows.shape[-1]).movedim(-1, 1 + axis)
    return x


def _outer(vectors: Sequence[Tensor]) -> Tensor:
    """Per group, ``v_1 ∘ ... ∘ v_k``: ``[g, n_1, ..., n_k]`` from ``[g, n_i]`` vectors."""
    product = vectors[0]
    for v in vectors[1:]:
        product = product.unsqueeze(-1) * v.reshape(v.shape[0], *[1] * (product.ndim - 1), -1)
    return product


def _diagonals(matrices: Sequence[Tensor]) -> list[Tensor]:
    return [m.diagonal(dim1=-2, dim2=-1) for m in matrices]


class GroupedKronecker(FactorState, CurvatureOperator):
    """``diag_j(F_1^(j) ⊗ ... ⊗ F_k^(j))``: one :class:`~curvops.Kronecker` block per group.

    Every quantity is that of the block-diagonal of the groups' ``Kronecker`` blocks, rounding
    included (an eigenvalue counts as zero within the bound of its factor's rounding):
    ``tr = Σ_j Π_i tr F_i^(j)``, ``logdet(· + λI)`` and ``(· + λI)^p`` (a
    :class:`GroupedKroneckerEigen`) from the batched eigendecompositions (in
    ``decomposition_dtype``, cached in shared :class:`~curvops.linalg.Factor` objects), and
    the factored inverse with each group's own π-dampings (:meth:`pi_dampings`).

    Args:
        *factors: ``[g, n_i, n_i]`` tensors (or :class:`~curvops.linalg.Factor` objects of them,
            shared with other blocks), symmetric in every group, on one device and dtype.
        decomposition_dtype: as for :class:`~curvops.Kronecker`.

    Example:
        >>> g, a = torch.stack([torch.eye(2), 2 * torch.eye(2)]), torch.ones(2, 1, 1)
        >>> op = curvops.linalg.GroupedKronecker(g, a)
        >>> op.shape, op.trace().item(), (op @ torch.ones(4)).tolist()
        ((4, 4), 6.0, [1.0, 1.0, 2.0, 2.0])
        >>> torch.equal(op.to_dense(), torch.block_diag(torch.kron(g[0], a[0]), torch.kron(g[1], a[1])))
        True
    """

    factor_spec = _GROUPED

    def __init__(
        self, *factors: Tensor | Factor, decomposition_dtype: torch.dtype = spectral.EIGH_DTYPE
    ) -> None:
        shared = shared_factors(factors, decomposition_dtype, "GroupedKronecker")
        matrices = [f.matrix for f in shared]
        groups, dtype = _check_grouped(matrices, "GroupedKronecker factor", symmetric=True)
        if is_widened(dtype):  # converted from a coarser dtype: symmetric to its precision only
            shared = tuple(Factor(0.5 * (m + m.mT), decomposition_dtype) for m in matrices)
        super().__init__(groups * math.prod(m.shape[-1] for m in matrices), dtype, matrices[0].device)
        self.shared_factors = shared
        self.factors = tuple(f.matrix for f in shared)
        self.decomposition_dtype = decomposition_dtype

    @property
    def groups(self) -> int:
        """The number of groups ``g``."""
        return self.factors[0].shape[0]

    @property
    def sizes(self) -> tuple[int, ...]:
        """The factors' sizes ``(n_1, ..., n_k)`` (in every group)."""
        return tuple(f.shape[-1] for f in self.factors)

    def eigendecompositions(self) -> list[tuple[Tensor, Tensor]]:
        """``[(e_i, Q_i)]``, ``[g, n_i]`` and ``[g, n_i, n_i]``: every group's ``F_i = Q_i diag(e_i)
        Q_i^T``, by one batched ``eigh`` per factor in ``decomposition_dtype``; cached in the
        shared :class:`~curvops.linalg.Factor`."""
        return [f.eigh() for f in self.shared_factors]

    def _factor_noise(self) -> list[Tensor]:
        """Per eigenvalue, how far rounding of its factor's entries can have moved it (as
        :meth:`~curvops.Kronecker._factor_noise`, per group)."""
        return [f.noise() for f in self.shared_factors]

    def _spectrum(self) -> Tensor:
        return _outer([e for e, _ in self.eigendecompositions()])

    def _spectrum_noise(self) -> Tensor:
        eigen, noise = self.eigendecompositions(), self._factor_noise()
        widened = _outer([e.abs() + t for (e, _), t in zip(eigen, noise, strict=True)])
        return widened.sub_(_outer([e.abs() for e, _ in eigen]))

    def _matmat(self, x: Tensor) -> Tensor:
        return _mode_product(self.factors, x.reshape(self.groups, *self.sizes, -1)).reshape(x.shape)

    def _to_dense(self) -> Tensor:
        return torch.block_diag(*(kron([f[j] for f in self.factors]) for j in range(self.groups)))

    def _diagonal(self) -> Tensor:
        return _outer(_diagonals(self.factors)).flatten()

    def _trace(self) -> Tensor:
        return functools.reduce(operator.mul, [d.sum(-1) for d in _diagonals(self.factors)]).sum()

    def _eigenvalues(self) -> Tensor:
        return self._spectrum().flatten()

    def _logdet(self, damping: float) -> Tensor:
        return spectral.logdet_from_eigenvalues(
            self._spectrum().flatten(), damping, 1.0, self._spectrum_noise().flatten()
        )

    def _inverse(self, damping: float, factored: bool) -> CurvatureOperator:
        if factored and len(self.factors) > 1:
            return self.factor_inverse(self.pi_dampings(damping))
        return self._power(-1.0, damping)

    def _power(self, p: float, damping: float) -> GroupedKroneckerEigen:
        values = spectral.power_eigenvalues(self._spectrum(), p, damping, 1.0, self._spectrum_noise())
        return GroupedKroneckerEigen._of_eigh([q for _, q in self.eigendecompositions()], values)

    def eigen(self) -> GroupedKroneckerEigen:
        """The same matrix in its eigenbasis, with the ``[g, n_1, ..., n_k]`` spectrum: EKFAC's start.

        Example:
            >>> op = curvops.linalg.GroupedKronecker(torch.stack([torch.eye(2), 3 * torch.eye(2)]))
            >>> op.eigen().spectrum.tolist()
            [[1.0, 1.0], [3.0, 3.0]]
        """
        return GroupedKroneckerEigen._of_eigh([q for _, q in self.eigendecompositions()], self._spectrum())

    def pi_dampings(self, damping: float, balance: str = "mean") -> Tensor:
        """Each group's per-factor dampings, ``[g, k]``: :meth:`~curvops.Kronecker.pi_dampings` of
        every group's ``Kronecker`` block (``balance`` ``"mean"`` or ``"trace"``).

        Raises:
            SingularOperatorError: a factor's trace is not positive in some group (naming both).

        Example:
            >>> op = curvops.linalg.GroupedKronecker(4 * torch.eye(2)[None], torch.eye(8)[None])
            >>> op.pi_dampings(0.25).tolist()
            [[1.0, 0.25]]
        """
        damping = check_damping(damping)
        check_choice(balance, PI_BALANCES, "balance")
        diagonals = _diagonals(self.factors)
        scales = torch.stack([d.mean(-1) if balance == "mean" else d.sum(-1) for d in diagonals], dim=-1)
        if not bool((scales > 0).all()):
            group, factor = (~(scales > 0)).nonzero()[0].tolist()
            raise SingularOperatorError(
                f"Factored (π) damping needs every Kronecker factor to have a positive trace, but "
                f"factor {factor} of group {group} has trace {diagonals[factor][group].sum().item():.3e}; "
                "use factored=False for the exact damped inverse."
            )
        pis = scales / scales.log().mean(-1, keepdim=True).exp()
        return damping ** (1.0 / len(self.factors)) * pis

    def factor_inverse(self, dampings: Tensor) -> GroupedKronecker:
        """``diag_j(⊗_i (F_i^(j) + λ_ji I)^-1)`` for ``[g, k]`` dampings ``λ_ji >= 0``.

        Raises:
            SingularOperatorError: some ``F_i^(j) + λ_ji I`` is singular, naming the factor.

        Example:
            >>> op = curvops.linalg.GroupedKronecker(torch.stack([torch.eye(1), 3 * torch.eye(1)]))
            >>> op.factor_inverse(torch.tensor([[1.0], [1.0]])).factors[0].flatten().tolist()
            [0.5, 0.25]
        """
        dampings = torch.as_tensor(dampings, dtype=self.dtype, device=self.device)
        if dampings.shape != (self.groups, len(self.factors)) or not bool((dampings >= 0).all()):
            raise ValueError(
                f"factor_inverse needs [groups, factors] = {[self.groups, len(self.factors)]} dampings "
                f">= 0, got {list(dampings.shape)}."
            )
        inverses = []
        pairs = zip(self.eigendecompositions(), self._factor_noise(), dampings.T, strict=True)
        for i, ((e, q), noise, lam) in enumerate(pairs):
            try:
                inverse = spectral.inverse_eigenvalues(e, lam[:, None], 1.0, noise)
            except SingularOperatorError as error:
                raise SingularOperatorError(f"Kronecker factor {i}: {error}") from error
            matrix = (q * inverse.unsqueeze(-2)) @ q.mT
            inverses.append(0.5 * (matrix + matrix.mT))
        return GroupedKronecker(*inverses, decomposition_dtype=self.decomposition_dtype)


class GroupedKroneckerEigen(CurvatureOperator):
    """``diag_j((⊗_i Q_i^(j)) diag(vec s_j) (⊗_i Q_i^(j))^T)``: one
    :class:`~curvops.KroneckerEigen` block per group (EKFAC's blocks of a grouped layer).

    Args:
        eigenvectors: ``[g, n_i, n_i]`` tensors, orthonormal in every group (to ``sqrt(eps n_i)``).
        eigenvalues: finite, ``[g, n_1, ..., n_k]`` (or ``[g · Π n_i]``, row-major).

    Example:
        >>> q = torch.eye(2).expand(3, 2, 2)
        >>> op = curvops.linalg.GroupedKroneckerEigen([q], torch.arange(6.0).reshape(3, 2))
        >>> op.trace().item(), op.diagonal().tolist()
        (15.0, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    """

    def __init__(self, eigenvectors: Sequence[Tensor], eigenvalues: Tensor) -> None:
        eigenvectors = tuple(eigenvectors)
        groups, dtype = _check_grouped(eigenvectors, "GroupedKroneckerEigen eigenvectors", symmetric=False)
        check_same_place([*eigenvectors, eigenvalues], "eigenvectors and eigenvalues")
        if is_widened(dtype):  # converted from a coarser dtype: orthonormal to its precision only
            eigenvectors = tuple(spectral.orthonormalised(q) for q in eigenvectors)
        shape = (groups, *(q.shape[-1] for q in eigenvectors))
        if eigenvalues.shape not in ((math.prod(shape),), shape):
            raise ValueError(
                f"eigenvalues must have shape {list(shape)} or [{math.prod(shape)}] to match the "
                f"eigenvectors, got {list(eigenvalues.shape)}."
            )
        if not bool(torch.isfinite(eigenvalues).all()):
            raise ValueError("GroupedKroneckerEigen eigenvalues contain NaN or inf.")
        super().__init__(math.prod(shape), dtype, eigenvalues.device)
        self.eigenvectors = eigenvectors
        self.spectrum = eigenvalues.reshape(shape)

    @classmethod
    def _of_eigh(cls, eigenvectors: Sequence[Tensor], eigenvalues: Tensor) -> GroupedKroneckerEigen:
        """The operator on eigenvectors from a batched ``eigh`` (a :class:`GroupedKronecker` block's
        own) and ``[g, n_1, ..., n_k]`` eigenvalues, without the orthonormality check."""
        if not bool(torch.isfinite(eigenvalues).all()):
            raise ValueError("GroupedKroneckerEigen eigenvalues contain NaN or inf.")
        op = cls.__new__(cls)
        CurvatureOperator.__init__(op, eigenvalues.numel(), eigenvalues.dtype, eigenvalues.device)
        op.eigenvectors, op.spectrum = tuple(eigenvectors), eigenvalues
        return op

    def _matmat(self, x: Tensor) -> Tensor:
        rotated = _mode_product(self.eigenvectors, x.reshape(*self.spectrum.shape, -1), transpose=True)
        return _mode_product(self.eigenvectors, rotated * self.spectrum.unsqueeze(-1)).reshape(x.shape)

    def _to_dense(self) -> Tensor:
        blocks = []
        for j in range(self.spectrum.shape[0]):
            basis = kron([q[j] for q in self.eigenvectors])
            blocks.append((basis * self.spectrum[j].flatten()) @ basis.T)
        return torch.block_diag(*blocks)

    def _diagonal(self) -> Tensor:
        squares = [q.square() for q in self.eigenvectors]
        return _mode_product(squares, self.spectrum.unsqueeze(-1)).flatten()

    def _trace(self) -> Tensor:
        return self.spectrum.sum()

    def _eigenvalues(self) -> Tensor:
        return self.spectrum.flatten()

    def _logdet(self, damping: float) -> Tensor:
        return spectral.logdet_from_eigenvalues(self.spectrum.flatten(), damping, 0.0)

    def _inverse(self, damping: float, factored: bool) -> GroupedKroneckerEigen:
        return self._power(-1.0, damping)

    def _power(self, p: float, damping: float) -> GroupedKroneckerEigen:
        return self.with_eigenvalues(spectral.power_eigenvalues(self.spectrum, p, damping, 0.0))

    def with_eigenvalues(self, eigenvalues: Tensor) -> GroupedKroneckerEigen:
        """The same eigenvectors (shared, not checked again) with new finite eigenvalues of the
        spectrum's shape ``[g, n_1, ..., n_k]``.

        Example:
            >>> op = curvops.linalg.GroupedKroneckerEigen([torch.eye(2)[None]], torch.ones(1, 2))
            >>> op.with_eigenvalues(torch.tensor([[2.0, 3.0]])).trace().item()
            5.0
        """
        if not isinstance(eigenvalues, Tensor) or eigenvalues.shape != self.spectrum.shape:
            raise ValueError(f"with_eigenvalues needs eigenvalues of shape {list(self.spectrum.shape)}.")
        check_same_place([self.spectrum, eigenvalues], "eigenvalues and the spectrum they replace")
        if not bool(torch.isfinite(eigenvalues).all()):
            raise ValueError("GroupedKroneckerEigen eigenvalues contain NaN or inf.")
        op = copy.copy(self)
        op.spectrum = eigenvalues
        return op

    def _state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"eigenvectors{i}": q for i, q in enumerate(self.eigenvectors)}
        return {**tensors, "eigenvalues": self.spectrum}

    @classmethod
    def _state_schema(cls, tensors: dict[str, Any]) -> StateSchema:
        eigenvalues = tensors.get("eigenvalues")
        count = eigenvalues.ndim - 1 if isinstance(eigenvalues, Tensor) and eigenvalues.ndim > 1 else 1
        specs = {f"eigenvectors{i}": _GROUPED for i in range(count)}
        return StateSchema(tensors={"eigenvalues": TensorSpec(None), **specs})

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> GroupedKroneckerEigen:
        count = tensors["eigenvalues"].ndim - 1
        return cls([tensors[f"eigenvectors{i}"] for i in range(count)], tensors["eigenvalues"])
