"""The statistics steps and preconditioner rebuilds of :class:`~curvops.optim.KFACOptimizer`,
over the ranks that train one model together (``DistributedDataParallel``).

Every rank backpropagates its shard of each micro-batch and DDP averages the gradients. The
optimizer makes the curvature that of the union batch. Micro-batch ``k``'s loss terms get the
weight ``w_k = c_k / Z_k``, where ``Z_k`` normalises the terms of micro-batch ``k`` on all the
ranks together (:func:`step_weights`). Each rank sums its weighted statistics as it would alone,
and one reduction per statistics step adds them up over the ranks
(:meth:`~curvops.distributed.Shards.sum_statistics`; EKFAC's step corrections likewise,
:meth:`~curvops.distributed.Shards.sum_corrections`). So every rank holds one process's
statistics on the global batch. It also holds the same preconditioner: each distinct factor is
decomposed on one rank (:func:`~curvops.distributed.decompose_blocks`), and every rank builds
the damped inverses from the results. Every decision that depends on the data (skip a
non-finite step, :func:`agree`) is taken from values reduced over the ranks, and so is KL
clipping (from DDP's reduced gradient and the common preconditioner). So the ranks' parameters
stay identical.

What equals one process on the global batch: a mean loss over shards of equal size, where
DDP's averaged gradient is the gradient of the global mean. With shards of unequal size, DDP
averages the ranks' means (a term of rank ``r`` weighs ``1 / (R N_r)``), while the curvature
weighs every term ``1 / N`` (the global count). For a summed loss, DDP's gradient is the global
sum's divided by the ``R`` ranks, and the curvature is the global sum's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..distributed import Shards, decompose_blocks
from ..nn.approximations import Basis, KroneckerApproximation
from ..nn.kronecker_pass import batch_corrections, batch_statistics
from ..nn.losses import LossAdapter
from ..nn.options import KroneckerOptions
from ..nn.statistics import Corrections, LayerStatistics, all_usable
from .capture import BatchCapture, CapturedBatch
from .schedule import all_finite


def unwrapped(model: nn.Module) -> tuple[nn.Module, Any]:
    """The module that a ``DistributedDataParallel`` wrapper trains and the wrapper's process
    group; ``(model, None)`` for any other model.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> unwrapped(model) == (model, None)
        True
    """
    if isinstance(model, DistributedDataParallel):
        return model.module, getattr(model, "process_group", None)
    return model, None


@dataclass(frozen=True)
class StepAgreement:
    """What every rank agrees on before a step.

    Attributes:
        skip: some rank had a non-finite loss or gradient.
        batches: the micro-batches with loss terms, on all ranks together.
        totals: per position ``k`` (the ``k``-th loss backpropagated since the last step), the loss
            terms of all ranks.
    """

    skip: bool
    batches: int
    totals: list[float]


def agree(shards: Shards, capture: BatchCapture, gradients: list[Tensor]) -> StepAgreement:
    """The :class:`StepAgreement` of this step, from every rank's captured losses and
    ``gradients`` (one collective, none alone).

    Example:
        >>> from types import SimpleNamespace
        >>> capture = SimpleNamespace(nonfinite_loss=False, batches=[None], counts=[8.0, 0.0])
        >>> agree(Shards.of("local"), capture, [torch.ones(2)])
        StepAgreement(skip=False, batches=1, totals=[8.0, 0.0])
    """
    mine = (capture.nonfinite_loss or not all_finite(gradients), len(capture.batches), capture.counts)
    views = shards.gather(mine)
    totals = [0.0] * max(len(counts) for _, _, counts in views)
    for _, _, counts in views:
        for position, count in enumerate(counts):
            totals[position] += count
    return StepAgreement(any(skip for skip, _, _ in views), sum(n for _, n, _ in views), totals)


def step_weights(batches: Sequence[CapturedBatch], totals: Sequence[float], loss: LossAdapter) -> list[float]:
    """Each micro-batch's weight ``w_k = c_k / Z_k`` of its loss terms, with ``Z_k`` the loss's
    normaliser of the ``totals[k]`` terms of micro-batch ``k`` on all ranks (alone: its own).

    Example:
        >>> batches = [CapturedBatch([], [], 0.5, scale=1.0, position=0)]
        >>> step_weights(batches, [8.0], LossAdapter(torch.nn.MSELoss()))  # 1 / (8 terms of 2 ranks)
        [0.125]
    """
    return [batch.scale / loss.batch_scale(totals[batch.position]) for batch in batches]


def step_statistics(
    layers: Sequence[LayerStatistics],
    batches: Sequence[CapturedBatch],
    weights: Sequence[float],
    options: KroneckerOptions,
    dtype: torch.dtype,
    shards: Shards,
) -> list[LayerStatistics] | None:
    """The step's normalised statistics of every layer (``layers`` gives the layers), summed over
    the micro-batches and the ranks; ``None`` when they are unusable (non-finite, or TKFAC's
    ``δ = 0``), on every rank alike."""
    fisher = options.fisher
    step = [LayerStatistics(s.layer) for s in layers]
    for batch, weight in zip(batches, weights, strict=True):
        for i, (inputs, gradients) in enumerate(zip(batch.inputs, batch.gradients, strict=True)):
            step[i] = step[i] + batch_statistics(
                step[i].layer, inputs, gradients, options, dtype, weight, batch.valid
            )
    step = shards.sum_statistics(step)
    if not all_usable(step):
        return None
    step = [fisher.finished(s.normalised(fisher.scale(1.0, options.mc_samples))) for s in step]
    return step if all_usable(step) else None


def step_corrections(
    layers: Sequence[LayerStatistics],
    bases: dict[str, Basis],
    batches: Sequence[CapturedBatch],
    weights: Sequence[float],
    options: KroneckerOptions,
    shards: Shards,
) -> dict[str, Corrections]:
    """EKFAC: the step's eigenvalues ``Σ_k w_k s_k`` in the current bases, summed over the ranks and
    normalised, of every layer with a basis, by name."""
    indices = [i for i, s in enumerate(layers) if s.layer.name in bases]
    names = [layers[i].layer.name for i in indices]
    sums = []
    for index, name in zip(indices, names, strict=True):
        step = Corrections()
        for batch, weight in zip(batches, weights, strict=True):
            parts = batch_corrections(
                layers[index].layer,
                batch.inputs[index],
                batch.gradients[index],
                bases[name],
                options.correction,
                batch.valid,
            )
            step = step + parts * weight
        sums.append(step)
    scale = options.fisher.scale(1.0, options.mc_samples)
    return {name: c / scale for name, c in zip(names, shards.sum_corrections(sums, names), strict=True)}


def eigenbases(
    approximation: KroneckerApproximation, layers: Sequence[LayerStatistics], shards: Shards
) -> dict[str, tuple[Basis, list[Tensor | None]]]:
    """EKFAC's eigenbasis and starting eigenvalues of every corrected layer, by name
    (:meth:`~curvops.nn.approximations.KroneckerApproximation.eigenbasis`), every factor
    decomposed once, spread over the ranks (:func:`~curvops.distributed.decompose_blocks`)."""
    corrected = [s for s in layers if approximation.corrects(s.layer)]
    blocks = [approximation.kronecker_blocks(s) for s in corrected]
    decompose_blocks([block for layer_blocks in blocks for block in layer_blocks], shards)
    return {
        s.layer.name: approximation.eigenbasis(s, layer_blocks)
        for s, layer_blocks in zip(corrected, blocks, strict=True)
    }
