"""Kronecker statistics as values: one immutable record per layer.

A pass over the data (or the optimizer's training step) produces, per layer, the *sums*
``Σ w a a^T`` (with their count ``Σ w · positions``), ``Σ g g^T`` and TKFAC's terms; sums add
(``+``: more batches, more ranks). :meth:`LayerStatistics.normalised` divides them into the
factors ``A``, ``G`` (``δ``, ``Φ``, ``Ψ``), and normalised values average
(:meth:`LayerStatistics.average`: the optimizer's running averages). A normalization layer's
statistic is the sum ``Σ v v^T`` of its exact block instead (:mod:`curvops.nn.layers.norm`),
normalised like ``G``. EKFAC's eigenvalue sums are :class:`Corrections`, alike.

A grouped layer's statistics (``layer.groups = g > 1``) carry a leading group axis (``A``:
``[g, n_in, n_in]``, ``δ``: ``[g]``): every operation here acts per group.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .layers.rule import KroneckerLayer

STATISTICS = (
    "input_factor",
    "output_factor",
    "trace",
    "bias_trace",
    "trace_input_factor",
    "trace_output_factor",
    "exact_block",
)
"""The tensors of :class:`LayerStatistics`, by field name."""


def _sum(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def _trace_normalised(factor: Tensor | None) -> Tensor | None:
    """``F / tr F`` (a 1-D factor is a diagonal; a 3-D one ``[g, n, n]`` is normalised per group)."""
    if factor is None:
        return None
    if factor.ndim == 3:
        return factor / factor.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
    return factor / (factor.sum() if factor.ndim == 1 else factor.trace())


def _nonpositive_trace(trace: Tensor) -> str:
    """The first ``δ <= 0`` (or ``nan``) of a layer's ``δ`` (one per group for ``[g]``), for errors."""
    flat = trace.reshape(-1)
    group = int((~(flat > 0)).nonzero()[0, 0])
    return f"{float(flat[group])}" + ("" if trace.ndim == 0 else f" in group {group}")


@dataclass(frozen=True, eq=False)
class LayerStatistics:
    """The Kronecker statistics of one layer: sums, or (after :meth:`normalised`) factors.

    Attributes:
        layer: the layer they belong to.
        input_factor: ``A`` (``[n_in, n_in]``, or ``[n_in]`` for a diagonal factor); as a sum
            ``Σ w a a^T``.
        output_factor: ``G`` (``[n_out, n_out]``); as a sum ``Σ g g^T`` (``None`` before any
            output gradient).
        trace, trace_input_factor, trace_output_factor: TKFAC's ``δ``, ``Φ`` and ``Ψ``
            (``tr Φ = tr Ψ = 1`` once normalised), or ``None``.
        bias_trace: the trace of a separate bias's true block, or ``None``.
        exact_block: the exact block of a layer with an exact rule (``[D, D]``, or ``[D]`` for
            its diagonal), as a sum ``Σ v v^T`` over per-datum gradients; ``None`` otherwise.
        input_count: what ``A``'s sum is divided by (``1`` once normalised).

    Example:
        >>> layer = None  # any KroneckerLayer; values of the same layer add
        >>> a = LayerStatistics(layer, input_factor=torch.eye(2), output_factor=torch.eye(3), input_count=4.0)
        >>> total = (a + a).normalised(scale=2.0)
        >>> total.input_factor[0, 0].item(), total.output_factor[0, 0].item()
        (0.25, 1.0)
    """

    layer: KroneckerLayer
    input_factor: Tensor | None = None
    output_factor: Tensor | None = None
    trace: Tensor | None = None
    bias_trace: Tensor | None = None
    trace_input_factor: Tensor | None = None
    trace_output_factor: Tensor | None = None
    exact_block: Tensor | None = None
    input_count: float = 0.0

    def tensors(self) -> dict[str, Tensor]:
        """The statistics that are set, by name (:data:`STATISTICS` order)."""
        return {name: getattr(self, name) for name in STATISTICS if getattr(self, name) is not None}

    @property
    def empty(self) -> bool:
        """Whether no batch has entered yet."""
        return self.input_factor is None and self.exact_block is None

    def __add__(self, other: LayerStatistics) -> LayerStatistics:
        if other.layer is not self.layer:
            raise ValueError("Statistics of different layers do not add.")
        sums = {name: _sum(getattr(self, name), getattr(other, name)) for name in STATISTICS}
        return LayerStatistics(self.layer, input_count=self.input_count + other.input_count, **sums)

    def accumulate(self, other: LayerStatistics) -> LayerStatistics:
        """``self + other`` with ``other``'s tensors added into ``self``'s in place (no new
        ``n x n`` buffers per batch): for a running total, which owns its tensors. A tensor
        ``other`` shares with ``self`` has been added into already (a rule's
        :func:`~curvops.nn.layers.rule.second_moment` with ``out``)."""
        if other.layer is not self.layer:
            raise ValueError("Statistics of different layers do not add.")
        sums = {}
        for name in STATISTICS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is None or theirs is None or mine is theirs:
                sums[name] = theirs if mine is None else mine
            else:
                sums[name] = mine.add_(theirs)
        return LayerStatistics(self.layer, input_count=self.input_count + other.input_count, **sums)

    def replace(self, **tensors: Tensor | None) -> LayerStatistics:
        """The same statistics with some tensors replaced."""
        return dataclasses.replace(self, **tensors)

    def normalised(self, scale: float) -> LayerStatistics:
        """The factors from the sums: ``A = Σ w a a^T / count``, ``G = Σ g g^T / scale`` (``scale``
        is ``Z``, times the samples per datum for ``"mc"``), ``δ``, a bias's trace and an exact
        block ``/ scale``, ``Φ`` and ``Ψ`` divided by their traces. Raises ``ValueError`` (naming
        the layer) for TKFAC's ``δ <= 0`` or ``nan``."""
        if self.trace is not None and not bool((self.trace > 0).all()):
            delta = _nonpositive_trace(self.trace)
            raise ValueError(
                f"Layer {self.layer.name!r} has δ = {delta} (its block's trace): TKFAC "
                "needs δ > 0 (no curvature at δ = 0; nan: the statistics overflow)."
            )

        def divided(value: Tensor | None, by: float | Tensor) -> Tensor | None:
            return None if value is None else value / by

        return LayerStatistics(
            self.layer,
            input_factor=divided(self.input_factor, self.input_count),
            output_factor=divided(self.output_factor, scale),
            trace=divided(self.trace, scale),
            bias_trace=divided(self.bias_trace, scale),
            trace_input_factor=_trace_normalised(self.trace_input_factor),
            trace_output_factor=_trace_normalised(self.trace_output_factor),
            exact_block=divided(self.exact_block, scale),
            input_count=1.0,
        )

    def average(self, new: LayerStatistics, decay: float) -> LayerStatistics:
        """The running average ``β self + (1 - β) new`` (``β = decay``) of normalised statistics;
        ``new`` itself while ``self`` is :attr:`empty`."""
        if self.empty:
            return new
        mixed = {name: torch.lerp(value, getattr(self, name), decay) for name, value in new.tensors().items()}
        return LayerStatistics(self.layer, input_count=new.input_count, **mixed)

    def checks(self) -> list[Tensor]:
        """0-dim boolean tensors, all true when the statistics are usable: every statistic finite,
        TKFAC's ``δ`` (if any) positive (see :func:`all_usable`)."""
        checks = [torch.isfinite(value).all() for value in self.tensors().values()]
        return checks if self.trace is None else [*checks, (self.trace > 0).all()]


def all_usable(statistics: list[LayerStatistics]) -> bool:
    """Whether every layer's statistics pass their :meth:`LayerStatistics.checks` (one device
    synchronisation for all of them).

    Example:
        >>> all_usable([LayerStatistics(None, input_factor=torch.tensor([1.0, float("nan")]))])
        False
    """
    checks = [check for s in statistics for check in s.checks()]
    return not checks or bool(torch.stack(checks).all())


@dataclass(frozen=True, eq=False)
class Corrections:
    """EKFAC's eigenvalue sums of one layer: ``Σ (Q^T ∇_W ℓ Q_in)²`` for the weight
    (``[n_out, n_in]``, transposed for a transposed rule) and ``Σ (Q_bias^T ∇_b ℓ)²`` for a
    separate bias (``None`` where the layer has no such block)."""

    weight: Tensor | None = None
    bias: Tensor | None = None

    def __add__(self, other: Corrections) -> Corrections:
        return Corrections(_sum(self.weight, other.weight), _sum(self.bias, other.bias))

    def __mul__(self, scale: float) -> Corrections:
        return Corrections(*(None if s is None else s * scale for s in (self.weight, self.bias)))

    def __truediv__(self, scale: float) -> Corrections:
        return Corrections(*(None if s is None else s / scale for s in (self.weight, self.bias)))
