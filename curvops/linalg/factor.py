"""``Factor``: a Kronecker factor and its eigendecomposition, computed once and shared.

KFAC's blocks of a layer with a separate bias are ``G ⊗ A`` and ``G``: one output factor in
two blocks. Each block holds its factors as :class:`Factor` objects, and blocks built on the
same ``Factor`` share its (lazily computed, cached) ``eigh``, so ``inverse`` and ``logdet`` of
the whole operator decompose every factor once. :func:`curvops.distributed.decompose_blocks` fills
the caches of many blocks' factors at once, spread over the ranks of a process group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import spectral

NOISE_CHUNK = 2**20
"""Numbers per row block of ``|F|`` in a factor's rounding bounds (:meth:`Factor.noise`)."""


class Factor:
    """A symmetric factor ``F`` (``[n, n]``, a 1-D diagonal ``[n]`` or every group's ``[g, n, n]``)
    with its eigendecomposition ``F = Q diag(e) Q^T``, computed on first use in
    ``decomposition_dtype`` (:func:`~curvops.linalg.spectral.eigh`: float64, or float32 with a
    float64 fallback) and cached; every block built on this object shares it.

    Args:
        matrix: the factor (checked by the blocks that take it).
        decomposition_dtype: ``torch.float64`` or ``torch.float32``.
        symmetric: ``matrix`` is symmetric by construction (a builder's second moment ``Σ x xᵀ``):
            the blocks then check only that it is finite, not its ``n²`` symmetry.

    Example:
        >>> g = curvops.linalg.Factor(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> weight, bias = curvops.Kronecker(g, torch.eye(3)), curvops.Dense(g)
        >>> g.decomposed, bias.logdet().item() > 0, g.decomposed  # the bias's eigh is the weight's
        (False, True, True)
        >>> weight.eigendecompositions()[0][1] is bias.eigendecompositions()[0][1]
        True
    """

    def __init__(
        self, matrix: Tensor, decomposition_dtype: torch.dtype = spectral.EIGH_DTYPE, symmetric: bool = False
    ) -> None:
        self.matrix = matrix
        self.symmetric = symmetric
        self.decomposition_dtype = spectral.check_decomposition_dtype(decomposition_dtype)
        self._eigen: tuple[Tensor, Tensor] | None = None
        self._noise: Tensor | None = None

    def __repr__(self) -> str:
        state = "decomposed" if self.decomposed else "not decomposed"
        return f"Factor({list(self.matrix.shape)}, {self.matrix.dtype}, {state})"

    @property
    def diagonal(self) -> bool:
        """Whether ``F`` is a 1-D diagonal: its eigenvalues are its entries, its eigenvectors ``I``."""
        return self.matrix.ndim == 1

    @property
    def decomposed(self) -> bool:
        """Whether :meth:`eigh` costs nothing any more (computed, filled, or a diagonal)."""
        return self.diagonal or self._eigen is not None

    def eigh(self) -> tuple[Tensor, Tensor | None]:
        """``(e, Q)`` in the factor's dtype (``Q`` is ``None`` for a diagonal factor); computed once."""
        if self.diagonal:
            return self.matrix, None
        if self._eigen is None:
            self._eigen = spectral.eigh(self.matrix, self.decomposition_dtype)
        return self._eigen

    def fill(self, e: Tensor, q: Tensor) -> None:
        """Take ``(e, Q)`` computed elsewhere (another rank's :func:`~curvops.linalg.spectral.eigh`
        of the same matrix) as this factor's decomposition."""
        m = self.matrix
        if e.shape != m.shape[:-1] or q.shape != m.shape or e.dtype != m.dtype or q.dtype != m.dtype:
            raise ValueError(
                f"Factor.fill needs e {list(m.shape[:-1])} and Q {list(m.shape)} of {m.dtype} for this "
                f"factor, got {list(e.shape)} ({e.dtype}) and {list(q.shape)} ({q.dtype})."
            )
        self._eigen, self._noise = (e, q), None

    def noise(self) -> Tensor:
        """Per eigenvalue ``e_j``, how far rounding can have moved it: ``ε n |q_j|^T |F| |q_j|`` for
        the factor's entries (``ε`` of its dtype) plus ``ε_d n max|e|`` for ``eigh`` (``ε_d`` of
        :attr:`decomposition_dtype`); zeros for a diagonal factor (exact). See
        :meth:`curvops.Kronecker._factor_noise`."""
        if self._noise is None:
            e, q = self.eigh()
            if q is None:
                self._noise = torch.zeros_like(e)
            else:
                n = self.matrix.shape[-1]
                rounding = torch.finfo(self.matrix.dtype).eps * n
                entries = rounding * _absolute_quadratic_forms(self.matrix, q)
                eigh_eps = torch.finfo(self.decomposition_dtype).eps
                self._noise = entries + eigh_eps * n * e.abs().amax(-1, keepdim=True)
        return self._noise


def _absolute_quadratic_forms(matrix: Tensor, q: Tensor) -> Tensor:
    """``|q_j|^T |F| |q_j|`` for every column ``j`` of ``Q`` (every group's), through
    :data:`NOISE_CHUNK`-sized row blocks of ``|F|``: ``|Q|`` is the only ``n x n`` temporary."""
    absolute = q.abs()
    n = matrix.shape[-1]
    rows = max(1, NOISE_CHUNK // max(n, 1))
    total = torch.zeros_like(absolute[..., 0, :])
    for start in range(0, n, rows):
        block = slice(start, start + rows)
        total += ((matrix[..., block, :].abs() @ absolute) * absolute[..., block, :]).sum(-2)
    return total


def shared_factors(
    factors: Sequence[Tensor | Factor], decomposition_dtype: torch.dtype, what: str
) -> tuple[Factor, ...]:
    """``factors`` as :class:`Factor` objects: a tensor wrapped in a new one, a ``Factor`` kept (and
    shared); every one must decompose in ``decomposition_dtype`` (``ValueError`` naming ``what``)."""
    spectral.check_decomposition_dtype(decomposition_dtype)
    holders = tuple(f if isinstance(f, Factor) else Factor(f, decomposition_dtype) for f in factors)
    for i, holder in enumerate(holders):
        if holder.decomposition_dtype != decomposition_dtype:
            raise ValueError(
                f"{what} factor {i} decomposes in {holder.decomposition_dtype}, the block in "
                f"{decomposition_dtype}: pass decomposition_dtype={holder.decomposition_dtype} or "
                "a Factor of the block's."
            )
    return holders


def factors_of(operators: Sequence[Any]) -> list[Factor]:
    """The :class:`Factor` objects of ``operators`` and of their sub-operators (a
    ``BlockDiagonal``'s blocks, a ``Cast``'s or ``Permuted``'s operator), in order.

    Example:
        >>> g = Factor(torch.eye(2))
        >>> len(factors_of([curvops.BlockDiagonal([curvops.Kronecker(g, torch.eye(3)), curvops.Dense(g)])]))
        3
    """
    found: list[Factor] = []
    for op in operators:
        found += getattr(op, "shared_factors", ())
        found += factors_of(op._state_children())
    return found


def decompose_factors(operators: Sequence[Any]) -> None:
    """Decompose every factor of ``operators`` (:func:`factors_of`) not yet decomposed. An operator
    made of blocks calls it before inverting any block, so that no ``eigh``'s transient
    (a float64 copy, its result and LAPACK's ``2n²`` workspace) meets a block inverse's.

    Example:
        >>> g = Factor(torch.eye(2))
        >>> decompose_factors([curvops.Dense(g)]); g.decomposed
        True
    """
    for factor in factors_of(operators):
        if not factor.decomposed:
            factor.eigh()
