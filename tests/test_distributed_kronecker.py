"""KFAC, EKFAC, TKFAC and TEKFAC over data shards on two gloo ranks (issue 14, the contract).

Every rank builds the operator from its own shard (rank ``r`` takes batches ``r::2`` of a fixed
list, or an uneven or empty share) and gets the operator of the union: the same, in float64 up
to 1e-10, as one process on all the data (``group="local"``, the single-process path that the
other test files check against dense ground truth). ``"mc"`` draws are checked against the
combination of each rank's own local build, with that rank's seed.
"""

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

import curvops
from curvops.distributed import Shards
from curvops.errors import NonDeterministicDataError
from curvops.nn.kfac import kronecker_approximation

DOUBLE = torch.float64
IGNORE = -100
TOLERANCE = 1e-10
NAMES = ["kfac", "ekfac", "tkfac", "tekfac"]
SIZES = [6, 4, 5, 3, 6]
"""The batch sizes of every data set: five batches of different sizes."""


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TokenWise(nn.Module):
    """A token-wise MLP on ``[N, S, 3]`` giving logits ``[N, C, S]``."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x))).movedim(-1, 1)


class Tied(nn.Module):
    """An embedding and an output head that share one weight, on token ids ``[N, S]``."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding, self.head = nn.Embedding(7, 4), nn.Linear(4, 7)
        self.head.weight = self.embedding.weight

    def forward(self, x):
        return self.head(torch.tanh(self.embedding(x))).movedim(-1, 1)


class Attention(nn.Module):
    """Self-attention, or cross-attention to the reversed sequence (``cross``), then a head."""

    def __init__(self, cross: bool) -> None:
        super().__init__()
        self.attention, self.head, self.cross = (
            nn.MultiheadAttention(4, 2, batch_first=True),
            nn.Linear(4, 2),
            cross,
        )

    def forward(self, x):
        memory = x.flip(1) if self.cross else x
        return self.head(self.attention(x, memory, memory, need_weights=False)[0]).mean(1)


def _model(case: str, hidden: int = 5) -> nn.Module:
    torch.manual_seed(0)
    if case == "tokens" or case == "weighted":
        model = TokenWise()
    elif case == "norm":
        model = nn.Sequential(nn.Linear(4, hidden), nn.LayerNorm(hidden), nn.Tanh(), nn.Linear(hidden, 3))
    elif case == "grouped":
        model = nn.Sequential(nn.Conv1d(4, 6, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))
    elif case == "tied":
        model = Tied()
    elif case in ("cross", "self"):
        model = Attention(cross=case == "cross")
    else:
        model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))
    return model.double()


def _loss(case: str, reduction: str = "mean") -> nn.Module:
    if case in ("mse", "norm", "cross", "self"):
        return nn.MSELoss(reduction=reduction)
    if case == "weighted":
        return nn.CrossEntropyLoss(torch.tensor([0.5, 2.0, 1.0], dtype=DOUBLE), ignore_index=IGNORE)
    return nn.CrossEntropyLoss(reduction=reduction, ignore_index=IGNORE)


def _batch(case: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _generator(seed)
    if case in ("tokens", "weighted", "tied"):
        y = torch.randint(0, 7 if case == "tied" else 3, (n, 5), generator=g)
        y[torch.rand(n, 5, generator=g) < 0.3] = IGNORE  # padding and holes
        x = torch.randint(0, 7, (n, 5), generator=g) if case == "tied" else torch.randn(n, 5, 3, generator=g)
        return (x, y) if case == "tied" else (x.double(), y)
    if case == "grouped":
        return torch.randn(n, 4, 5, generator=g, dtype=DOUBLE), torch.randint(0, 3, (n,), generator=g)
    if case in ("cross", "self"):
        return torch.randn(n, 3, 4, generator=g, dtype=DOUBLE), torch.randn(n, 2, generator=g, dtype=DOUBLE)
    x = torch.randn(n, 4, generator=g, dtype=DOUBLE)
    if case in ("mse", "norm"):
        return x, torch.randn(n, 3, generator=g, dtype=DOUBLE)
    return x, torch.randint(0, 3, (n,), generator=g)


def _data(case: str) -> list:
    return [_batch(case, n, seed) for seed, n in enumerate(SIZES)]


def _shard(batches: list, layout: str, rank: int) -> list:
    """This rank's batches: ``"strided"`` ``r::2`` (3 and 2), ``"fewer"`` (4 and 1), ``"empty"``
    (all and none)."""
    if layout == "strided":
        return batches[rank::2]
    cut = {"fewer": 4, "empty": len(batches)}[layout]
    return batches[:cut] if rank == 0 else batches[cut:]


def _build(name: str, case: str, data: list, **options):
    return kronecker_approximation(
        name, _model(case), _loss(case, options.pop("reduction", "mean")), data, **options
    )


def _difference(a, b) -> float:
    return float((a.to_dense() - b.to_dense()).abs().max())


def _union_against_one_process(name: str, case: str, layout: str = "strided", **options) -> float:
    """max |union - one process on all the data| of this rank's operator."""
    data = _data(case)
    mine = _shard(data, layout, dist.get_rank())
    return _difference(
        _build(name, case, mine, **options), _build(name, case, data, group="local", **options)
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", ["mse", "ce"])
@pytest.mark.parametrize("name", NAMES)
def test_the_union_of_shards_is_one_process_on_all_the_data(ranks, name, case, reduction):
    errors = ranks.run(_union_against_one_process, name, case, fisher_type="type-2", reduction=reduction)
    assert max(errors) < TOLERANCE


@pytest.mark.parametrize("case", ["tokens", "weighted"])
@pytest.mark.parametrize("name", NAMES)
def test_padding_and_class_weights_count_over_all_ranks(ranks, name, case):
    """``ignore_index`` over token sequences (and a weighted loss's mean) on every rank's shard."""
    assert max(ranks.run(_union_against_one_process, name, case, fisher_type="type-2")) < TOLERANCE


@pytest.mark.parametrize("layout", ["fewer", "empty"])
@pytest.mark.parametrize("name", NAMES)
def test_uneven_shards_and_a_rank_without_batches(ranks, name, layout):
    assert max(ranks.run(_union_against_one_process, name, "ce", layout, fisher_type="type-2")) < TOLERANCE


@pytest.mark.parametrize(
    "name, fisher_type",
    [(name, "empirical") for name in NAMES] + [("kfac", "forward-only")],
)
def test_other_fisher_types(ranks, name, fisher_type):
    assert max(ranks.run(_union_against_one_process, name, "ce", fisher_type=fisher_type)) < TOLERANCE


@pytest.mark.parametrize("case", ["norm", "grouped"])
@pytest.mark.parametrize("name", NAMES)
def test_exact_norm_blocks_and_grouped_convolutions_reduce(ranks, name, case):
    assert max(ranks.run(_union_against_one_process, name, case, fisher_type="type-2")) < TOLERANCE


def test_tied_weights_reduce(ranks):
    assert max(ranks.run(_union_against_one_process, "kfac", "tied", fisher_type="type-2")) < TOLERANCE


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_attention_on_a_rank_without_batches_follows_the_other_ranks_calls(ranks, name):
    """Cross-attention on rank 0 only (rank 1 has no batch): rank 1 takes q, k and v blocks too."""
    assert (
        max(ranks.run(_union_against_one_process, name, "cross", "empty", fisher_type="type-2")) < TOLERANCE
    )


def _attention_called_differently() -> None:
    case = "cross" if dist.get_rank() == 1 else "self"
    kronecker_approximation("kfac", _model(case), _loss(case), _data(case)[:2], fisher_type="type-2")


def test_attention_called_differently_on_the_ranks_is_refused(ranks):
    with pytest.raises(AssertionError, match="'attention' is called differently on different ranks"):
        ranks.run(_attention_called_differently)


# ------------------------------------------------------------------------------ "mc" label draws


def _labels_of_two_builds() -> list:
    mine = _shard(_data("ce"), "strided", dist.get_rank())
    first, second = (_build("ekfac", "ce", mine, fisher_type="mc", seed=3, mc_samples=2) for _ in range(2))
    return [torch.equal(first.to_dense(), second.to_dense()), first.to_dense()]


def test_mc_labels_build_one_fixed_matrix(ranks):
    (same0, dense0), (same1, dense1) = ranks.run(_labels_of_two_builds)
    assert same0 and same1 and torch.equal(dense0, dense1)


def _same_shard_on_both_ranks() -> float:
    """Both ranks hold the same data: with one seed the union would be one rank's operator."""
    data = _data("ce")
    union = _build("kfac", "ce", data, fisher_type="mc", seed=3)
    alone = _build("kfac", "ce", data, fisher_type="mc", seed=3, group="local")
    return _difference(union, alone)


def test_mc_labels_are_drawn_with_a_seed_per_rank(ranks):
    assert min(ranks.run(_same_shard_on_both_ranks)) > 1e-3


def _local_factors(op) -> list[list[torch.Tensor]]:
    return [list(b.factors) if isinstance(b, curvops.Kronecker) else [b.to_dense()] for b in op.blocks]


def _mc_union_of_local_builds() -> float:
    """The union's factors against the count-weighted means of each rank's local build's factors
    (``A`` and ``G`` are both means over the data: rows and, for "mc", rows times samples)."""
    shards = Shards.of()
    mine = _shard(_data("ce"), "strided", shards.rank)
    options = {"fisher_type": "mc", "mc_samples": 2}
    local = _build("kfac", "ce", mine, seed=shards.seed(3), group="local", **options)
    rows = sum(len(y) for _, y in mine)
    gathered = shards.gather((rows, _local_factors(local)))
    total = sum(n for n, _ in gathered)
    union = _build("kfac", "ce", mine, seed=3, **options)
    error = 0.0
    for b, factors in enumerate(_local_factors(union)):
        for f, factor in enumerate(factors):
            combined = sum(n * rank_factors[b][f] for n, rank_factors in gathered) / total
            error = max(error, float((factor - combined).abs().max()))
    return error


def test_mc_union_is_the_combination_of_each_ranks_local_draws(ranks):
    assert max(ranks.run(_mc_union_of_local_builds)) < TOLERANCE


# ------------------------------------------------------------------------------ logdet, groups, errors


def _logdets() -> list[float]:
    data = _data("mse")
    mine = _shard(data, "strided", dist.get_rank())
    union = _build("kfac", "mse", mine, fisher_type="type-2").logdet(damping=1e-3)
    alone = _build("kfac", "mse", data, fisher_type="type-2", group="local").logdet(damping=1e-3)
    return [float(union), float(alone)]


def test_kfac_logdet_is_one_process_on_all_the_data(ranks):
    for union, alone in ranks.run(_logdets):
        assert math.isclose(union, alone, rel_tol=TOLERANCE)


def _local_group_under_a_process_group() -> list[float]:
    data = _data("ce")
    mine = _shard(data, "strided", dist.get_rank())
    local = _build("kfac", "ce", mine, fisher_type="type-2", group="local")
    alone = curvops.KFAC(_model("ce"), _loss("ce"), mine, fisher_type="type-2", group="local")
    union = _build("kfac", "ce", mine, fisher_type="type-2", group=dist.group.WORLD)
    return [_difference(local, union), _difference(local, alone)]


def test_the_local_group_keeps_this_ranks_data_alone(ranks):
    for against_union, against_alone in ranks.run(_local_group_under_a_process_group):
        assert against_union > 1e-3 and against_alone == 0.0


def _different_models() -> None:
    hidden = 5 + dist.get_rank()
    curvops.KFAC(_model("ce", hidden), _loss("ce"), _data("ce")[:2], fisher_type="type-2")


def test_different_models_on_the_ranks_are_refused(ranks):
    with pytest.raises(
        AssertionError, match=r"Layer '0': rank 1 holds .* every rank must run the same model"
    ):
        ranks.run(_different_models)


def _no_loss_terms(valid_on_rank: int | None) -> float:
    """Every target of the ranks other than ``valid_on_rank`` ignored."""
    data = [
        (x, y if i % 2 == valid_on_rank else torch.full_like(y, IGNORE))
        for i, (x, y) in enumerate(_data("tokens"))
    ]
    union = _build("kfac", "tokens", _shard(data, "strided", dist.get_rank()), fisher_type="type-2")
    return _difference(union, _build("kfac", "tokens", data, fisher_type="type-2", group="local"))


def test_the_loss_terms_are_counted_over_all_ranks(ranks):
    """A rank whose targets are all ignored adds nothing; with no loss terms anywhere, every rank
    raises."""
    assert max(ranks.run(_no_loss_terms, 0)) < TOLERANCE
    with pytest.raises(AssertionError, match="The data has no loss terms"):
        ranks.run(_no_loss_terms, None)


def _exact_blocks_over_ranks(unsupported: str, split: str) -> float:
    """KFAC with an exact block for a module without a rule (``nn.PReLU``), over shards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.PReLU(), nn.Linear(3, 3)).double()
    data = _data("mse")
    shard = _shard(data, split, dist.get_rank())
    options = {"fisher_type": "type-2", "unsupported": unsupported}
    union = curvops.KFAC(model, nn.MSELoss(), shard, **options)
    return _difference(union, curvops.KFAC(model, nn.MSELoss(), data, group="local", **options))


@pytest.mark.parametrize("unsupported", ["dense", "diagonal"])
@pytest.mark.parametrize("split", ["strided", "empty"])
def test_exact_blocks_of_unsupported_modules_are_the_union(ranks, unsupported, split):
    assert max(ranks.run(_exact_blocks_over_ranks, unsupported, split)) < TOLERANCE


def test_group_is_checked_before_any_pass():
    with pytest.raises(ValueError, match=r"group must be a torch\.distributed ProcessGroup"):
        curvops.KFAC(_model("ce"), _loss("ce"), _data("ce"), group="world")


class SharedTokenModel(nn.Module):
    """A token-wise model with dropout, a LayerNorm and one ``nn.Linear`` called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.shared = nn.Linear(3, 4), nn.Linear(4, 4)
        self.norm, self.dropout, self.head = nn.LayerNorm(4), nn.Dropout(0.5), nn.Linear(4, 3)

    def forward(self, x):
        h = self.shared(torch.tanh(self.shared(torch.tanh(self.first(x)))))
        return self.head(self.dropout(self.norm(h))).movedim(-1, 1)


def _pipeline_over_shards(name: str, dtype: torch.dtype) -> list:
    """A shuffled DataLoader over this rank's padded token examples (uneven batches), a shared
    module, a LayerNorm and dropout in eval mode, in ``dtype``: the union equals one process on all
    the examples, the model and its buffers are untouched and no graph leaves the operator; in train
    mode the dropout is refused on every rank."""
    torch.manual_seed(0)
    model = SharedTokenModel().to(dtype).eval()
    g = _generator(7)
    x, y = torch.randn(22, 5, 3, generator=g).to(dtype), torch.randint(0, 3, (22, 5), generator=g)
    y[torch.rand(22, 5, generator=g) < 0.3] = IGNORE
    rank = dist.get_rank()
    mine = torch.utils.data.TensorDataset(x[rank::2], y[rank::2])
    loader = torch.utils.data.DataLoader(mine, batch_size=4, shuffle=True, generator=_generator(rank))
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    union = kronecker_approximation(name, model, loss_fn, loader, fisher_type="type-2")
    alone = kronecker_approximation(name, model, loss_fn, [(x, y)], fisher_type="type-2", group="local")
    dense, truth = union.to_dense().double(), alone.to_dense().double()
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    same_objects = all(p is q for p, q in zip(params, model.parameters(), strict=True))
    no_graph = not union.to_dense().requires_grad and all(p.grad is None for p in params)
    model.train()
    try:
        kronecker_approximation(name, model, loss_fn, loader, fisher_type="type-2")
        refused = ""
    except NonDeterministicDataError as error:
        refused = str(error)
    return [float((dense - truth).norm() / truth.norm()), unchanged and same_objects and no_graph, refused]


@pytest.mark.parametrize("dtype", [DOUBLE, torch.bfloat16])
@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_a_real_pipeline_over_shards_is_one_process_on_all_the_data(ranks, name, dtype):
    tolerance = TOLERANCE if dtype == DOUBLE else 1e-5  # bf16: float32 statistics summed in other orders
    for error, untouched, refused in ranks.run(_pipeline_over_shards, name, dtype):
        assert error < tolerance and untouched
        assert "dropout" in refused and "model.eval()" in refused


def _one_rank_fails(layout: str, name: str) -> None:
    """Rank 0's first batch holds a NaN; rank 1 has data too (``"strided"``) or none (``"empty"``)."""
    data = _data("ce")
    data[0] = (torch.full_like(data[0][0], float("nan")), data[0][1])
    _build(name, "ce", _shard(data, layout, dist.get_rank()), fisher_type="type-2")


@pytest.mark.parametrize("layout", ["strided", "empty"])
@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_an_error_on_one_rank_is_raised_on_every_rank(ranks, name, layout):
    """The failing rank names the batch; the others raise instead of waiting in the reduction."""
    with pytest.raises(AssertionError) as failed:
        ranks.run(_one_rank_fails, layout, name, timeout=60.0)
    message = str(failed.value)
    assert "rank 0:" in message and "Batch 0: X contains NaN or inf" in message
    assert "rank 1:" in message and "KFAC statistics: 1 other rank(s) of 2 raised an error" in message
