"""Laplace and the influence functions over two gloo ranks, against one process on all the data.

Every rank holds a shard of a fixed list of batches (batches ``r::2``: uneven, 3 and 2; or all
on rank 0 and none on rank 1). The distributed result (``group=None``: the default group) is
compared on each rank with one process on all the batches (``group="local"``), float64: Laplace's
evidence, posterior variances, tuned prior precisions and predictive; the influence scores of
this rank's columns against the matching columns of one process's scores.
"""

import warnings

import pytest
import torch
from torch import nn

import curvops
from curvops.distributed import LOCAL, Shards
from curvops.influence import influence_scores, leave_one_out_scores, self_influence, top_influences
from curvops.laplace import Laplace

DOUBLE = torch.float64
SIZES = (4, 3, 5, 2, 4)  # five batches, 18 data
TOLERANCE = 1e-10


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DOUBLE)


def _batches(padded: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Five classification batches; ``padded``: some targets are ``ignore_index`` (-100)."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for size in SIZES:
        x = torch.randn(size, 3, generator=g, dtype=DOUBLE)
        y = torch.randint(0, 3, (size,), generator=g)
        if padded:
            y[torch.rand(size, generator=g) < 0.3] = -100
        batches.append((x, y))
    return batches


def _shard(batches: list, shards: str, rank: int) -> list:
    """This rank's batches: ``"alternate"`` ``r::2``; ``"empty"`` all on rank 0, none on rank 1."""
    if shards == "alternate":
        return batches[rank::2]
    return batches if rank == 0 else []


def _datum_ids(shards: str, rank: int) -> list[int]:
    """The positions in all the data of this rank's examples, in its shard's order."""
    starts = [sum(SIZES[:b]) for b in range(len(SIZES))]
    chosen = _shard(list(range(len(SIZES))), shards, rank)
    return [starts[b] + i for b in chosen for i in range(SIZES[b])]


def _union_ids(shards: str) -> list[int]:
    """Positions in all the data of the union's examples, numbered rank after rank."""
    return _datum_ids(shards, 0) + _datum_ids(shards, 1)


def _difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


# ----------------------------------------------------------------------------- Laplace
def _laplace_problem(reduction: str, padded: bool) -> tuple[nn.Module, list, dict]:
    """The loss, batches and Laplace arguments: classification (``padded``: with ignored targets),
    or ``"gaussian"`` regression (``MSELoss`` with ``sigma_noise``)."""
    if reduction != "gaussian":
        return nn.CrossEntropyLoss(reduction=reduction), _batches(padded), {}
    batches = [(x, torch.sin(x)) for x, _ in _batches(False)]
    return nn.MSELoss(), batches, {"sigma_noise": 0.5}


def _laplace_errors(curvature: str, reduction: str, shards: str, padded: bool) -> dict[str, float]:
    """The largest differences of the distributed Laplace from one process's on all the data."""
    rank = Shards.of().rank
    model = _model()
    loss, batches, options = _laplace_problem(reduction, padded)
    test = torch.randn(6, 3, generator=torch.Generator().manual_seed(7), dtype=DOUBLE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not trained: θ is not at a minimum
        mine = Laplace(model, loss, _shard(batches, shards, rank), curvature, prior_precision=0.5, **options)
        alone = Laplace(model, loss, batches, curvature, prior_precision=0.5, group=LOCAL, **options)
    predictives = [torch.stack(list(torch.atleast_1d(la.predictive(test)))) for la in (mine, alone)]
    errors = {
        "loss": abs(float(mine.loss - alone.loss)),
        "terms": abs(mine.num_terms - alone.num_terms),
        "marglik": abs(float(mine.log_marginal_likelihood() - alone.log_marginal_likelihood())),
        "variance": _difference(
            mine.posterior_covariance.to_dense().diagonal(), alone.posterior_covariance.to_dense().diagonal()
        ),
        "predictive": _difference(*predictives),
        "sample": _difference(*(la.sample(3, torch.Generator().manual_seed(2)) for la in (mine, alone))),
    }
    taus = [la.optimize_prior_precision("marglik", [1.0, 2.0, 1.0, 2.0], steps=20) for la in (mine, alone)]
    errors["marglik tau"] = _difference(*taus)
    errors["tuned marglik"] = abs(float(mine.log_marginal_likelihood() - alone.log_marginal_likelihood()))
    grid = torch.logspace(-2, 2, 9)
    errors["grid tau"] = _difference(
        *(la.optimize_prior_precision("grid", grid=grid) for la in (mine, alone))
    )
    return errors


LAPLACE_CASES = [
    ("kfac", "mean", "alternate", False),
    ("kfac", "sum", "empty", True),
    ("ekfac", "sum", "alternate", False),
    ("tkfac", "mean", "alternate", True),
    ("diagonal", "mean", "alternate", True),
    ("full", "sum", "empty", True),
    ("kfac", "gaussian", "alternate", False),
]
"""(curvature, reduction or ``"gaussian"`` regression, shards, ignored targets)."""


@pytest.mark.parametrize("case", LAPLACE_CASES, ids=lambda case: "-".join(map(str, case)))
def test_laplace_over_shards_equals_one_process(ranks, case):
    for rank, errors in enumerate(ranks.run(_laplace_errors, *case)):
        assert max(errors.values()) < TOLERANCE, (rank, errors)


def test_group_is_an_argument_of_the_clients_not_a_curvature_option():
    model, batches = _model(), _batches(False)
    with pytest.raises(ValueError, match=r"curvature_options\['group'\]: pass group= to Laplace"):
        Laplace(model, nn.CrossEntropyLoss(), batches, curvature_options={"group": LOCAL})
    with pytest.raises(ValueError, match=r"curvature_options\['group'\] sets an argument .* pass group="):
        influence_scores(
            model, nn.CrossEntropyLoss(), batches, batches, "kfac", curvature_options={"group": LOCAL}
        )
    with pytest.raises(ValueError, match=r"group must be a torch\.distributed ProcessGroup"):
        self_influence(model, nn.CrossEntropyLoss(), batches, "kfac", group="world")


def _laplace_without_terms() -> str:
    batches = [(x, torch.full_like(y, -100)) for x, y in _batches(False)]
    try:
        Laplace(_model(), nn.CrossEntropyLoss(), _shard(batches, "alternate", Shards.of().rank), "diagonal")
    except ValueError as error:
        return str(error)
    return ""


def test_laplace_without_loss_terms_on_any_rank_says_so(ranks):
    for message in ranks.run(_laplace_without_terms):
        assert "no loss terms on any rank" in message


# ----------------------------------------------------------------------------- influence
def _loss(variant: str) -> nn.Module:
    if variant == "weighted":
        return nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0], dtype=DOUBLE))
    return nn.CrossEntropyLoss(reduction="sum" if variant == "sum" else "mean")


def _influence_errors(curvature: str, fisher_type: str, shards: str, variant: str) -> dict[str, float]:
    """This rank's influence columns against the matching columns of one process on all the data."""
    rank = Shards.of().rank
    model, batches = _model(), _batches(variant == "padded")
    query = _batches(False)[0]
    ids, union = _datum_ids(shards, rank), _union_ids(shards)
    mine_data = _shard(batches, shards, rank)
    options = {
        "curvature": curvature,
        "fisher_type": fisher_type,
        "damping": "heuristic",
        "train_batch_size": 3,
    }
    loss = _loss(variant)
    scores = influence_scores(model, loss, mine_data, query, **options)
    alone = influence_scores(model, loss, batches, query, **options, group=LOCAL)
    own = self_influence(model, loss, mine_data, **options)
    own_alone = self_influence(model, loss, batches, **options, group=LOCAL)
    removed = [1, len(union) - 2, 7]
    out = leave_one_out_scores(model, loss, mine_data, query, removed, **options)
    out_alone = leave_one_out_scores(
        model, loss, batches, query, [union[n] for n in removed], **options, group=LOCAL
    )
    top, top_alone = top_influences(scores, 5), top_influences(alone, 5, group=LOCAL)
    positions = torch.tensor(union)  # ties (padding's zero scores) may pick other indices
    return {
        "shape": float(scores.shape != (len(query[1]), len(ids)) or own.shape != (len(ids),)),
        "scores": _difference(scores, alone[:, ids]),
        "self": _difference(own, own_alone[ids]),
        "leave one out": _difference(out, out_alone[:, :, ids]),
        "top helpful": _difference(alone.gather(1, positions[top.helpful]), top_alone.helpful_scores),
        "top harmful": _difference(alone.gather(1, positions[top.harmful]), top_alone.harmful_scores),
        "top scores": _difference(top.helpful_scores, top_alone.helpful_scores),
    }


INFLUENCE_CASES = [
    ("ekfac", "type-2", "alternate", "plain"),
    ("kfac", "type-2", "empty", "padded"),
    ("kfac", "empirical", "alternate", "weighted"),
    ("ggn", "type-2", "alternate", "padded"),
    ("ggn", "empirical", "empty", "sum"),
    ("diagonal", "type-2", "empty", "weighted"),
    ("diagonal", "empirical", "alternate", "padded"),
    ("identity", "type-2", "empty", "plain"),
]
"""(curvature, fisher_type, shards, loss: plain, padded targets, class weights or a summed loss)."""


@pytest.mark.parametrize("case", INFLUENCE_CASES, ids="-".join)
def test_influence_over_shards_equals_one_process(ranks, case):
    for rank, errors in enumerate(ranks.run(_influence_errors, *case)):
        assert max(errors.values()) < TOLERANCE, (rank, errors)


def _prebuilt_matrix_free() -> float:
    """A prebuilt GGN of the union (matrix-free: made dense once, so each rank solves its own)."""
    rank = Shards.of().rank
    model, batches, query = _model(), _batches(False), _batches(False)[0]
    mine = _shard(batches, "alternate", rank)
    loss = nn.CrossEntropyLoss()
    ggn = curvops.GGN(model, loss, mine)
    own = self_influence(model, loss, mine, curvature=ggn, damping=0.1)
    scores = influence_scores(model, loss, mine, query, curvature=ggn, damping=0.1)
    dense = curvops.GGN(model, loss, batches, group=LOCAL).to_dense()
    alone = influence_scores(
        model, loss, batches, query, curvature=curvops.Dense(dense), damping=0.1, group=LOCAL
    )
    own_alone = self_influence(model, loss, batches, curvature=curvops.Dense(dense), damping=0.1, group=LOCAL)
    ids = _datum_ids("alternate", rank)
    return max(_difference(own, own_alone[ids]), _difference(scores, alone[:, ids]))


def test_a_prebuilt_matrix_free_operator_is_solved_on_each_rank(ranks):
    assert max(ranks.run(_prebuilt_matrix_free)) < TOLERANCE


def _empty_everywhere() -> str:
    try:
        self_influence(_model(), nn.CrossEntropyLoss(), [], curvature="identity")
    except ValueError as error:
        return str(error)
    return ""


def _mismatched_queries() -> str:
    scores = torch.randn(2 + Shards.of().rank, 4, dtype=DOUBLE)
    try:
        top_influences(scores, 3)
    except ValueError as error:
        return str(error)
    return ""


def _nan_on_one_rank() -> str:
    scores = torch.full((2, 4), float("nan") if Shards.of().rank == 1 else 1.0, dtype=DOUBLE)
    try:
        top_influences(scores, 3)
    except ValueError as error:
        return str(error)
    return ""


def _bad_batch_on_one_rank() -> str:
    batches = (
        _batches(False)[:2] if Shards.of().rank == 0 else [(torch.randn(3, 5, dtype=DOUBLE), torch.zeros(3))]
    )
    try:
        Laplace(_model(), nn.CrossEntropyLoss(), batches, "diagonal")
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return ""


def _bad_train_batch_on_one_rank() -> str:
    bad = [(torch.randn(3, 5, dtype=DOUBLE), torch.zeros(3, dtype=torch.long))]
    batches = _batches(False)[:2] if Shards.of().rank == 0 else bad
    try:
        self_influence(_model(), nn.CrossEntropyLoss(), batches, "identity")
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return ""


def test_an_error_on_one_rank_is_raised_on_every_rank(ranks):
    first, second = ranks.run(_nan_on_one_rank)
    assert first == "rank 1: The scores contain NaN or inf." and second == "The scores contain NaN or inf."
    for function in (_bad_batch_on_one_rank, _bad_train_batch_on_one_rank):
        first, second = ranks.run(function)
        assert first.startswith("RuntimeError:") and "other rank(s) of 2 raised an error" in first
        assert "shape" in second and "other rank" not in second  # its own error


def test_clear_errors_over_shards(ranks):
    for message in ranks.run(_empty_everywhere):
        assert "train_data holds no examples on any rank" in message
    for message in ranks.run(_mismatched_queries):
        assert "pass the same queries on every rank" in message
