"""Leave-one-out influence: scores with one training example's share of ``F`` removed.

``F_-r = F - u u^T`` with ``u = ∇ℓ_r / √Z`` is a rank-one downdate, inverted exactly by
Sherman-Morrison through ``F``'s own structured inverse (:class:`~curvops.LowRankUpdate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..linalg import CurvatureOperator, LowRankUpdate
from ..linalg.checks import check_bool
from ..nn.shard_sums import Part
from .curvature import _damped, _inverse
from .problem import _Problem
from .queries import ExactQueries


def leave_one_out_scores(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    train_data: Iterable,
    query_data: Iterable,
    removed: int | Sequence[int] | Tensor,
    curvature: str | CurvatureOperator = "ggn",
    damping: float | str = "heuristic",
    fisher_type: str = "empirical",
    bias: str = "joint",
    params: Sequence[nn.Parameter] | None = None,
    renormalize: bool = False,
    train_batch_size: int = 32,
    query_batch_size: int = 128,
    progressbar: bool = False,
    curvature_options: Mapping[str, Any] | None = None,
    group: Any = None,
    measurement: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """Influence scores re-computed with one training example's curvature removed.

    Removing datum ``r`` from the mean empirical Fisher ``F = (1/Z) Σ_n ∇ℓ_n ∇ℓ_n^T`` removes
    its share ``(1/Z) ∇ℓ_r ∇ℓ_r^T``. With ``u = ∇ℓ_r / √Z`` this is the rank-one downdate
    ``F_-r = F - u u^T``, a :class:`~curvops.LowRankUpdate` whose damped inverse is exact by
    Sherman-Morrison through ``F``'s own structured inverse, without rebuilding ``F``:

    ``score_-r(t, n) = ∇ℓ_t^T (F_-r + Λ)^-1 ∇ℓ_n``.

    Normalisation: ``renormalize=False`` (default) keeps the full data set's ``Z``, so
    ``F_-r = (1/Z) Σ_{n≠r} ∇ℓ_n ∇ℓ_n^T``; ``renormalize=True`` gives the mean over the remaining
    data, ``F_-r = (1/(Z - z_r)) Σ_{n≠r} ∇ℓ_n ∇ℓ_n^T = c (F - u u^T)`` with ``c = Z / (Z - z_r)``
    (``z_r`` the datum's terms, 1 for a class label), inverted as
    ``(1/c) (F - u u^T + Λ/c)^-1``. The damping ``Λ`` is the full ``F``'s, held fixed.

    This is exact for the empirical Fisher (the default: ``"ggn"`` with ``"empirical"``, or a
    prebuilt :class:`~curvops.EmpiricalFisher`). For any other ``F`` (e.g. KFAC) it is the model
    "``F`` less ``r``'s empirical-Fisher share", not ``F`` rebuilt without ``r``. The other
    arguments are :func:`influence_scores`'s (note the defaults ``curvature="ggn"`` and
    ``fisher_type="empirical"``).

    Args:
        removed: a training index, or a sequence (or 1-D integer tensor) of them, each removed on
            its own; negative indices count from the end. Over shards an index of the union,
            whose examples are numbered rank after rank (rank 0's first), the same on every rank.
        renormalize: divide by the remaining data's ``Z - z_r`` instead of ``Z``.
        group: the process group whose ranks hold shards of ``train_data`` (see
            :func:`influence_scores`): ``F``, ``Z`` and the removed examples are the union's,
            the columns this rank's examples.
        measurement: the query measurement ``(output, target) -> Tensor[n]`` in place of the
            query loss (see :func:`influence_scores`).

    Returns:
        ``[M, N]`` scores for an ``int`` ``removed``, ``[R, M, N]`` for a sequence of ``R``
        (``N`` this rank's examples over shards).
        Each block holds ``D · R · query_batch_size`` numbers.

    Example:
        >>> from curvops.influence import leave_one_out_scores
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> model = model.double()
        >>> train = (torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))
        >>> query = (torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1]))
        >>> loss = torch.nn.CrossEntropyLoss()
        >>> leave_one_out_scores(model, loss, train, query, removed=[0, 3], damping=1e-2).shape
        torch.Size([2, 2, 6])
    """
    _removed_indices(removed)
    check_bool(renormalize, "renormalize")
    problem = _Problem(
        model, loss_fn, train_data, curvature, damping, fisher_type, bias, params,
        train_batch_size, query_batch_size, progressbar, curvature_options, group,
    )  # fmt: skip
    return scores_without(problem, query_data, removed, renormalize, measurement)


def scores_without(
    problem: _Problem, query_data: Iterable, removed: Any, renormalize: bool, measurement: Callable | None
) -> Tensor:
    """:func:`leave_one_out_scores` of a checked problem (its curvature built once, on first use)."""
    single, indices = _removed_indices(removed)
    check_bool(renormalize, "renormalize")
    query = problem.examples(query_data, "query_data", measurement)
    problem.train.check()
    totals = problem.train.totals()
    indices = _checked_indices(indices, totals.data)
    datum_terms = problem.train.datum_terms(indices, totals.start)
    problem.build()
    gradients = _train_gradients(problem, indices, totals.start)
    inverses = [
        _downdated_inverse(problem, n, gradients[n], totals.terms, datum_terms[n], renormalize)
        for n in indices
    ]
    blocks = []
    for q in query.columns(problem.query_batch_size):
        preconditioned = torch.cat([inverse @ q for inverse in inverses], dim=1)
        columns = problem.scores(ExactQueries(preconditioned), preconditioned.shape[1])
        blocks.append(columns.reshape(len(inverses), q.shape[1], -1))
    result = torch.cat(blocks, dim=1)
    return result[0] if single else result


def _removed_indices(removed: Any) -> tuple[bool, list[int]]:
    """``(whether one index was given, the indices)`` from an int, a sequence or an integer tensor."""
    if isinstance(removed, Tensor) and not removed.is_floating_point() and removed.ndim <= 1:
        removed = removed.tolist()
    single = isinstance(removed, int) and not isinstance(removed, bool)
    indices = [removed] if single else removed
    if (
        not isinstance(indices, Sequence)
        or isinstance(indices, str)
        or not indices
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in indices)
    ):
        raise ValueError(
            f"removed must be a training index or a non-empty sequence of them, got {removed!r}."
        )
    return single, list(indices)


def _checked_indices(indices: list[int], total: int) -> list[int]:
    """``indices`` in ``[0, total)``, negative ones counted from the end; raises when out of range."""
    for n in indices:
        if not -total <= n < total:
            raise IndexError(f"removed index {n} is out of range for {total} training examples.")
    return [n % total for n in indices]


def _train_gradients(problem: _Problem, indices: list[int], start: int) -> dict[int, Tensor]:
    """``{n: ∇ℓ_n}`` for the training data at ``indices`` of the union, from one pass of this
    rank's training gradients (its examples numbered from ``start``), summed over the ranks:
    every rank gets every removed example's gradient from the rank that holds it."""
    model_data = problem.train.model_data
    keys = list(dict.fromkeys(indices))

    def zeros() -> Part:
        return [torch.zeros(model_data.size, len(keys), dtype=model_data.dtype, device=model_data.device)], []

    def local() -> Part:
        (gradients,), offset = zeros()[0], start
        for block in problem.train.columns(problem.train_batch_size):
            for column, n in enumerate(keys):
                if offset <= n < offset + block.shape[1]:
                    gradients[:, column] = block[:, n - offset]
            offset += block.shape[1]
        return [gradients], []

    (gradients,), _ = problem.train.union(local, zeros, "removed examples' gradients")
    return dict(zip(keys, gradients.unbind(1), strict=True))


def _downdated_inverse(
    problem: _Problem, n: int, gradient: Tensor, terms: float, datum_terms: float, renormalize: bool
) -> CurvatureOperator:
    """``(F - u u^T + Λ)^-1`` with ``u = ∇ℓ_n / √Z``; renormalised: ``(1/c) (F - u u^T + Λ/c)^-1``."""
    remaining = terms - datum_terms
    if renormalize and remaining <= 0:
        raise ValueError(f"Removing example {n} leaves no loss terms to renormalise by.")
    scale = terms / remaining if renormalize else 1.0
    base = _damped(problem.op, problem.dampings, scale)
    downdate = LowRankUpdate(base, gradient / math.sqrt(terms), sign=-1)
    return (1.0 / scale) * _inverse(downdate, problem.op)
