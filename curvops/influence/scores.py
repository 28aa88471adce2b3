"""Influence scores ``∇ℓ_t^T (F + Λ)^-1 ∇ℓ_n`` of training examples on queries, and on themselves.

The query gradients are preconditioned ``query_batch_size`` columns at a time and the
training gradients streamed past each block; :func:`top_influences` sorts the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..distributed import Shards
from ..linalg import CurvatureOperator
from ..linalg.checks import check_positive_int
from .problem import _Problem
from .queries import CompressedQueries, ExactQueries


class TopInfluences(NamedTuple):
    """The most helpful and most harmful training examples per query (see :func:`top_influences`).

    Each field has the shape of ``scores`` with its last axis cut to ``k``.

    Attributes:
        helpful: training indices of the ``k`` largest scores, largest first.
        helpful_scores: those scores.
        harmful: training indices of the ``k`` smallest scores, most negative first
            (harmful only where the score is negative).
        harmful_scores: those scores.
    """

    helpful: Tensor
    helpful_scores: Tensor
    harmful: Tensor
    harmful_scores: Tensor


def influence_scores(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    train_data: Iterable,
    query_data: Iterable,
    curvature: str | CurvatureOperator = "ekfac",
    damping: float | str = "heuristic",
    fisher_type: str = "type-2",
    bias: str = "joint",
    params: Sequence[nn.Parameter] | None = None,
    train_batch_size: int = 32,
    query_batch_size: int = 128,
    progressbar: bool = False,
    curvature_options: Mapping[str, Any] | None = None,
    group: Any = None,
    measurement: Callable[[Tensor, Tensor], Tensor] | None = None,
    per_module: bool = False,
    query_rank: int | None = None,
    per_token: bool = False,
) -> Tensor | dict[str, Tensor]:
    """Influence of every training example on every query: ``∇ℓ_t^T (F + Λ)^-1 ∇ℓ_n``.

    See :mod:`curvops.influence` for ``ℓ_n``, ``F``, ``Λ`` and the sign: a positive score means
    that a gradient step on training example ``n`` lowers the loss of query ``t`` (by
    ``η · score`` for a step ``-η (F + Λ)^-1 ∇ℓ_n``, to first order), i.e. ``n`` is helpful to
    ``t``; removing ``n`` from the training set raises ``ℓ_t`` by about ``score / Z``.

    The query gradients ``[D, K]`` are preconditioned by ``(F + Λ)^-1`` ``query_batch_size``
    columns at a time; the training gradients are streamed past each block
    ``train_batch_size`` at a time. The result does not depend on either size, nor on how
    the data is batched.

    Args:
        model: the network (in eval mode).
        loss_fn: the training loss (see :func:`influence_curvature`).
        train_data: a re-iterable of ``(X, y)`` batches (a list or a non-shuffling
            ``DataLoader``), or one pair of tensors ``(X, y)``; ``N`` data in all.
        query_data: the same for the ``M`` queries (e.g. test points with their labels).
        curvature: a name of :func:`influence_curvature` (built over ``train_data`` with
            ``fisher_type``, ``bias`` and ``params``), or a prebuilt
            :class:`~curvops.CurvatureOperator` on the same parameters — the curvature of the
            mean loss over ``train_data``.
        damping: ``λ >= 0``, or ``"heuristic"`` (``0.1 ·`` the mean eigenvalue of each block).
        fisher_type: ``"type-2"``, ``"mc"`` or ``"empirical"``.
        bias: ``"joint"`` or ``"separate"``.
        params: the parameters ``θ`` (default: the model's trainable ones, in order).
        train_batch_size: training gradients computed and held at once.
        query_batch_size: query gradients preconditioned and held at once (each block costs
            one pass of training gradients).
        progressbar: tqdm bars on the passes over the data.
        curvature_options: further keyword arguments of the curvature's builder, e.g.
            ``{"unsupported": "dense"}`` for a model with a module without a rule (``nn.PReLU``)
            and a Kronecker curvature
            (see :func:`influence_curvature`); none with a prebuilt operator.
        group: the process group whose ranks hold shards of ``train_data`` (``None``: the
            default group when ``torch.distributed`` is initialized); ``"local"`` keeps this
            process's data alone. ``F`` is the union's; the columns are this rank's examples
            (see :mod:`curvops.influence`).
        measurement: what is measured on the queries in place of their loss ``ℓ_t``: a callable
            ``(output, target) -> Tensor[n]`` of a batch of ``n`` query examples' outputs and
            targets, one value per example (e.g. a margin ``f_y - max_{c≠y} f_c``, a logit, a
            sequence's summed log-likelihood); the scores are ``∇m_t^T (F + Λ)^-1 ∇ℓ_n``, with the
            sign as for the loss: positive means a step on ``n`` lowers ``m_t`` (pass ``-margin``
            to rank the examples that raise the margin first). ``F`` and ``∇ℓ_n`` stay the
            training loss's.
        per_module: the scores per block of ``F`` instead: ``{label: [M, N]}`` over the blocks'
            labels (a layer's, ``"<layer>.weight"``/``".bias"`` with ``bias="separate"``), the
            products over each block's coordinates, ``∇m_t,b^T (F_b + Λ_b)^-1 ∇ℓ_n,b``; for an ``F``
            without blocks (``"ggn"``, a dense operator) the coordinates of each module's
            parameters. They sum to the total.
        query_rank: ``r``: keep each query's preconditioned gradient, per Kronecker block a matrix
            ``[n_out, n_in]``, as its top ``r`` singular triplets while the training data streams
            past (``r (n_out + n_in)`` numbers instead of ``n_out n_in``: more queries per
            ``query_batch_size`` pass; kronfluence's ``query_gradient_low_rank``). Blocks without
            that structure stay exact; ``r >= min(n_out, n_in)`` is exact. The error is measured
            in ``benchmarks/influence_low_rank.py``.
        per_token: the scores of every training datum's every target position (sequence models,
            targets ``[N, S]``): ``[M, N, S]``, ``∇m_t^T (F + Λ)^-1 ∇ℓ_ns`` with ``ℓ_ns`` the loss of
            position ``s`` alone (a padding position, ``ignore_index``, scores 0); they sum over
            ``s`` to the datum's score. Every batch's targets need the same ``S``.

    Returns:
        ``[M, N]`` scores, query ``t`` by training example ``n``, in data order (over shards
        ``N`` is this rank's number of examples); with ``per_module`` a ``dict`` of them.

    Example:
        >>> from curvops.influence import influence_scores
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> model = model.double()
        >>> train = (torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,)))
        >>> query = (torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1]))
        >>> scores = influence_scores(model, torch.nn.CrossEntropyLoss(), train, query, curvature="kfac")
        >>> scores.shape
        torch.Size([2, 10])
        >>> same = influence_scores(
        ...     model, torch.nn.CrossEntropyLoss(), train, query, "kfac",
        ...     train_batch_size=3, query_batch_size=1,
        ... )
        >>> torch.allclose(scores, same)
        True
    """
    problem = _Problem(
        model, loss_fn, train_data, curvature, damping, fisher_type, bias, params,
        train_batch_size, query_batch_size, progressbar, curvature_options, group,
    )  # fmt: skip
    return pairwise_scores(problem, query_data, measurement, per_module, query_rank, per_token)


def pairwise_scores(
    problem: _Problem,
    query_data: Iterable,
    measurement: Callable | None,
    per_module: bool,
    query_rank: int | None = None,
    per_token: bool = False,
) -> Tensor | dict[str, Tensor]:
    """:func:`influence_scores` of a checked problem (its curvature built once, on first use)."""
    for name, value in (("per_module", per_module), ("per_token", per_token)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}.")
    if query_rank is not None:
        check_positive_int(query_rank, "query_rank")
    query = problem.examples(query_data, "query_data", measurement)
    problem.build()
    parts = problem.parts() if per_module else None
    indices = None if parts is None else list(parts.values())
    rows = []
    for q in query.columns(problem.query_batch_size):
        preconditioned = problem.inverse @ q
        if query_rank is None:
            queries = ExactQueries(preconditioned, indices)
        else:
            queries = CompressedQueries(preconditioned, problem.op, query_rank, indices)
        del preconditioned  # the compressed form is what the training pass holds
        if per_token:
            rows.append(problem.token_scores(queries))
        else:
            rows.append(problem.scores(queries, q.shape[1], None if parts is None else len(parts)))
    scores = torch.cat(rows, dim=-3 if per_token else -2)
    return scores if parts is None else dict(zip(parts, scores.unbind(0), strict=True))


def self_influence(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    train_data: Iterable,
    curvature: str | CurvatureOperator = "ekfac",
    damping: float | str = "heuristic",
    fisher_type: str = "type-2",
    bias: str = "joint",
    params: Sequence[nn.Parameter] | None = None,
    train_batch_size: int = 32,
    progressbar: bool = False,
    curvature_options: Mapping[str, Any] | None = None,
    group: Any = None,
) -> Tensor:
    """Self-influence ``∇ℓ_n^T (F + Λ)^-1 ∇ℓ_n`` of every training example (``>= 0``).

    The diagonal of ``influence_scores(train_data, train_data)`` at the cost of one pass of
    training gradients: each ``[D, b]`` block is preconditioned and dotted with itself. Large
    values flag examples the model has to bend most to fit (often mislabelled or atypical):
    sort with :func:`top_influences`. Arguments as for :func:`influence_scores`; over shards
    (``group``) the scores of this rank's examples, with the union's ``F``.

    Returns:
        ``[N]`` scores in data order (this rank's ``N`` over shards).

    Example:
        >>> from curvops.influence import influence_scores, self_influence
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> model = model.double()
        >>> train = (torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))
        >>> loss = torch.nn.CrossEntropyLoss()
        >>> own = self_influence(model, loss, train, curvature="ekfac", damping=1e-3)
        >>> torch.allclose(own, influence_scores(model, loss, train, train, "ekfac", 1e-3).diagonal())
        True
    """
    problem = _Problem(
        model, loss_fn, train_data, curvature, damping, fisher_type, bias, params,
        train_batch_size, 1, progressbar, curvature_options, group,
    )  # fmt: skip
    return own_scores(problem)


def own_scores(problem: _Problem) -> Tensor:
    """:func:`self_influence` of a checked problem (its curvature built once, on first use)."""
    problem.build()
    parts = [(g * (problem.inverse @ g)).sum(dim=0) for g in problem.train.columns(problem.train_batch_size)]
    model_data = problem.train.model_data
    return torch.cat([torch.zeros(0, dtype=model_data.dtype, device=model_data.device), *parts])


def top_influences(scores: Tensor, k: int, group: Any = None) -> TopInfluences:
    """The ``k`` most helpful (largest) and most harmful (smallest) scores along the last axis.

    Works on ``[M, N]`` :func:`influence_scores` (per query) and on ``[N]``
    :func:`self_influence` scores. Ties come in no particular order.

    Over shards (``group``) ``scores`` are this rank's columns (its training examples, as the
    influence functions return them; the same leading shape on every rank), and the result is
    the union's, on every rank: indices of the union, whose examples are numbered rank after
    rank (rank 0's first). Each rank sends its own top ``k`` (one gather).

    Args:
        scores: ``[..., N]`` finite floating-point scores.
        k: ``1 <= k <= N`` (``N`` of the union over shards).
        group: the process group whose ranks hold the columns (``None``: the default group when
            ``torch.distributed`` is initialized); ``"local"`` takes ``scores`` alone.

    Returns:
        :class:`TopInfluences` of ``[..., k]`` tensors: ``helpful`` and ``helpful_scores``
        (descending), ``harmful`` and ``harmful_scores`` (ascending: most negative first).

    Example:
        >>> from curvops.influence import top_influences
        >>> top = top_influences(torch.tensor([[0.5, -2.0, 3.0, 0.1]]), k=2)
        >>> top.helpful.tolist(), top.helpful_scores.tolist(), top.harmful.tolist()
        ([[2, 0]], [[3.0, 0.5]], [[1, 3]])
    """
    shards = Shards.of(group)
    error = _scores_error(scores)
    reports = shards.gather((error, None if error else tuple(scores.shape)))  # errors raised everywhere
    if error or any(e for e, _ in reports):
        raise ValueError(error or next(f"rank {r}: {e}" for r, (e, _) in enumerate(reports) if e))
    shapes = [shape for _, shape in reports]
    if len(set(shape[:-1] for shape in shapes)) > 1:
        raise ValueError(
            f"The ranks' scores have the leading shapes {[list(s[:-1]) for s in shapes]}: pass the "
            "same queries on every rank."
        )
    counts = [shape[-1] for shape in shapes]
    _check_k(k, sum(counts))
    if shards.active:
        return _union_top(scores, k, shards, counts)
    return _top(scores, k)


def _scores_error(scores: Any) -> str | None:
    """Why ``scores`` are no scores ``top_influences`` takes, or ``None``."""
    if not isinstance(scores, Tensor) or not scores.is_floating_point() or scores.ndim == 0:
        return "top_influences takes a floating-point tensor of scores with at least one axis."
    if not bool(torch.isfinite(scores).all()):
        return "The scores contain NaN or inf."
    return None


def _check_k(k: int, count: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= count:
        raise ValueError(
            f"k must be an integer in [1, {count}] (the number of training examples), got {k!r}."
        )


def _top(scores: Tensor, k: int) -> TopInfluences:
    """The ``k`` largest and smallest scores along the last axis, with their indices."""
    helpful = torch.topk(scores, k, dim=-1, largest=True, sorted=True)
    harmful = torch.topk(scores, k, dim=-1, largest=False, sorted=True)
    return TopInfluences(helpful.indices, helpful.values, harmful.indices, harmful.values)


def _union_top(scores: Tensor, k: int, shards: Shards, counts: list[int]) -> TopInfluences:
    """The union's top ``k`` from every rank's own (sent on the CPU); ``counts``: every rank's
    number of columns, whose indices follow rank after rank."""
    own = _top(scores, min(k, scores.shape[-1]))
    ranks = shards.gather([t.cpu() for t in own])
    starts = [sum(counts[:r]) for r in range(len(counts))]
    helpful = _merged([(t[0] + s, t[1]) for t, s in zip(ranks, starts, strict=True)], k, True)
    harmful = _merged([(t[2] + s, t[3]) for t, s in zip(ranks, starts, strict=True)], k, False)
    return TopInfluences(*(t.to(scores.device) for t in (*helpful, *harmful)))


def _merged(candidates: list[tuple[Tensor, Tensor]], k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """``(indices, values)`` of the ``k`` largest (smallest) among the ranks' candidates."""
    indices = torch.cat([i for i, _ in candidates], dim=-1)
    values = torch.cat([v for _, v in candidates], dim=-1)
    best = torch.topk(values, k, dim=-1, largest=largest, sorted=True)
    return indices.gather(-1, best.indices), best.values
