"""Operators built from other operators: ``Scaled``, ``Sum`` and ``BlockDiagonal``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from .base import CurvatureOperator
from .checks import _scalar
from .diagonal import Identity
from .factor import decompose_factors
from .state import LABELS, REAL, StateSchema


def _check_operators(ops: Sequence[CurvatureOperator], what: str) -> None:
    if not ops:
        raise ValueError(f"{what} needs at least one operator.")
    for op in ops:
        if not isinstance(op, CurvatureOperator):
            raise TypeError(f"{what} takes curvops operators, got {type(op).__name__}.")
    places = {(op.dtype, op.device) for op in ops}
    if len(places) > 1:
        raise ValueError(
            f"All operators in a {what} must share one dtype and device, got {sorted(map(str, places))}."
        )


def _real(value: Any, what: str) -> float:
    """``value`` as a float: a real number (or one-element tensor), not a bool or a string."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{what} must be a real number, got {value!r}.")
    return float(value)


class Scaled(CurvatureOperator):
    """``c · op`` for a real scalar ``c``.

    For ``c > 0`` everything stays exact through ``op``'s structure:
    ``logdet(c op + λI) = D log c + logdet(op + (λ/c) I)`` and
    ``(c op + λI)^p = c^p (op + (λ/c) I)^p`` (``p = -1`` the inverse); the eigenvalues are
    ``c`` times ``op``'s for any ``c``. Other ``c`` fall back to the dense matrix.

    Args:
        op: the operator.
        scale: finite real ``c``.

    Example:
        >>> op = 2.0 * curvops.Diagonal(torch.tensor([1.0, 3.0]))
        >>> op.trace().item(), (op.inverse() @ torch.ones(2)).tolist()
        (8.0, [0.5, 0.1666666716337204])
    """

    def __init__(self, op: CurvatureOperator, scale: float) -> None:
        _check_operators([op], "Scaled")
        scale = _real(scale, "Scaled's scale")
        if not math.isfinite(scale):
            raise ValueError(f"Scaled needs a finite scale, got {scale}.")
        if isinstance(op, Scaled):
            op, scale = op.op, op.scale * scale
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op = op
        self.scale = scale

    def _matmat(self, x: Tensor) -> Tensor:
        return self.scale * self.op._matmat(x)

    def _to_dense(self) -> Tensor:
        return self.scale * self.op._to_dense()

    def _diagonal(self) -> Tensor:
        return self.scale * self.op._diagonal()

    def _trace(self) -> Tensor:
        return self.scale * self.op._trace()

    def _logdet(self, damping: float) -> Tensor:
        if self.scale <= 0:
            return super()._logdet(damping)
        return self.shape[0] * math.log(self.scale) + self.op._logdet(damping / self.scale)

    def _inverse(self, damping: float, factored: bool) -> CurvatureOperator:
        if self.scale <= 0:
            return super()._inverse(damping, factored)
        return Scaled(self.op._inverse(damping / self.scale, factored), 1.0 / self.scale)

    def _power(self, p: float, damping: float) -> CurvatureOperator:
        if self.scale <= 0:
            return super()._power(p, damping)
        return Scaled(self.op._power(p, damping / self.scale), self.scale**p)

    def _eigenvalues(self) -> Tensor:
        return self.scale * self.op._eigenvalues()

    def _state_children(self) -> list[CurvatureOperator]:
        return [self.op]

    def _state_config(self) -> dict[str, float]:
        return {"scale": self.scale}

    @classmethod
    def _state_schema(cls, tensors: dict[str, Any]) -> StateSchema:
        return StateSchema(children=1, config={"scale": REAL})

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> Scaled:
        return cls(children[0], config["scale"])


def _identity_multiple(op: CurvatureOperator) -> float | None:
    """``c`` if ``op`` is ``c · I``, else ``None``."""
    if isinstance(op, Identity):
        return 1.0
    if isinstance(op, Scaled) and isinstance(op.op, Identity):
        return op.scale
    return None


class Sum(CurvatureOperator):
    """``Σ_i op_i + s I``: a sum of operators plus a multiple of the identity.

    Identity terms (``λ * Identity(D)``, of any dtype) and nested sums are folded into the
    shift ``s``, so ``op + λ * Identity(D)`` is *damping*: its ``inverse``, ``power``, ``logdet``,
    ``det`` and ``eigenvalues`` go exactly through ``op``'s structure with damping ``λ``. A sum
    of several non-identity operators has no structure to exploit and falls back to the dense
    matrix (or the estimators).

    Args:
        terms: operators of one shape, dtype and device.
        shift: ``s``, added to the diagonal.

    Example:
        >>> k = curvops.Kronecker(torch.eye(2), torch.eye(2))
        >>> damped = k + 0.5 * curvops.Identity(4)
        >>> damped.terms, damped.shift
        ((Kronecker(shape=(4, 4), dtype=torch.float32, device=cpu),), 0.5)
        >>> round(damped.logdet().item(), 4)  # 4 log 1.5
        1.6219
    """

    def __init__(self, terms: Sequence[CurvatureOperator], shift: float = 0.0) -> None:
        terms = list(terms)
        if not terms or not all(isinstance(op, CurvatureOperator) for op in terms):
            raise TypeError("Sum takes a non-empty sequence of curvops operators.")
        sizes = {op.shape[0] for op in terms}
        if len(sizes) > 1:
            raise ValueError(f"All operators in a Sum must have one shape, got sizes {sorted(sizes)}.")
        flat, shift = [], _real(shift, "Sum's shift")
        for op in terms:
            if isinstance(op, Sum):
                flat.extend(op.terms)
                shift += op.shift
            elif _identity_multiple(op) is not None:
                shift += _identity_multiple(op)
            else:
                flat.append(op)
        if not math.isfinite(shift):
            raise ValueError(f"Sum needs a finite shift, got {shift}.")
        if not flat:
            flat, shift = [shift * Identity(terms[0].shape[0], terms[0].dtype, terms[0].device)], 0.0
        _check_operators(flat, "Sum")
        super().__init__(flat[0].shape[0], flat[0].dtype, flat[0].device)
        self.terms = tuple(flat)
        self.shift = shift

    def _matmat(self, x: Tensor) -> Tensor:
        result = self.shift * x
        for op in self.terms:
            result = result + op._matmat(x)
        return result

    def _to_dense(self) -> Tensor:
        eye = torch.eye(self.shape[0], dtype=self.dtype, device=self.device)
        return sum((op._to_dense() for op in self.terms), self.shift * eye)

    def _diagonal(self) -> Tensor:
        return sum(
            (op._diagonal() for op in self.terms),
            torch.full((self.shape[0],), self.shift, dtype=self.dtype, device=self.device),
        )

    def _trace(self) -> Tensor:
        return sum(
            (op._trace() for op in self.terms),
            torch.tensor(self.shift * self.shape[0], dtype=self.dtype, device=self.device),
        )

    def _single_term_damping(self, damping: float) -> float | None:
        """The damping of the only term, if ``self + λI`` is ``term + (λ + s) I`` with ``λ + s >= 0``."""
        total = damping + self.shift
        return total if len(self.terms) == 1 and total >= 0 else None

    def _logdet(self, damping: float) -> Tensor:
        total = self._single_term_damping(damping)
        if total is None:
            return super()._logdet(damping)
        return self.terms[0]._logdet(total)

    def _inverse(self, damping: float, factored: bool) -> CurvatureOperator:
        total = self._single_term_damping(damping)
        if total is None:
            return super()._inverse(damping, factored)
        return self.terms[0]._inverse(total, factored)

    def _power(self, p: float, damping: float) -> CurvatureOperator:
        total = self._single_term_damping(damping)
        if total is None:
            return super()._power(p, damping)
        return self.terms[0]._power(p, total)

    def _eigenvalues(self) -> Tensor:
        if len(self.terms) > 1:
            return super()._eigenvalues()
        return self.terms[0]._eigenvalues() + self.shift

    def _state_children(self) -> list[CurvatureOperator]:
        return list(self.terms)

    def _state_config(self) -> dict[str, float]:
        return {"shift": self.shift}

    @classmethod
    def _state_schema(cls, tensors: dict[str, Any]) -> StateSchema:
        return StateSchema(children=None, config={"shift": REAL})

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> Sum:
        return cls(children, config["shift"])


class BlockDiagonal(CurvatureOperator):
    """``diag(B_1, ..., B_L)`` with square blocks of any sizes (e.g. one per layer).

    Every quantity splits over the blocks: ``tr = Σ tr B_l``,
    ``logdet(· + λI) = Σ logdet(B_l + λI)``, ``(· + λI)^p = diag((B_l + λI)^p)`` (``p = -1``
    the inverse; labels kept), the eigenvalues are the blocks' together, each block using its
    own structure (Kronecker, eigenbasis, dense, ...).

    Args:
        blocks: operators on one dtype and device.
        labels: optional distinct names of the blocks (e.g. the layers'), for
            :meth:`block` and for naming a block in state-dict errors.

    Example:
        >>> op = curvops.BlockDiagonal(
        ...     [curvops.Diagonal(torch.ones(2)), curvops.Dense(2 * torch.eye(3))], labels=["bias", "weight"]
        ... )
        >>> op.shape, op.trace().item(), op.block_sizes, op.block("weight").shape
        ((5, 5), 8.0, (2, 3), (3, 3))
    """

    def __init__(self, blocks: Sequence[CurvatureOperator], labels: Sequence[str] | None = None) -> None:
        blocks = tuple(blocks)
        _check_operators(blocks, "BlockDiagonal")
        if labels is not None:
            labels = tuple(str(label) for label in labels)
            if len(labels) != len(blocks) or len(set(labels)) != len(labels):
                raise ValueError(f"BlockDiagonal needs {len(blocks)} distinct labels, got {list(labels)}.")
        super().__init__(sum(b.shape[0] for b in blocks), blocks[0].dtype, blocks[0].device)
        self.blocks = blocks
        self.labels = labels

    def block(self, label: str) -> CurvatureOperator:
        """The block called ``label``."""
        if self.labels is None or label not in self.labels:
            raise KeyError(f"No block labelled {label!r}; the labels are {self.labels}.")
        return self.blocks[self.labels.index(label)]

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """The blocks' sizes; their sum is ``D``."""
        return tuple(b.shape[0] for b in self.blocks)

    def _matmat(self, x: Tensor) -> Tensor:
        parts = x.split(self.block_sizes, dim=0)
        return torch.cat([b._matmat(p) for b, p in zip(self.blocks, parts, strict=True)], dim=0)

    def _to_dense(self) -> Tensor:
        return torch.block_diag(*(b._to_dense() for b in self.blocks))

    def _diagonal(self) -> Tensor:
        return torch.cat([b._diagonal() for b in self.blocks])

    def _trace(self) -> Tensor:
        return torch.stack([b._trace() for b in self.blocks]).sum()

    def _logdet(self, damping: float) -> Tensor:
        decompose_factors(self.blocks)
        return torch.stack([b._logdet(damping) for b in self.blocks]).sum()

    def _inverse(self, damping: float, factored: bool) -> BlockDiagonal:
        decompose_factors(self.blocks)  # every eigh first: no transient of one meets a block's inverse
        return BlockDiagonal([b._inverse(damping, factored) for b in self.blocks], self.labels)

    def _power(self, p: float, damping: float) -> BlockDiagonal:
        decompose_factors(self.blocks)
        return BlockDiagonal([b._power(p, damping) for b in self.blocks], self.labels)

    def _eigenvalues(self) -> Tensor:
        return torch.cat([b._eigenvalues() for b in self.blocks])

    def _state_children(self) -> list[CurvatureOperator]:
        return list(self.blocks)

    def _state_config(self) -> dict[str, list[str]]:
        return {} if self.labels is None else {"labels": list(self.labels)}

    @classmethod
    def _state_schema(cls, tensors: dict[str, Any]) -> StateSchema:
        return StateSchema(children=None, config={"labels": LABELS})

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> BlockDiagonal:
        return cls(children, config.get("labels"))


class Cast(CurvatureOperator):
    """``op`` in another dtype: products take and give ``dtype`` tensors, computed in ``op.dtype``.

    The precision policy for bfloat16 / float16 models: their statistics are accumulated in
    float32 (bf16's 8 bits would round away every eigenvalue below ``eps n max ≈ 6%`` of the
    largest), decompositions run in float64, and results come back in the model's dtype.
    Every quantity goes through ``op``'s structure in ``op``'s precision and is then cast:
    ``(Cast(op) + λI)^p = Cast((op + λI)^p)``, ``logdet``, ``trace``, ``eigenvalues`` and
    ``to_dense`` of ``op`` cast to ``dtype``.

    Args:
        op: the operator, in its computation dtype.
        dtype: the floating-point dtype of the vectors it takes and gives.

    Example:
        >>> op = curvops.linalg.Cast(curvops.Diagonal(torch.tensor([1.0, 3.0])), torch.bfloat16)
        >>> (op.inverse(damping=1.0) @ torch.ones(2, dtype=torch.bfloat16)).tolist()
        [0.5, 0.25]
    """

    def __init__(self, op: CurvatureOperator, dtype: torch.dtype) -> None:
        _check_operators([op], "Cast")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"Cast needs a floating-point torch.dtype, got {dtype!r}.")
        if isinstance(op, Cast):
            op = op.op
        super().__init__(op.shape[0], dtype, op.device)
        self.op = op

    def _matmat(self, x: Tensor) -> Tensor:
        return self.op._matmat(x.to(self.op.dtype)).to(self.dtype)

    def _to_dense(self) -> Tensor:
        return self.op._to_dense().to(self.dtype)

    def _diagonal(self) -> Tensor:
        return self.op._diagonal().to(self.dtype)

    def _trace(self) -> Tensor:
        return self.op._trace().to(self.dtype)

    def _logdet(self, damping: float) -> Tensor:
        return self.op._logdet(damping).to(self.dtype)

    def _inverse(self, damping: float, factored: bool) -> CurvatureOperator:
        return Cast(self.op._inverse(damping, factored), self.dtype)

    def _power(self, p: float, damping: float) -> CurvatureOperator:
        return Cast(self.op._power(p, damping), self.dtype)

    def _eigenvalues(self) -> Tensor:
        return self.op._eigenvalues().to(self.dtype)

    def _state_children(self) -> list[CurvatureOperator]:
        return [self.op]

    @classmethod
    def _state_schema(cls, tensors: dict[str, Any]) -> StateSchema:
        return StateSchema(children=1)

    @classmethod
    def _from_state(cls, tensors, children, config, dtype, device) -> Cast:
        return cls(children[0], dtype)
