"""The base class of every curvops operator: a symmetric ``D x D`` linear operator.

A subclass implements ``_matmat`` and, where it has structure, the hooks ``_to_dense``,
``_diagonal``, ``_trace``, ``_logdet``, ``_inverse``, ``_power`` and ``_eigenvalues``.
Everything else — input checks, NumPy and SciPy interop, estimator selection, ``det``,
composition and state dicts — lives here once.

Some generic methods return subclasses (``op + other`` a ``Sum``, ``c * op`` a ``Scaled``, the
dense fallback a ``Dense``, ``inverse(method="cg")`` a ``CGInverse``, ``power`` an ``Identity``
sum or a ``LanczosPower``, ``to`` a ``Cast``). This module imports none of the modules that
define them: every subclass registers itself in :mod:`~curvops.linalg.state`'s registry of
operator types as it is defined (``__init_subclass__``; state dicts are rebuilt from the
same registry), and the generic methods look their classes up there by name
(:func:`~curvops.linalg.state.operator_type`). So imports among ``curvops.linalg``'s modules
run one way: ``base`` imports only modules that do not import it (``checks``, ``estimators``,
``linear_map``, ``memory``, ``precision``, ``state``), and every operator module imports ``base``.
"""

from __future__ import annotations

from numbers import Real
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import estimators
from .checks import check_bool, check_choice, check_damping, check_positive_int, check_power
from .linear_map import LinearMap
from .memory import check_dense
from .precision import computation_dtype
from .state import (
    StateSchema,
    check_state_matches,
    from_state_dict,
    operator_type,
    rebuild,
    register_operator,
)

TRACE_METHODS = ("exact", "hutchinson", "hutch++")
DIAGONAL_METHODS = ("exact", "hutchinson", "hutch++")
LOGDET_METHODS = ("exact", "slq")
INVERSE_METHODS = ("exact", "cg")
POWER_METHODS = ("exact", "lanczos")


class CurvatureOperator(LinearMap):
    """A symmetric linear operator ``op`` of shape ``(D, D)`` on one flat parameter vector.

    Vectors are torch tensors of shape ``[D]`` and matrices of vectors ``[D, K]``, on the
    operator's ``device`` and of its ``dtype``. ``matvec``/``matmat`` also take NumPy arrays
    (cast to ``dtype``) and return NumPy, for SciPy; :meth:`to_scipy` wraps the operator as a
    ``scipy.sparse.linalg.LinearOperator``.

    Every quantity has an ``"exact"`` method, which uses the operator's structure where it
    has one and otherwise the dense matrix, and stochastic estimators for matrix-free use:
    Hutchinson / Hutch++ for ``trace`` and ``diagonal``, stochastic Lanczos quadrature for
    ``logdet``, conjugate gradients for ``inverse`` and Lanczos for ``power``.

    Operators compose: ``op1 + op2`` (:class:`Sum`), ``c * op`` (:class:`Scaled`) and
    ``op + λ * Identity(D)``, whose inverse and logdet stay exact through ``op``'s structure.

    Example:
        >>> import curvops
        >>> op = curvops.Diagonal(torch.tensor([1.0, 2.0, 3.0]))
        >>> (op @ torch.ones(3)).tolist()
        [1.0, 2.0, 3.0]
        >>> op.trace().item(), round(op.logdet(damping=1.0).item(), 4)  # log(2 * 3 * 4)
        (6.0, 3.1781)
    """

    _state_type: ClassVar[str]
    _inverse_method: ClassVar[str] = "exact"
    _logdet_method: ClassVar[str] = "exact"
    _power_method: ClassVar[str] = "exact"

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__((size, size), dtype, device)

    @property
    def matrix_free(self) -> bool:
        """Whether the operator is known only through its products (the exact curvature of a
        model: :class:`~curvops.GGN`, :class:`~curvops.Hessian`, ...) rather than through a
        structure: its ``inverse`` then defaults to CG, ``logdet`` to stochastic Lanczos
        quadrature and ``power`` to Lanczos, and its ``"exact"`` quantities build the dense matrix.

        Example:
            >>> curvops.Diagonal(torch.ones(3)).matrix_free
            False
        """
        return self._inverse_method == "cg"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register the subclass for :func:`~curvops.from_state_dict`.

        curvops' own operators are known by their class name (``"Kronecker"``); others by
        their full dotted path, so a user's class never shadows a built-in one.
        """
        super().__init_subclass__(**kwargs)
        own = cls.__module__.startswith("curvops.")
        cls._state_type = cls.__name__ if own else f"{cls.__module__}.{cls.__qualname__}"
        register_operator(cls)

    # ------------------------------------------------- hooks: _matmat, and structure if any
    def _rmatmat(self, y: Tensor) -> Tensor:
        return self._matmat(y)

    def _diagonal(self) -> Tensor:
        parts = [
            self._matmat(block)[start : start + block.shape[1]].diagonal()
            for start, block in self._unit_blocks(self.shape[0])
        ]
        return torch.cat(parts)

    def _trace(self) -> Tensor:
        return self._diagonal().sum()

    def _logdet(self, damping: float) -> Tensor:
        return self._as_dense_operator()._logdet(damping)

    def _inverse(self, damping: float, factored: bool) -> CurvatureOperator:
        return self._as_dense_operator()._inverse(damping, factored)

    def _power(self, p: float, damping: float) -> CurvatureOperator:
        return self._as_dense_operator()._power(p, damping)

    def _eigenvalues(self) -> Tensor:
        """The ``D`` eigenvalues in any order."""
        return self._as_dense_operator()._eigenvalues()

    def _as_dense_operator(self) -> CurvatureOperator:
        """The fallback without structure: the (symmetrised) dense matrix as a ``Dense``, whose
        float64 ``eigh`` needs two more ``D x D`` matrices: all within the memory budget."""
        what = f"The dense fallback of {type(self).__name__} (no structure for this quantity)"
        check_dense(self.shape, self.dtype, what, float64_copies=2)
        dense = self._to_dense()
        return operator_type("Dense")(0.5 * (dense + dense.T))

    # state dict hooks: tensors, child operators and plain settings that rebuild the operator
    def _state_tensors(self) -> dict[str, Tensor]:
        return {}

    def _state_children(self) -> list[CurvatureOperator]:
        return []

    def _state_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _state_schema(cls, tensors: dict[str, Any]) -> StateSchema | None:
        """What this operator's state holds (tensors, children, settings), to check a state dict
        against before building; ``tensors`` are the given ones (for numbered names like a
        Kronecker product's ``factor{i}``). ``None``: not declared, only the generic checks."""
        return None

    @classmethod
    def _from_state(
        cls,
        tensors: dict[str, Tensor],
        children: list[CurvatureOperator],
        config: dict[str, Any],
        dtype: torch.dtype,
        device: torch.device,
    ) -> CurvatureOperator:
        raise TypeError(f"{cls.__name__} cannot be rebuilt from a state dict.")

    # ------------------------------------------------------------------------ helpers
    def _rtol(self) -> float:
        """Relative size under which an eigenvalue computed by ``eigh`` counts as zero."""
        return torch.finfo(self.dtype).eps * max(self.shape[0], 1)

    def _probes(self, generator: torch.Generator | None) -> estimators.Sampler:
        return estimators.rademacher(self.shape[0], self.dtype, self.device, generator)

    # --------------------------------------------------------------- quantities
    @property
    def T(self) -> CurvatureOperator:
        """The transpose: the operator itself (it is symmetric)."""
        return self

    def trace(
        self, method: str = "exact", num_samples: int = 100, generator: torch.Generator | None = None
    ) -> Tensor:
        """``tr(op)`` as a 0-dim tensor.

        Args:
            method: ``"exact"`` (structure, or ``D`` products with unit vectors),
                ``"hutchinson"`` (``mean_i z_i^T op z_i``, Rademacher ``z``) or ``"hutch++"``
                (Meyer et al. 2021: a rank ``num_samples/3`` sketch taken exactly, Hutchinson on
                the rest).
            num_samples: products with ``op`` an estimator may spend.
            generator: random source of the estimators' probes.

        Example:
            >>> curvops.Diagonal(torch.tensor([1.0, 2.0])).trace().item()
            3.0
        """
        check_choice(method, TRACE_METHODS, "trace method")
        check_positive_int(num_samples, "num_samples")
        if method == "exact":
            return self._trace()
        estimate = estimators.hutchinson_trace if method == "hutchinson" else estimators.hutchpp_trace
        return estimate(self._matmat, self._probes(generator), num_samples)

    def diagonal(
        self, method: str = "exact", num_samples: int = 100, generator: torch.Generator | None = None
    ) -> Tensor:
        """``diag(op)`` of shape ``[D]``.

        Args:
            method: ``"exact"``, ``"hutchinson"`` (``mean_i z_i ⊙ op z_i``) or ``"hutch++"``
                (Diag++: a low-rank sketch taken exactly, Hutchinson on the rest).
            num_samples: products with ``op`` an estimator may spend.
            generator: random source of the estimators' probes.

        Example:
            >>> curvops.Dense(torch.tensor([[2.0, 1.0], [1.0, 3.0]])).diagonal().tolist()
            [2.0, 3.0]
        """
        check_choice(method, DIAGONAL_METHODS, "diagonal method")
        check_positive_int(num_samples, "num_samples")
        if method == "exact":
            return self._diagonal()
        estimate = estimators.hutchinson_diagonal if method == "hutchinson" else estimators.hutchpp_diagonal
        return estimate(self._matmat, self._probes(generator), num_samples)

    def logdet(
        self,
        damping: float = 0.0,
        method: str | None = None,
        num_samples: int = 10,
        num_steps: int = 30,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``log det(op + λI)`` of a positive semi-definite operator, ``λ = damping``.

        With ``damping=0`` a singular operator gives ``-inf`` and a
        :class:`~curvops.errors.SingularOperatorWarning` (never NaN); a negative eigenvalue
        raises :class:`~curvops.errors.NotPositiveDefiniteError`.

        Args:
            damping: ``λ >= 0`` added to every eigenvalue.
            method: ``"exact"`` (structure, or the dense eigenvalues) or ``"slq"``
                (stochastic Lanczos quadrature: ``num_samples`` Rademacher probes,
                ``num_steps`` Lanczos steps each; needs ``op + λI`` positive definite).
                Default: ``"exact"`` for structured operators, ``"slq"`` for matrix-free
                model operators (:class:`~curvops.Hessian`, :class:`~curvops.GGN`, ...).
            num_samples: SLQ probes.
            num_steps: SLQ Lanczos steps per probe.
            generator: random source of the SLQ probes.

        Example:
            >>> round(curvops.Diagonal(torch.tensor([1.0, 2.0])).logdet(damping=1.0).item(), 4)
            1.7918
        """
        damping = check_damping(damping)
        method = method or self._logdet_method
        check_choice(method, LOGDET_METHODS, "logdet method")
        check_positive_int(num_samples, "num_samples")
        check_positive_int(num_steps, "num_steps")
        if method == "exact":
            return self._logdet(damping)
        return estimators.slq_logdet(self._matmat, self._probes(generator), num_samples, num_steps, damping)

    def det(self, damping: float = 0.0) -> Tensor:
        """``det(op + λI) = exp(logdet(op + λI))`` of a positive semi-definite operator.

        The determinant of a curvature matrix over- or underflows easily (``D`` eigenvalues
        multiplied). Where ``logdet`` is finite but ``exp(logdet)`` is not representable in
        the operator's dtype this raises ``OverflowError`` instead of returning ``inf`` or
        ``0``: use :meth:`logdet`. A singular operator with ``damping=0`` gives ``0``.

        Example:
            >>> curvops.Diagonal(torch.tensor([2.0, 3.0])).det(damping=1.0).item()
            12.0
        """
        logdet = self.logdet(damping)
        det = logdet.exp()
        if bool(torch.isfinite(logdet)) and (bool(torch.isinf(det)) or bool(det == 0)):
            raise OverflowError(
                f"det(op + {damping}*I) = exp({logdet.item():.6g}) is not representable in "
                f"{self.dtype}; use logdet() instead."
            )
        return det

    def inverse(
        self,
        damping: float = 0.0,
        method: str | None = None,
        factored: bool = False,
        rtol: float | None = None,
        maxiter: int | None = None,
    ) -> CurvatureOperator:
        """An operator for ``(op + λI)^-1``, ``λ = damping``.

        Args:
            damping: ``λ >= 0``. A singular ``op + λI`` raises
                :class:`~curvops.errors.SingularOperatorError` (pass ``damping > 0``).
            method: ``"exact"`` (structure, or the dense eigendecomposition) or ``"cg"``
                (each product solves ``(op + λI) y = x`` by conjugate gradients; needs a
                positive-definite ``op + λI``). Default: ``"exact"`` for structured
                operators, ``"cg"`` for matrix-free model operators.
            factored: for Kronecker blocks, the factored π-damping of Martens & Grosse (2015),
                ``(G + λ^½/π I)^-1 ⊗ (A + π λ^½ I)^-1``, instead of the exact damped inverse.
                Other structures have no factored variant and give the exact inverse.
            rtol: CG's relative residual tolerance per column (default ``sqrt(eps)``).
            maxiter: CG's iteration limit (default ``10 D``).

        Example:
            >>> inv = curvops.Diagonal(torch.tensor([1.0, 3.0])).inverse(damping=1.0)
            >>> (inv @ torch.ones(2)).tolist()
            [0.5, 0.25]
        """
        damping = check_damping(damping)
        method = method or self._inverse_method
        check_choice(method, INVERSE_METHODS, "inverse method")
        check_bool(factored, "factored")
        if method == "exact":
            return self._inverse(damping, factored)
        return operator_type("CGInverse")(self, damping, rtol=rtol, maxiter=maxiter)

    def power(
        self, p: float, damping: float = 0.0, method: str | None = None, num_steps: int | None = None
    ) -> CurvatureOperator:
        """An operator for the matrix power ``(op + λI)^p``, ``λ = damping``, ``D x D``.

        With ``op + λI = Q diag(e + λ) Q^T`` it is ``Q diag((e + λ)^p) Q^T``: ``p = -1`` is the
        inverse, ``p = ±1/2`` the square root and its inverse (whitening, natural-gradient
        preconditioners), ``(op + λI)^½ (op + λI)^½ = op + λI``. ``p = 1`` gives ``op`` itself
        (``op + λ * Identity(D)`` for ``λ > 0``).

        Where ``(op + λI)^p`` does not exist it raises: for ``p < 0`` a singular ``op + λI``
        (an eigenvalue ``e + λ`` zero up to rounding) raises
        :class:`~curvops.errors.SingularOperatorError` (pass ``damping > 0``), and for a
        non-integer ``p`` a negative eigenvalue (an indefinite operator, e.g. a Hessian)
        raises :class:`~curvops.errors.NotPositiveDefiniteError`, a ``ValueError``.

        Args:
            p: a finite real exponent.
            damping: ``λ >= 0``.
            method: ``"exact"`` (through structure: a Kronecker product gives a
                :class:`~curvops.KroneckerEigen` with eigenvalues ``(e_1 ∘ ... ∘ e_k + λ)^p``,
                block-diagonal operators a block-diagonal power, ...; without structure the
                dense eigendecomposition, in float64) or ``"lanczos"`` (matrix-free: each
                product runs ``num_steps`` Lanczos steps, see
                :class:`~curvops.linalg.LanczosPower`). Default: ``"exact"`` for structured
                operators, ``"lanczos"`` for matrix-free model operators.
            num_steps: Lanczos steps per product (default ``min(D, 50)``); ``"lanczos"`` only.

        Example:
            >>> op = curvops.Diagonal(torch.tensor([3.0, 8.0]))
            >>> (op.power(-0.5, damping=1.0) @ torch.ones(2)).tolist()  # 1 / sqrt(e + 1)
            [0.5, 0.3333333432674408]
            >>> root = curvops.Dense(torch.tensor([[2.0, 1.0], [1.0, 2.0]])).power(0.5)
            >>> torch.allclose(root.to_dense() @ root.to_dense(), torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
            True
        """
        p = check_power(p)
        damping = check_damping(damping)
        method = method or self._power_method
        check_choice(method, POWER_METHODS, "power method")
        if num_steps is not None:
            check_positive_int(num_steps, "num_steps")
        if p == 1:
            identity = operator_type("Identity")(self.shape[0], self.dtype, self.device)
            return self if damping == 0 else self + damping * identity
        if method == "exact":
            return self._power(p, damping)
        return operator_type("LanczosPower")(self, p, damping, num_steps)

    def eigenvalues(self) -> Tensor:
        """The ``D`` eigenvalues of ``op``, ascending, as a ``[D]`` tensor of its dtype and device.

        Exact, through structure where there is one (a Kronecker product's are the products
        ``e_1 ∘ ... ∘ e_k`` of its factors' eigenvalues, a block-diagonal operator's those of
        its blocks), otherwise from the dense matrix (``eigh`` in float64). Functions of the
        spectrum then cost ``O(D)``: ``logdet(op / T + τ I) = Σ_i log(e_i / T + τ)`` for many
        ``τ``, without refactorising.

        Example:
            >>> op = curvops.Kronecker(torch.diag(torch.tensor([1.0, 2.0])), 3 * torch.eye(2))
            >>> op.eigenvalues().tolist()
            [3.0, 3.0, 6.0, 6.0]
        """
        return self._eigenvalues().sort().values

    # ------------------------------------------------------------------ algebra
    def __add__(self, other: CurvatureOperator) -> CurvatureOperator:
        if not isinstance(other, CurvatureOperator):
            return NotImplemented
        return operator_type("Sum")([self, other])

    def __sub__(self, other: CurvatureOperator) -> CurvatureOperator:
        if not isinstance(other, CurvatureOperator):
            return NotImplemented
        return self + (-1.0) * other

    def __mul__(self, scale: float) -> CurvatureOperator:
        if isinstance(scale, Tensor) and scale.numel() == 1:
            scale = scale.item()
        if not isinstance(scale, Real):
            return NotImplemented
        return operator_type("Scaled")(self, float(scale))

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> CurvatureOperator:
        if not isinstance(scale, Real):
            return NotImplemented
        return self * (1.0 / float(scale))

    def __neg__(self) -> CurvatureOperator:
        return self * -1.0

    # ---------------------------------------------------------------- state dicts
    def state_dict(self) -> dict[str, Any]:
        """Tensors and small metadata that rebuild this operator; no pickled code.

        The result holds only tensors, strings, numbers, lists and dicts, so it survives
        ``torch.save`` and ``torch.load(..., weights_only=True)``. Rebuild it with
        :func:`curvops.from_state_dict` or load it into an operator of the same type and
        shapes with :meth:`load_state_dict`.

        Example:
            >>> op = curvops.Kronecker(torch.eye(2), torch.eye(3))
            >>> sd = op.state_dict()
            >>> sd["type"], sd["shape"], sorted(sd["tensors"])
            ('Kronecker', [6, 6], ['factor0', 'factor1'])
        """
        return {
            "type": self._state_type,
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "tensors": dict(self._state_tensors()),
            "children": [child.state_dict() for child in self._state_children()],
            "config": dict(self._state_config()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this operator's contents by ``state``, keeping its device.

        ``state`` must come from an operator of the same type, shape, dtype, tensor shapes
        and block labels (an operator built on the same layers); any mismatch, or a state
        dict that is not well formed, raises :class:`~curvops.errors.StateDictError` naming
        the key.

        Example:
            >>> op = curvops.Diagonal(torch.ones(2))
            >>> op.load_state_dict(curvops.Diagonal(torch.tensor([2.0, 3.0])).state_dict())
            >>> op.diagonal().tolist()
            [2.0, 3.0]
        """
        where = type(self).__name__
        check_state_matches(self.state_dict(), state, where)
        rebuilt = rebuild(state, self.device, None, where)
        self.__dict__.update(rebuilt.__dict__)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> CurvatureOperator:
        """A copy of this operator on another device and/or dtype.

        A bfloat16 or float16 ``dtype`` follows the precision policy: the copy is a
        :class:`~curvops.linalg.Cast` to ``dtype`` of the operator in float32, its computation
        dtype, so products take and give ``dtype`` tensors while decompositions keep float32's
        resolution (factors stored in bf16 would lose every eigenvalue below ``eps n max`` of
        bf16). ``.to(dtype=torch.float64)`` of such a ``Cast`` is the float32 operator in float64.

        Example:
            >>> curvops.Diagonal(torch.ones(2)).to(dtype=torch.float64).dtype
            torch.float64
            >>> half = curvops.Diagonal(torch.ones(2)).to(dtype=torch.bfloat16)
            >>> type(half).__name__, half.dtype, half.op.dtype
            ('Cast', torch.bfloat16, torch.float32)
        """
        cast = operator_type("Cast")
        device = device or self.device
        if dtype is None or dtype == self.dtype:
            return from_state_dict(self.state_dict(), device=device, dtype=dtype)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}.")
        compute = computation_dtype(dtype)
        op = from_state_dict(self.state_dict(), device=device, dtype=compute)
        if isinstance(op, cast) and op.op.dtype == op.dtype:
            op = op.op
        return op if compute == dtype else cast(op, dtype)
