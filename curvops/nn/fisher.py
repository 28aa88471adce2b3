"""The Fisher types: which output-space vectors are backpropagated for the Kronecker factors.

For a datum's output ``f_n`` and loss ``ℓ_n``, each type gives columns ``c`` whose
backpropagated gradients ``g_nc`` make ``G = (1/Z) Σ g g^T`` (see :mod:`curvops.nn.layers.rule`):

- ``"type-2"``: the columns of ``S_n`` with ``S_n S_n^T = ∇²_f ℓ_n``
  (:func:`~curvops.nn.losses.loss_hessian_factor`): KFAC of the GGN, for any loss convex and
  twice differentiable in the outputs (closed forms for ``MSELoss``, ``CrossEntropyLoss`` with
  class weights and label smoothing, ``BCEWithLogitsLoss`` with ``weight`` and ``pos_weight``;
  per-datum Hessians by autodiff for the others);
- ``"mc"``: ``∇_f ℓ(f_n, ŷ_nm)`` for ``mc_samples`` labels ``ŷ`` drawn from the model (``G``
  divided by ``mc_samples``), the same draws as :class:`~curvops.FisherMC`; an unweighted,
  unsmoothed likelihood loss only (a weighted or smoothed loss is not the model's ``-log p``);
- ``"empirical"``: ``∇_f ℓ(f_n, y_n)`` at the true labels (of a likelihood loss, weighted or
  smoothed as it is);
- ``"forward-only"``: no backward pass, ``G = I`` (a normalization layer's exact block: ``I``).

Each type is one :class:`FisherType` object in :data:`FISHER_TYPES`, which also names its
exact counterpart (the operator its unsupported blocks, influence's ``"ggn"`` and
``"diagonal"`` come from) and what it asks of the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..linalg import CurvatureOperator
from .curvature import GGN, EmpiricalFisher, FisherMC
from .losses import LossAdapter, loss_hessian_factor
from .statistics import LayerStatistics


@dataclass(frozen=True)
class FisherType:
    """One Fisher type.

    Attributes:
        name: its ``fisher_type`` string.
        backward: whether it backpropagates output gradients (``False``: ``G = I``).
        likelihood: whether the loss must be a negative log-likelihood.
        sampling: whether its matrix is the Fisher of the model's own distribution, so the loss
            must be an unweighted, unsmoothed likelihood (:meth:`LossAdapter.check_sampling`).
        sampled: whether its labels are drawn (per batch index: a pass's sums then depend on
            the order of the batches), ``G`` divided by ``mc_samples``.
        exact: its exact operator's class (``GGN`` for ``"type-2"`` and ``"forward-only"``).
    """

    name: str
    backward: bool
    likelihood: bool
    sampling: bool
    sampled: bool
    exact: type
    _columns: Callable[..., Tensor] | None = None

    def __repr__(self) -> str:
        return repr(self.name)

    def loss(self, loss_fn: Callable[[Tensor, Tensor], Tensor], what: str) -> LossAdapter:
        """``loss_fn`` as a :class:`LossAdapter`, checked for what this type needs of it."""
        loss = LossAdapter(loss_fn, likelihood=self.likelihood, what=what)
        if self.sampling:
            loss.check_sampling(what)
        return loss

    def scale(self, normalizer: float, mc_samples: int) -> float:
        """What the summed output-gradient statistics are divided by: ``Z`` (times the samples)."""
        return normalizer * (mc_samples if self.sampled else 1)

    def columns(
        self,
        loss: LossAdapter,
        output: Tensor,
        targets: Tensor,
        count: float,
        mc_samples: int = 1,
        seed: int = 0,
        index: int = 0,
    ) -> Tensor:
        """The ``[K, *output.shape]`` output-space vectors to backpropagate for one batch
        (``"mc"`` draws its labels with ``(seed, index)``, :meth:`LossAdapter.sample_batch`)."""
        return self._columns(loss, output, targets, count, mc_samples, seed, index)

    def finished(self, statistics: LayerStatistics) -> LayerStatistics:
        """Normalised statistics completed: ``G = I`` for a type without a backward pass (an exact
        block, :mod:`curvops.nn.layers.norm`: the identity)."""
        if self.backward:
            return statistics
        block = statistics.exact_block
        if block is not None:
            identity = torch.ones_like(block) if block.ndim == 1 else torch.eye(len(block)).to(block)
            return statistics.replace(exact_block=identity)
        layer, some = statistics.layer, statistics.input_factor
        eye = torch.eye(layer.sizes[0], dtype=some.dtype, device=some.device)
        if layer.groups > 1:  # one G = I per group
            eye = eye.expand(layer.groups, -1, -1)
        return statistics.replace(output_factor=eye)

    def exact_operator(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Iterable,
        params: Sequence[nn.Parameter],
        mc_samples: int = 1,
        seed: int = 0,
        **options,
    ) -> CurvatureOperator:
        """The exact operator of this type (matrix-free) of ``params``."""
        if self.exact is FisherMC:
            options = {"mc_samples": mc_samples, "seed": seed, **options}
        return self.exact(model, loss_fn, data, params, **options)


def _empirical(loss, output, targets, count, mc_samples, seed, index) -> Tensor:
    return loss.datum_gradients(output, targets, count).unsqueeze(0)


def _sampled(loss, output, targets, count, mc_samples, seed, index) -> Tensor:
    sampled = loss.sample_batch(output, targets, mc_samples, seed, index)
    return loss.datum_gradients(output, sampled, count, draws=True)


def _hessian_factor(loss, output, targets, count, mc_samples, seed, index) -> Tensor:
    return loss_hessian_factor(loss, output, targets, count, where=f"Batch {index}")


TYPE_2 = FisherType(
    "type-2",
    backward=True,
    likelihood=False,
    sampling=False,
    sampled=False,
    exact=GGN,
    _columns=_hessian_factor,
)
MONTE_CARLO = FisherType(
    "mc", backward=True, likelihood=True, sampling=True, sampled=True, exact=FisherMC, _columns=_sampled
)
EMPIRICAL = FisherType(
    "empirical",
    backward=True,
    likelihood=True,
    sampling=False,
    sampled=False,
    exact=EmpiricalFisher,
    _columns=_empirical,
)
FORWARD_ONLY = FisherType(
    "forward-only", backward=False, likelihood=False, sampling=False, sampled=False, exact=GGN
)

FISHER_TYPES = {f.name: f for f in (TYPE_2, MONTE_CARLO, EMPIRICAL, FORWARD_ONLY)}
"""Every Fisher type by name."""


def fisher_type(name: str, backward: bool = False) -> FisherType:
    """The Fisher type called ``name``; ``backward=True`` admits only those with output gradients.

    Example:
        >>> fisher_type("mc").sampled
        True
        >>> fisher_type("forward-only", backward=True)
        Traceback (most recent call last):
        ...
        ValueError: Unknown fisher_type 'forward-only'; choose one of ('type-2', 'mc', 'empirical').
    """
    allowed = tuple(n for n, f in FISHER_TYPES.items() if f.backward or not backward)
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"Unknown fisher_type {name!r}; choose one of {allowed}.")
    return FISHER_TYPES[name]
