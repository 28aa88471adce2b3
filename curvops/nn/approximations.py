"""The Kronecker approximations as objects: KFAC, EKFAC, TKFAC and TEKFAC.

Each knows which statistics it needs (TKFAC's trace terms; a second, correcting pass for
EKFAC and TEKFAC), how it makes a layer's blocks from them and how it damps them:

| approximation | weight block | separate bias block |
| --- | --- | --- |
| KFAC | ``G ⊗ A`` (``A ⊗ G`` for a transposed rule) | ``G`` |
| TKFAC | ``δ Ψ ⊗ Φ`` | ``G · tr(bias block) / tr G`` |
| EKFAC, TEKFAC | ``(Q_out ⊗ Q_in) diag(s) (Q_out ⊗ Q_in)^T``, KFAC's / TKFAC's basis | ``Q diag(s) Q^T`` |

Damping (:meth:`KroneckerApproximation.damped_inverse`): exact ``(B + λI)^-1`` unless
``factored``, which is KFAC's π-damping ``(G + π√λ I)^-1 ⊗ (A + √λ/π I)^-1`` with
``π² = (tr G / n_out) / (tr A / n_in)`` (Martens & Grosse 2015), and TKFAC's
``(√δ Ψ + √λ I)^-1 ⊗ (√δ Φ + √λ I)^-1`` (Gao et al. 2021: the same with unnormalised traces).
EKFAC's eigenvalues are explicit, so it has no factored form.

A layer with an exact rule (the normalization layers, :mod:`curvops.nn.layers.norm`) gets the
same blocks from every approximation: its exact block (:func:`exact_blocks`), ``Dense`` or
``Diagonal``, never corrected, damped exactly.

A grouped layer (``g > 1`` groups, statistics with a leading group axis) gets each of its
blocks as a :class:`~curvops.linalg.GroupedKronecker` (EKFAC: ``GroupedKroneckerEigen``): one
block per group (group ``j``'s entries are a range of the weight's flat order), each group's
factors, eigenbasis, corrections, traces and damping its own, computed for all groups at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..linalg import (
    CurvatureOperator,
    Dense,
    Diagonal,
    Factor,
    GroupedKronecker,
    GroupedKroneckerEigen,
    Kronecker,
    KroneckerEigen,
    computation_dtype,
)
from .fisher import FisherType
from .layers.rule import KroneckerLayer
from .statistics import Corrections, LayerStatistics

Basis = tuple[Tensor, Tensor | None, Tensor]
"""A layer's eigenbasis ``(Q_out, Q_in, Q_bias)`` (``Q_in`` is ``None`` for a diagonal input
factor: the identity)."""


def _trace(matrix: Tensor) -> Tensor:
    """``tr M``, or every group's for ``[g, n, n]``."""
    return matrix.trace() if matrix.ndim == 2 else matrix.diagonal(dim1=-2, dim2=-1).sum(-1)


def _scaled(scale: Tensor, matrix: Tensor) -> Tensor:
    """``c M``, or every group's ``c_j M_j`` for ``[g]`` and ``[g, n, n]``."""
    return scale.reshape(*scale.shape, 1, 1) * matrix


def _kronecker(layer: KroneckerLayer) -> type[Kronecker | GroupedKronecker]:
    return Kronecker if layer.groups == 1 else GroupedKronecker


def _kronecker_eigen(layer: KroneckerLayer) -> type[KroneckerEigen | GroupedKroneckerEigen]:
    return KroneckerEigen if layer.groups == 1 else GroupedKroneckerEigen


@dataclass(frozen=True)
class KroneckerApproximation:
    """One Kronecker approximation (see the module docstring).

    Attributes:
        name: ``"kfac"``, ``"ekfac"``, ``"tkfac"`` or ``"tekfac"``.
        trace_restricted: TKFAC's factors ``δ Ψ ⊗ Φ`` instead of ``G ⊗ A``.
        corrected: EKFAC's eigenvalues ``s``, measured in a second pass, in the factors' eigenbasis.
    """

    name: str
    trace_restricted: bool
    corrected: bool

    def __repr__(self) -> str:
        return self.label

    @property
    def label(self) -> str:
        """The name in capitals, for messages."""
        return self.name.upper()

    def check(self, fisher: FisherType) -> None:
        """Raise unless ``fisher`` gives what the approximation needs (output gradients, except KFAC)."""
        if (self.corrected or self.trace_restricted) and not fisher.backward:
            raise ValueError(f"{self.label} needs output gradients; fisher_type={fisher.name!r} has none.")

    def check_factored(self, factored: bool) -> None:
        """Raise if ``factored`` damping is asked of an approximation without factors to damp."""
        if factored and self.corrected:
            raise ValueError(
                f"{self.label} has no factored damping: its eigenvalues are explicit, so its damped "
                "inverse (s + λ)^-1 is exact and cheap. Use factored=False."
            )

    def default_decomposition_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """What the builders' ``decomposition_dtype=None`` means for a model of ``dtype``: float64 for
        KFAC and TKFAC, whose inverse and logdet come from the factors' eigenvalues (a float32
        ``eigh`` put a float32 CNN's KFAC inverse at damping ``1e-3`` twice as far from the
        float64 model's, 3.1e-2 against 1.5e-2); the factors' own dtype
        (:func:`~curvops.linalg.computation_dtype`) for EKFAC and TEKFAC, which take only the
        eigenbasis and measure their eigenvalues in it (its ``eigh`` twice as fast).

        Example:
            >>> APPROXIMATIONS["ekfac"].default_decomposition_dtype(torch.bfloat16)
            torch.float32
            >>> APPROXIMATIONS["kfac"].default_decomposition_dtype(torch.float32)
            torch.float64
        """
        return computation_dtype(dtype) if self.corrected else torch.float64

    def corrects(self, layer: KroneckerLayer) -> bool:
        """Whether the layer's blocks get corrected eigenvalues (EKFAC, TEKFAC; not an exact block)."""
        return self.corrected and not layer.rule.exact

    def factors(self, statistics: LayerStatistics) -> tuple[Tensor, Tensor, Tensor]:
        """``(output, input, bias)`` factors: KFAC's ``(G, A, G)``, TKFAC's ``(δΨ, Φ, scaled G)``."""
        s = statistics
        if not self.trace_restricted:
            return s.output_factor, s.input_factor, s.output_factor
        g = s.output_factor
        bias = g if s.bias_trace is None else _scaled(s.bias_trace / _trace(g), g)
        return _scaled(s.trace, s.trace_output_factor), s.trace_input_factor, bias

    def kronecker_blocks(
        self, statistics: LayerStatistics, decomposition_dtype: torch.dtype = torch.float64
    ) -> list[CurvatureOperator]:
        """The uncorrected blocks of a layer: its weight's (with a joint bias), then a separate bias's
        (a layer with an exact block: :func:`exact_blocks`; a grouped layer's are ``GroupedKronecker``
        blocks, one Kronecker block per group). KFAC's weight block ``G ⊗ A`` and bias block ``G``
        hold one :class:`~curvops.linalg.Factor` ``G``: one ``eigh`` (in ``decomposition_dtype``)
        serves both."""
        layer = statistics.layer
        if layer.rule.exact:
            return exact_blocks(statistics, decomposition_dtype)
        output, input, bias = self.factors(statistics)
        shared = Factor(output, decomposition_dtype, symmetric=True)  # second moments Σ x xᵀ
        bias_factor = shared if bias is output else Factor(bias, decomposition_dtype, symmetric=True)
        blocks: list[CurvatureOperator] = []
        if layer.weight is not None:
            factors = layer.kronecker_order(shared, Factor(input, decomposition_dtype, symmetric=True))
            blocks.append(_kronecker(layer)(*factors, decomposition_dtype=decomposition_dtype))
        if layer.separate_bias:
            block = Dense if layer.groups == 1 else GroupedKronecker
            blocks.append(block(bias_factor, decomposition_dtype=decomposition_dtype))
        return blocks

    def eigenbasis(
        self, statistics: LayerStatistics, blocks: list[CurvatureOperator] | None = None
    ) -> tuple[Basis, list[Tensor | None]]:
        """The eigenbasis of the uncorrected blocks and their own eigenvalues there, ``[s_weight,
        s_bias]`` (``None`` for a block the layer does not have): where EKFAC starts. A grouped
        layer's bases and eigenvalues have a leading group axis (batched ``eigh``).

        ``blocks``: the layer's :meth:`kronecker_blocks` (default: made here, decomposed in
        float64), whose cached decompositions it uses (filled beforehand, e.g. spread over ranks
        by :func:`~curvops.distributed.decompose_blocks`, it needs no ``eigh``)."""
        layer = statistics.layer
        blocks = self.kronecker_blocks(statistics) if blocks is None else blocks
        weight = blocks[0] if layer.weight is not None else None
        e_bias, q_bias = blocks[-1].eigendecompositions()[0] if layer.separate_bias else (None, None)
        if weight is None:
            q_out, q_in = q_bias, None
        else:
            (_, q_out), (_, q_in) = layer.kronecker_order(*weight.eigendecompositions())
        scales = [None if weight is None else weight.eigen().spectrum, e_bias]
        return (q_out, q_in, q_bias if layer.separate_bias else q_out), scales

    def corrected_blocks(
        self, layer: KroneckerLayer, basis: Basis, corrections: Corrections
    ) -> list[CurvatureOperator]:
        """EKFAC's blocks: ``KroneckerEigen`` in ``basis`` with the corrected eigenvalues
        (``GroupedKroneckerEigen`` for a grouped layer). The basis is the factors' own ``eigh``
        (:meth:`eigenbasis`), so its ``O(n³)`` orthonormality check is skipped."""
        q_out, q_in, q_bias = basis
        eigen = _kronecker_eigen(layer)
        blocks: list[CurvatureOperator] = []
        if corrections.weight is not None:
            blocks.append(eigen._of_eigh(layer.kronecker_order(q_out, q_in), corrections.weight))
        if corrections.bias is not None:
            blocks.append(eigen._of_eigh([q_bias], corrections.bias))
        return blocks

    def damped_inverse(self, block: CurvatureOperator, damping: float, factored: bool) -> CurvatureOperator:
        """``(B + λI)^-1`` of one of the approximation's blocks, or its factored form (a grouped
        layer's: each group's own π-dampings)."""
        if factored and isinstance(block, (Kronecker, GroupedKronecker)) and len(block.factors) > 1:
            balance = "trace" if self.trace_restricted else "mean"
            return block.factor_inverse(block.pi_dampings(damping, balance=balance))
        return block.inverse(damping)


def exact_blocks(
    statistics: LayerStatistics, decomposition_dtype: torch.dtype = torch.float64
) -> list[CurvatureOperator]:
    """The exact block ``B`` over ``[vec weight; bias]`` as the layer's blocks: ``B`` itself for a
    joint bias, else its sub-blocks ``B[p, p]`` of each chosen parameter ``p``; ``Dense`` (symmetrised,
    decomposed in ``decomposition_dtype``), or ``Diagonal`` for a 1-D ``B``.

    Example:
        >>> from curvops.nn.layers import KroneckerLayer, LayerNormRule
        >>> norm = torch.nn.LayerNorm(2)
        >>> layer = KroneckerLayer("ln", norm, LayerNormRule(), norm.weight, norm.bias, False)
        >>> blocks = exact_blocks(LayerStatistics(layer, exact_block=torch.eye(4)))
        >>> [type(b).__name__ for b in blocks], [b.shape for b in blocks]
        (['Dense', 'Dense'], [(2, 2), (2, 2)])
    """
    layer, block = statistics.layer, statistics.exact_block
    sizes = [p.numel() for p in (layer.weight, layer.bias) if p is not None]
    if layer.joint:
        sizes = [sum(sizes)]
    blocks: list[CurvatureOperator] = []
    start = 0
    for size in sizes:
        part = slice(start, start + size)
        start += size
        if block.ndim == 1:
            blocks.append(Diagonal(block[part]))
        else:
            square = block[part, part]
            blocks.append(Dense((square + square.T) / 2, decomposition_dtype=decomposition_dtype))
    return blocks


KFAC_APPROXIMATION = KroneckerApproximation("kfac", trace_restricted=False, corrected=False)
EKFAC_APPROXIMATION = KroneckerApproximation("ekfac", trace_restricted=False, corrected=True)
TKFAC_APPROXIMATION = KroneckerApproximation("tkfac", trace_restricted=True, corrected=False)
TEKFAC_APPROXIMATION = KroneckerApproximation("tekfac", trace_restricted=True, corrected=True)

APPROXIMATIONS = {
    a.name: a for a in (KFAC_APPROXIMATION, EKFAC_APPROXIMATION, TKFAC_APPROXIMATION, TEKFAC_APPROXIMATION)
}
"""Every Kronecker approximation by name."""

KRONECKER_APPROXIMATIONS = tuple(APPROXIMATIONS)


def approximation(
    name: str, allowed: tuple[str, ...] = KRONECKER_APPROXIMATIONS, what: str = "Kronecker approximation"
) -> KroneckerApproximation:
    """The approximation called ``name``, one of ``allowed``.

    Example:
        >>> approximation("tekfac").corrected
        True
    """
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"Unknown {what} {name!r}; choose one of {allowed}.")
    return APPROXIMATIONS[name]
