"""Kronecker-structured operators: ``Kronecker`` (:class:`~curvops.Dense` is its one-factor
case) and ``KroneckerEigen`` (a Kronecker eigenbasis with free eigenvalues, as in EKFAC).

Convention: for factors ``F_1, ..., F_k`` of sizes ``n_1, ..., n_k`` a vector of length
``D = Π n_i`` is a row-major ``[n_1, ..., n_k]`` tensor, and ``(F_1 ⊗ ... ⊗ F_k) vec(X)``
applies ``F_i`` along axis ``i``. For two factors, ``(G ⊗ A) vec(V) = vec(G V A^T)``.
A factor given as a 1-D tensor ``d`` is the diagonal matrix ``diag(d)``: it scales axis ``i``
elementwise and is never materialised as an ``[n_i, n_i]`` matrix (except by ``to_dense``).
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
from .checks import check_choice, check_damping, check_matrix, check_nonnegative, check_same_place
from .factor import Factor, shared_factors
from .precision import is_widened, validation_eps
from .state import Setting, StateSchema, TensorSpec, restored_once
from .tensor_products import kron, mode_product, outer

_MATRIX = TensorSpec((2,), square=True)
_FACTOR = TensorSpec((1, 2), square=True)
PI_BALANCES = ("mean", "trace")
DECOMPOSITION_SETTING = Setting(
    lambda v: v in ("float32", "float64"), "'float32' or 'float64'", optional=True
)
"""A block's ``decomposition_dtype`` in its state dict (absent: float64)."""


def decomposition_config(dtype: torch.dtype) -> dict[str, str]:
    """The state dict setting of ``decomposition_dtype``: nothing for the default float64 (so
    state dicts of float64 blocks are as before), ``{"decomposition_dtype": "float32"}`` else."""
    return {} if dtype == spectral.EIGH_DTYPE else {"decomposition_dtype": str(dtype).removeprefix("torch.")}


def decomposition_dtype_of(config: dict[str, Any]) -> torch.dtype:
    """The ``decomposition_dtype`` a state dict's ``config`` says (float64 if absent)."""
    return getattr(torch, config.get("decomposition_dtype", "float64"))


def _factor_diagonal(factor: Tensor) -> Tensor:
    """The diagonal of a factor: the factor itself if it is 1-D, else its matrix diagonal."""
    return factor if factor.ndim == 1 else factor.diagonal()


def _damped_inverse(index: int, e: Tensor, q: Tensor | None, noise: Tensor, damping: float) -> Tensor:
    """``(F + λI)^-1`` of factor ``index`` from its eigenpairs ``(e, q)`` and eigenvalue noise:
    a matrix, or a 1-D diagonal for a diagonal factor (``q is None``)."""
    damping = check_nonnegative(damping, f"dampings[{index}]")
    try:
        inverse = spectral.inverse_eigenvalues(e, damping, 1.0, noise)
    except SingularOperatorError as error:
        raise SingularOperatorError(f"Kronecker factor {index}: {error}") from error
    if q is None:  # a diagonal factor: exact entries, and its inverse stays diagonal
        return inverse
    matrix = (q * inverse) @ q.T
    return 0.5 * (matrix + matrix.T)


class FactorState:
    """The state dict of an operator on Kronecker factors (:class:`Kronecker`,
    :class:`~curvops.linalg.GroupedKronecker`): its ``factors`` as ``"factor{i}"`` of the
    :attr:`factor_spec` shape, and its ``decomposition_dtype``."""

    factor_spec: TensorSpec = _FACTOR

    def _state_tensors(self) -> dict[str, Tensor]:
        return {f"factor{i}": f for i, f in enumerate(self.factors)}

    def _state_config(self) -> dict[str, str]:
        return decomposition_config(self.decomposition_dtype)

    @classmethod
    def _state_schema(cls, tensors: dict[str, Any]) -> StateSchema:
        return StateSchema(
            tensors={f"factor{i}": cls.factor_spec for i in range(max(len(tensors), 1))},
            config={"decomposition_dtype": DECOMPOSITION_SETTING},
        )

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> CurvatureOperator:
        factors = (restored_factor(tensors[f"factor{i}"], config) for i in range(len(tensors)))
        return cls(*factors, decomposition_dtype=decomposition_dtype_of(config))


def restored_factor(matrix: Tensor, config: dict[str, Any]) -> Factor:
    """A state dict's factor as a :class:`~curvops.linalg.Factor` decomposing as ``config`` says,
    one object for one stored tensor (:func:`~curvops.linalg.state.restored_once`): a layer's
    weight and bias blocks share their ``G`` again."""
    decomposition_dtype = decomposition_dtype_of(config)
    return restored_once(matrix, lambda m: Factor(m, decomposition_dtype), f"factor in {decomposition_dtype}")


class Kronecker(FactorState, CurvatureOperator):
    """``F_1 ⊗ F_2 ⊗ ... ⊗ F_k`` for symmetric factors; KFAC's block is ``G ⊗ A``.

    With eigendecompositions ``F_i = Q_i diag(e_i) Q_i^T`` (computed once, in
    ``decomposition_dtype``, and cached; a factor given as a :class:`~curvops.linalg.Factor`
    shares its decomposition with every other block built on it) every quantity is exact and
    cheap. The factors are taken as the exact matrices:
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
      for two factors Martens & Grosse's ``(G + λ^½/π I)^-1 ⊗ (A + π λ^½ I)^-1``: that is
      :meth:`factor_inverse` (any per-factor dampings) of :meth:`pi_dampings`;
    - :meth:`eigen` is the same matrix as a :class:`KroneckerEigen` in its eigenbasis.

    A factor may be a 1-D tensor ``d``, meaning ``diag(d)`` (e.g. the input factor of an
    ``nn.Embedding``, of the vocabulary's size). It is never materialised as a matrix except
    by ``to_dense``: products scale its axis elementwise, its eigenvalues are ``d`` itself
    (exact, in ``d``'s order) with identity eigenvectors, represented by ``None`` (see
    :meth:`eigendecompositions`), and its factored damped inverse is again diagonal.

    Products cost ``O(D Σ n_i)`` over the dense factors instead of ``O(D²)``.

    Args:
        *factors: on one device and dtype, finite, floating point: symmetric ``[n_i, n_i]``
            matrices or 1-D ``[n_i]`` diagonals, each a tensor or a :class:`~curvops.linalg.Factor`
            (shared with other blocks: KFAC's ``G`` in a layer's weight and bias blocks).
        decomposition_dtype: the dtype of ``eigh`` (:func:`~curvops.linalg.spectral.eigh`):
            ``torch.float64``, or ``torch.float32`` (half the memory, faster; a factor whose
            float32 ``eigh`` fails or is inaccurate is decomposed in float64). Kept in the
            state dict.

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

    def __init__(
        self, *factors: Tensor | Factor, decomposition_dtype: torch.dtype = spectral.EIGH_DTYPE
    ) -> None:
        if not factors:
            raise ValueError("Kronecker needs at least one factor.")
        shared = shared_factors(factors, decomposition_dtype, type(self).__name__)
        for i, factor in enumerate(shared):
            what = f"{type(self).__name__} factor {i}"
            check_matrix(factor.matrix, what, symmetric=not factor.symmetric, allow_diagonal=True)
        dtype, device = check_same_place([f.matrix for f in shared], "Kronecker factors")
        if is_widened(dtype):  # converted from a coarser dtype: symmetric to its precision only
            widened = [f.matrix if f.diagonal else 0.5 * (f.matrix + f.matrix.T) for f in shared]
            shared = tuple(Factor(f, decomposition_dtype) for f in widened)
        super().__init__(math.prod(f.matrix.shape[0] for f in shared), dtype, device)
        self.shared_factors = shared
        self.factors = tuple(f.matrix for f in shared)
        self.decomposition_dtype = decomposition_dtype

    @property
    def sizes(self) -> tuple[int, ...]:
        """The factors' sizes ``(n_1, ..., n_k)``."""
        return tuple(f.shape[0] for f in self.factors)

    def eigendecompositions(self) -> list[tuple[Tensor, Tensor | None]]:
        """``[(e_i, Q_i)]`` with ``F_i = Q_i diag(e_i) Q_i^T``; computed once in
        ``decomposition_dtype`` and cached in the shared :class:`~curvops.linalg.Factor`.

        A diagonal (1-D) factor ``d`` gives ``(d, None)``: its eigenvalues are its entries, in
        their order, and ``None`` stands for the identity eigenvectors, which are never built.
        """
        return [f.eigh() for f in self.shared_factors]

    def _spectrum(self) -> Tensor:
        """The ``D`` eigenvalues ``e_1 ∘ ... ∘ e_k``, ``[n_1, ..., n_k]``, in the eigenbasis' order."""
        return outer([e for e, _ in self.eigendecompositions()])

    def _eigenvalues(self) -> Tensor:
        return self._spectrum().flatten()

    def _factor_noise(self) -> list[Tensor]:
        """Per factor, per eigenvalue ``e_ij``: how far rounding can have moved it, ``t_ij``.

        A factor's entries carry rounding errors ``|δF| <= ε n |F|`` (``ε`` of its dtype); to first
        order they move ``e_ij`` by ``|q_j^T δF q_j| <= ε n |q_j|^T |F| |q_j|``, and ``eigh`` (in
        ``decomposition_dtype``) adds ``ε_d n max|e_i|``. So a small eigenvalue of a dense,
        well-mixed factor is noise, while that of a diagonal matrix (``|q_j|^T |F| |q_j| =
        |e_ij|``) is resolved to its dtype's relative precision, as :class:`~curvops.Diagonal`
        takes it. A 1-D (diagonal) factor is exact: ``t = 0``. Shared with the blocks that hold
        the same :class:`~curvops.linalg.Factor`.
        """
        return [f.noise() for f in self.shared_factors]

    def _spectrum_noise(self) -> Tensor:
        """``Π_i (|e_i| + t_i) - Π_i |e_i|``: how far the product's eigenvalues can have moved."""
        eigen, noise = self.eigendecompositions(), self._factor_noise()
        widened = outer([e.abs() + t for (e, _), t in zip(eigen, noise, strict=True)])
        return widened.sub_(outer([e.abs() for e, _ in eigen]))

    def _matmat(self, x: Tensor) -> Tensor:
        return mode_product(self.factors, x.reshape(*self.sizes, -1)).reshape(x.shape)

    def _to_dense(self) -> Tensor:
        return kron([torch.diag(f) if f.ndim == 1 else f for f in self.factors])

    def _diagonal(self) -> Tensor:
        return kron([_factor_diagonal(f) for f in self.factors])

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
        return KroneckerEigen._of_eigh([q for _, q in self.eigendecompositions()], values)

    def _factored_inverse(self, damping: float) -> Kronecker:
        return self.factor_inverse(self.pi_dampings(damping))

    def eigen(self) -> KroneckerEigen:
        """The same matrix in its eigenbasis: ``KroneckerEigen([Q_1, ..., Q_k], e_1 ∘ ... ∘ e_k)``.

        From the cached :meth:`eigendecompositions` (``None`` for a diagonal factor's identity
        basis); the eigenvalues form a ``[n_1, ..., n_k]`` spectrum, ``s[j_1, ..., j_k] =
        Π_i e_i[j_i]``: EKFAC's starting point, whose eigenvalues are then replaced
        (:meth:`KroneckerEigen.with_eigenvalues`).

        Example:
            >>> op = curvops.Kronecker(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.tensor([1.0, 3.0]))
            >>> eigen = op.eigen()
            >>> eigen.spectrum.tolist(), torch.allclose(eigen.to_dense(), op.to_dense(), atol=1e-6)
            ([[1.0, 3.0], [3.0, 9.0]], True)
        """
        return KroneckerEigen._of_eigh([q for _, q in self.eigendecompositions()], self._spectrum())

    def pi_dampings(self, damping: float, balance: str = "mean") -> list[float]:
        """Per-factor dampings ``λ_i = π_i λ^{1/k}`` that split ``λ`` over the ``k`` factors.

        ``π_i = m_i / (Π_j m_j)^{1/k}`` (so ``Π_i λ_i = λ``) balances the factors by their scale
        ``m_i``: ``balance="mean"`` takes ``m_i = tr F_i / n_i`` (Martens & Grosse 2015's
        π-damping, used by ``inverse(factored=True)``), ``balance="trace"`` takes
        ``m_i = tr F_i`` (Gao et al.'s TKFAC: for ``F = √δ Ψ ⊗ √δ Φ`` with ``tr Ψ = tr Φ = 1``
        both ``λ_i = √λ``, so :meth:`factor_inverse` gives
        ``(√δ Ψ + √λ I)^-1 ⊗ (√δ Φ + √λ I)^-1``).

        Args:
            damping: ``λ >= 0``.
            balance: ``"mean"`` or ``"trace"``.

        Raises:
            SingularOperatorError: a factor's trace is not positive (no ``π_i``).

        Example:
            >>> op = curvops.Kronecker(4 * torch.eye(2), torch.eye(8))
            >>> op.pi_dampings(0.25)  # m = (4, 1): π = (2, 1/2), λ^{1/2} = 1/2
            [1.0, 0.25]
            >>> op.pi_dampings(0.25, balance="trace")  # m = (8, 8): π = (1, 1)
            [0.5, 0.5]
        """
        damping = check_damping(damping)
        check_choice(balance, PI_BALANCES, "balance")
        diagonals = [_factor_diagonal(f) for f in self.factors]
        scales = torch.stack([d.mean() if balance == "mean" else d.sum() for d in diagonals])
        for i, scale in enumerate(scales.tolist()):
            if scale <= 0:
                raise SingularOperatorError(
                    f"Factored (π) damping needs every Kronecker factor to have a positive trace, "
                    f"but factor {i} has trace {diagonals[i].sum().item():.3e}; use factored=False "
                    "for the exact damped inverse."
                )
        pis = scales / scales.log().mean().exp()
        strength = damping ** (1.0 / len(self.factors))
        return [(strength * pi).item() for pi in pis]

    def factor_inverse(self, dampings: Sequence[float]) -> Kronecker:
        """``⊗_i (F_i + λ_i I)^-1``: each factor damped by its own ``λ_i``, then inverted.

        From the cached eigendecompositions, ``(F_i + λ_i I)^-1 = Q_i diag(1 / (e_i + λ_i))
        Q_i^T``, an eigenvalue counting as zero within the rounding bound of the factor's
        entries (as in :meth:`inverse`); a diagonal (1-D) factor's inverse stays diagonal. With
        :meth:`pi_dampings` this is the factored inverse ``inverse(λ, factored=True)``.

        Args:
            dampings: ``k`` numbers ``λ_i >= 0``, one per factor.

        Raises:
            SingularOperatorError: ``F_i + λ_i I`` is singular (``λ_i = 0`` and a zero
                eigenvalue), naming the factor.

        Example:
            >>> op = curvops.Kronecker(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.tensor([1.0, 3.0]))
            >>> inverse = op.factor_inverse([1.0, 0.0])
            >>> inverse.factors[1].tolist()  # (diag(1, 3) + 0 I)^-1, still 1-D
            [1.0, 0.3333333432674408]
            >>> damped = torch.kron(torch.tensor([[3.0, 1.0], [1.0, 3.0]]), torch.diag(op.factors[1]))
            >>> torch.allclose(inverse.to_dense(), torch.linalg.inv(damped), atol=1e-6)
            True
        """
        dampings = list(dampings)
        if len(dampings) != len(self.factors):
            raise ValueError(
                f"factor_inverse needs one damping per factor ({len(self.factors)}), got {len(dampings)}."
            )
        pairs = zip(self.eigendecompositions(), self._factor_noise(), dampings, strict=True)
        inverses = (_damped_inverse(i, e, q, t, lam) for i, ((e, q), t, lam) in enumerate(pairs))
        return Kronecker(*inverses, decomposition_dtype=self.decomposition_dtype)


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
            eigenvectors = tuple(None if q is None else spectral.orthonormalised(q) for q in eigenvectors)
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

    @classmethod
    def _of_eigh(cls, eigenvectors: Sequence[Tensor | None], eigenvalues: Tensor) -> KroneckerEigen:
        """The operator on eigenvectors from ``eigh`` (a :class:`Kronecker` block's own) and
        ``[n_1, ..., n_k]`` eigenvalues, without the ``O(n³)`` orthonormality check and its
        ``n x n`` temporaries."""
        if not bool(torch.isfinite(eigenvalues).all()):
            raise ValueError("KroneckerEigen eigenvalues contain NaN or inf.")
        op = cls.__new__(cls)
        CurvatureOperator.__init__(op, eigenvalues.numel(), eigenvalues.dtype, eigenvalues.device)
        op.eigenvectors, op.spectrum = tuple(eigenvectors), eigenvalues
        return op

    @property
    def sizes(self) -> tuple[int, ...]:
        """The eigenbasis factors' sizes ``(n_1, ..., n_k)``."""
        return tuple(self.spectrum.shape)

    def _matmat(self, x: Tensor) -> Tensor:
        rotated = mode_product(self.eigenvectors, x.reshape(*self.sizes, -1), transpose=True)
        return mode_product(self.eigenvectors, rotated * self.spectrum.unsqueeze(-1)).reshape(x.shape)

    def _to_dense(self) -> Tensor:
        eye = functools.partial(torch.eye, dtype=self.dtype, device=self.device)
        basis = kron([eye(n) if q is None else q for n, q in zip(self.sizes, self.eigenvectors, strict=True)])
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
        return self.with_eigenvalues(spectral.power_eigenvalues(self.spectrum, p, damping, 0.0))

    def with_eigenvalues(self, eigenvalues: Tensor) -> KroneckerEigen:
        """The operator with the same eigenvectors and new eigenvalues ``s'``:
        ``(⊗ Q_i) diag(vec s') (⊗ Q_i)^T``, e.g. EKFAC's corrected eigenvalues in KFAC's basis.

        The eigenvectors are shared, not copied, and not checked again.

        Args:
            eigenvalues: finite, of the :attr:`spectrum`'s shape ``[n_1, ..., n_k]``, dtype and
                device.

        Example:
            >>> op = curvops.Kronecker(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), torch.eye(2)).eigen()
            >>> corrected = op.with_eigenvalues(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
            >>> corrected.eigenvectors is op.eigenvectors, corrected.trace().item()
            (True, 10.0)
        """
        if not isinstance(eigenvalues, Tensor) or eigenvalues.shape != self.spectrum.shape:
            shape = list(eigenvalues.shape) if isinstance(eigenvalues, Tensor) else type(eigenvalues).__name__
            raise ValueError(
                f"with_eigenvalues needs eigenvalues of the spectrum's shape {list(self.sizes)}, got {shape}."
            )
        check_same_place([self.spectrum, eigenvalues], "eigenvalues and the spectrum they replace")
        if not bool(torch.isfinite(eigenvalues).all()):
            raise ValueError("KroneckerEigen eigenvalues contain NaN or inf.")
        op = copy.copy(self)
        op.spectrum = eigenvalues
        return op

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
