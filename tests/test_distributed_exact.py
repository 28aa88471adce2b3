"""The exact operators, the summed GGN diagonal, the estimators and compare over two gloo ranks.

Rank ``r`` holds a shard of a fixed list of batches; every rank's operator must be that of the
union: equal (float64, 1e-10) to one process on all the batches (``group="local"`` on the same
rank), for mean and sum reductions, padding (``ignore_index``), class weights and uneven shards
(one rank with fewer batches, with only padding, or with none). One Hessian is also checked
against ``torch.func.hessian`` of the loss over all the data.
"""

import pytest
import torch
from torch import nn

import curvops
from curvops.distributed import Shards
from curvops.nn.diagonal import summed_ggn_diagonal
from curvops.nn.losses import LossAdapter

TOL = 1e-10
SIZES = [3, 1, 4, 2, 2]
IGNORE = -100
SPLITS = {
    "alternate": lambda rank: list(range(rank, len(SIZES), 2)),  # 3 batches (9 data) against 2 (3)
    "uneven": lambda rank: [0, 1, 2, 3] if rank == 0 else [4],
    "padding only": lambda rank: [0, 2, 3, 4] if rank == 0 else [1],  # with padding, no loss terms on rank 1
    "empty": lambda rank: list(range(len(SIZES))) if rank == 0 else [],
    "empty rank 0": lambda rank: [] if rank == 0 else list(range(len(SIZES))),
}
OPERATORS = {"GGN": curvops.GGN, "Hessian": curvops.Hessian, "EmpiricalFisher": curvops.EmpiricalFisher}


def _loss(name: str) -> nn.Module:
    if name.startswith("mse"):
        return nn.MSELoss(reduction=name.split("-")[1])
    if name == "ce-weight":
        return nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64))
    return nn.CrossEntropyLoss(reduction=name.split("-")[-1], ignore_index=IGNORE)


def _problem(loss_name: str) -> tuple[nn.Module, nn.Module, list]:
    """A small tanh MLP (D = 31) and five batches; for ``"ce-pad-*"`` batch 1 is all padding and
    batch 2 half of it."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    loss_fn = _loss(loss_name)
    batches = []
    for index, n in enumerate(SIZES):
        x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        if loss_name.startswith("mse"):
            y = torch.randn(n, 3, generator=g, dtype=torch.float64)
        else:
            y = torch.randint(0, 3, (n,), generator=g)
            if "pad" in loss_name and index == 1:
                y[:] = IGNORE
            if "pad" in loss_name and index == 2:
                y[:2] = IGNORE
        batches.append((x, y))
    return model, loss_fn, batches


def _halves(batches: list) -> list:
    """The five batches as two (8 and 4 data): one per rank, for tests of many products."""
    return [tuple(torch.cat(parts) for parts in zip(*batches[a:b], strict=True)) for a, b in ((0, 3), (3, 5))]


def _shard(batches: list, split: str) -> list:
    return [batches[i] for i in SPLITS[split](Shards.of().rank)]


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _union_errors(loss_name: str, quantities: bool) -> dict:
    """Per operator and split, the largest difference of to_dense from one process's; with
    ``quantities``, also of a matvec, the exact diagonal and trace, a Hutchinson trace and a CG
    inverse-matvec on the alternate split."""
    model, loss_fn, batches = _problem(loss_name)
    v = torch.randn(31, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = {}
    for name, operator in OPERATORS.items():
        alone = operator(model, loss_fn, batches, group="local")
        dense = alone.to_dense()
        for split in SPLITS:
            union = operator(model, loss_fn, _shard(batches, split))
            errors[name, split] = _error(union.to_dense(), dense)
        if quantities:
            union = operator(model, loss_fn, _shard(batches, "alternate"))
            spectrum = torch.linalg.eigvalsh(dense)
            damping = float(1.0 - spectrum[0].clamp(max=0) + spectrum[-1] / 2)  # H + λI > 0, few CG steps
            errors[name, "quantities"] = max(
                _error(union @ v, alone @ v),
                _error(union.diagonal(), alone.diagonal()),
                _error(union.trace(), alone.trace()),
                _error(
                    *(op.trace("hutchinson", 4, torch.Generator().manual_seed(2)) for op in (union, alone))
                ),
                _error(*(op.inverse(damping, rtol=1e-10) @ v for op in (union, alone))),
            )
    return errors


@pytest.mark.parametrize(
    "loss_name, quantities",
    [
        ("mse-mean", False),
        ("mse-sum", True),
        ("ce-mean", False),
        ("ce-sum", False),
        ("ce-pad-mean", True),
        ("ce-weight", False),
    ],
)
def test_exact_operators_of_shards_are_the_union(ranks, loss_name, quantities):
    for errors in ranks.run(_union_errors, loss_name, quantities):
        worst = max(errors, key=errors.get)
        assert errors[worst] < TOL, (worst, errors[worst])


def _estimates() -> dict:
    """Every estimator on the union (probes from a generator seeded alike on both ranks) against
    the same estimator of one process with that seed; and with the global RNG seeded differently
    per rank, rank 0's probes (one process seeded as rank 0)."""
    model, loss_fn, batches = _problem("ce-pad-mean")
    halves = _halves(batches)
    union = curvops.GGN(model, loss_fn, halves[Shards.of().rank :][:1])
    alone = curvops.GGN(model, loss_fn, halves, group="local")
    v = torch.randn(31, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def both(compute):
        return [compute(op, torch.Generator().manual_seed(7)) for op in (union, alone)]

    quantities = {
        "hutchinson trace": lambda op, g: op.trace("hutchinson", 6, g),
        "hutch++ trace": lambda op, g: op.trace("hutch++", 6, g),
        "hutchinson diagonal": lambda op, g: op.diagonal("hutchinson", 6, g),
        "hutch++ diagonal": lambda op, g: op.diagonal("hutch++", 6, g),
        "slq logdet": lambda op, g: op.logdet(0.1, "slq", 3, 8, g),
        "lanczos power": lambda op, g: op.power(-0.5, 0.1, "lanczos", 8) @ v,
    }
    errors = {name: _error(*both(compute)) for name, compute in quantities.items()}
    torch.manual_seed(100 + Shards.of().rank)
    unseeded = union.trace("hutchinson", 6)
    torch.manual_seed(100)
    errors["global RNG"] = _error(unseeded, alone.trace("hutchinson", 6))
    errors["value"] = float(both(quantities["slq logdet"])[0])
    return errors


def test_estimators_follow_one_iteration_on_every_rank(ranks):
    results = ranks.run(_estimates)
    assert results[0]["value"] == results[1]["value"]
    for errors in results:
        del errors["value"]
        assert max(errors.values()) < TOL, errors


def _fisher_mc(split: str, reduction: str) -> dict:
    """The MC Fisher of the union is the honest combination of each rank's own operator with its
    own seed: ``(Z_0 F_0 + Z_1 F_1) / (Z_0 + Z_1)`` for the mean, ``F_0 + F_1`` for the sum; and
    one fixed matrix (built twice, the same)."""
    shards = Shards.of()
    model, loss_fn, batches = _problem(f"ce-pad-{reduction}")
    mine = _shard(batches, split)
    union = curvops.FisherMC(model, loss_fn, mine, mc_samples=3, seed=5)
    again = curvops.FisherMC(model, loss_fn, mine, mc_samples=3, seed=5).to_dense()
    own = curvops.FisherMC(model, loss_fn, mine, mc_samples=3, seed=shards.seed(5), group="local")
    terms = float(sum((y != IGNORE).sum() for _, y in mine))
    weight = terms if reduction == "mean" else 1.0
    parts = shards.gather((terms, (weight * own.to_dense()).tolist()))
    combined = sum(torch.tensor(part, dtype=torch.float64) for _, part in parts)
    if reduction == "mean":
        combined = combined / sum(z for z, _ in parts)
    dense = union.to_dense()
    return {"union": _error(dense, combined), "fixed": _error(dense, again), "seed": union.seed}


@pytest.mark.parametrize("split, reduction", [("alternate", "mean"), ("uneven", "sum"), ("alternate", "sum")])
def test_fisher_mc_of_shards_combines_the_ranks_own_draws(ranks, split, reduction):
    for result in ranks.run(_fisher_mc, split, reduction):
        assert result["union"] < TOL and result["fixed"] == 0.0 and result["seed"] == 5


def _fisher_mc_on_rank_zero() -> float:
    """With every batch on rank 0 (which keeps the seed), the union is one process's operator."""
    model, loss_fn, batches = _problem("ce-pad-mean")
    union = curvops.FisherMC(model, loss_fn, _shard(batches, "empty"), mc_samples=2, seed=3)
    alone = curvops.FisherMC(model, loss_fn, batches, mc_samples=2, seed=3, group="local")
    return _error(union.to_dense(), alone.to_dense())


def test_fisher_mc_with_all_data_on_rank_zero_is_one_process(ranks):
    assert max(ranks.run(_fisher_mc_on_rank_zero)) < TOL


def _hessian_truth() -> float:
    """The union's Hessian against torch.func.hessian of the mean padded cross-entropy over all data."""
    model, loss_fn, batches = _problem("ce-pad-mean")
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(theta):
        parts = theta.split([s.numel() for s in shapes])
        values = {name: t.reshape(s) for name, t, s in zip(names, parts, shapes, strict=True)}
        return loss_fn(torch.func.functional_call(model, values, (x,)), y)

    truth = torch.func.hessian(loss_of)(flat)
    return _error(curvops.Hessian(model, loss_fn, _shard(batches, "padding only")).to_dense(), truth)


def test_hessian_of_shards_is_the_dense_hessian_of_all_data(ranks):
    assert max(ranks.run(_hessian_truth)) < TOL


def _diagonals() -> list[float]:
    """The summed GGN diagonal of the shards against one process's, for three splits."""
    model, loss_fn, batches = _problem("ce-pad-mean")
    loss = LossAdapter(loss_fn)
    alone = summed_ggn_diagonal(curvops.nn.ModelData(model, batches), loss, group="local").diagonal()
    errors = []
    for split in ("alternate", "padding only", "empty"):
        data = curvops.nn.ModelData(model, _shard(batches, split), allow_empty=True)
        errors.append(_error(summed_ggn_diagonal(data, loss).diagonal(), alone))
    return errors


def test_summed_ggn_diagonal_of_shards_is_the_union(ranks):
    for errors in ranks.run(_diagonals):
        assert max(errors) < TOL, errors


def _comparisons(exact: bool) -> list:
    """compare of the union's GGN with the union's empirical Fisher (exact), or with a dense
    matrix (estimated), against one process's, the generator seeded alike on both ranks."""
    model, loss_fn, batches = _problem("ce-mean")
    halves = _halves(batches)
    ggn = [
        curvops.GGN(model, loss_fn, data, group=group)
        for data, group in ((halves[Shards.of().rank :][:1], None), (halves, "local"))
    ]
    if exact:
        fisher = [curvops.EmpiricalFisher(model, loss_fn, data) for data in (halves[Shards.of().rank :][:1],)]
        fisher.append(curvops.EmpiricalFisher(model, loss_fn, halves, group="local"))
    else:
        fisher = [
            curvops.Dense(curvops.EmpiricalFisher(model, loss_fn, halves, group="local").to_dense())
        ] * 2
    results = []
    for reference, approximation in zip(ggn, fisher, strict=True):
        generator = torch.Generator().manual_seed(4)
        c = curvops.compare(
            reference, approximation, damping=1.0, k=1, exact=exact, num_samples=3, generator=generator
        )
        results.append(
            [
                c.frobenius_error,
                c.trace_ratio,
                *c.logdet_error,
                c.inverse_angle,
                *c.top_eigenvalues_reference,
                *c.top_eigenvalues_approximation,
                c.eigenvector_overlap,
            ]
        )
    return [max(abs(a - b) for a, b in zip(*results, strict=True)), results[0]]


@pytest.mark.parametrize("exact", [True, False])
def test_compare_of_operators_over_shards(ranks, exact):
    (error_0, values_0), (error_1, values_1) = ranks.run(_comparisons, exact)
    assert values_0 == values_1  # every rank the same comparison
    assert max(error_0, error_1) < 1e-8  # eigsh and CG converge to their tolerances


def _local_on_rank_zero() -> float:
    """``group="local"`` makes no collective: rank 1 does nothing while rank 0 builds and multiplies."""
    if Shards.of().rank == 1:
        return 0.0
    model, loss_fn, batches = _problem("mse-mean")
    shard = batches[:2]
    op = curvops.GGN(model, loss_fn, shard, group="local")
    x = torch.cat([b[0] for b in shard])
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)))(
        dict(model.named_parameters())
    )
    j = torch.cat([t.reshape(x.shape[0] * 3, -1) for t in jac.values()], dim=1)
    return _error(op.to_dense(), 2 * j.T @ j / j.shape[0])


def test_local_group_stays_local(ranks):
    assert max(ranks.run(_local_on_rank_zero)) < TOL


def _differing_vectors() -> str:
    model, loss_fn, batches = _problem("mse-sum")
    op = curvops.GGN(model, loss_fn, _shard(batches, "alternate"))
    try:
        op @ torch.full((31,), float(Shards.of().rank), dtype=torch.float64)
    except ValueError as error:
        return str(error)
    return ""


def test_ranks_multiplying_different_vectors_raise_on_every_rank(ranks):
    for message in ranks.run(_differing_vectors):
        assert "GGN product: the ranks multiply different vectors" in message


def _failing_rank(at_build: bool) -> str:
    model, loss_fn, batches = _problem("mse-mean")
    mine = _shard(batches, "alternate")
    if Shards.of().rank == 1 and at_build:
        mine[0] = (mine[0][0] * float("nan"), mine[0][1])
    try:
        op = curvops.GGN(model, loss_fn, mine)
        if not at_build:
            if Shards.of().rank == 1:
                with torch.no_grad():
                    model[0].bias.add_(1.0)  # stale on rank 1 only
            op @ torch.ones(31, dtype=torch.float64)
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return ""


@pytest.mark.parametrize("at_build", [True, False])
def test_an_error_on_one_rank_raises_on_every_rank(ranks, at_build):
    other, failing = ranks.run(_failing_rank, at_build)
    assert other.startswith("RuntimeError: ") and "1 other rank(s) of 2 raised" in other
    assert failing.startswith("ValueError: Batch 0" if at_build else "StaleParametersError: ")


def _no_loss_terms(everywhere: bool) -> str:
    model, loss_fn, batches = _problem("ce-pad-mean")
    padded = [batches[1]] if everywhere or Shards.of().rank == 1 else batches
    try:
        curvops.GGN(model, loss_fn, padded)
    except ValueError as error:
        return str(error)
    return ""


def test_no_loss_terms_is_checked_on_the_union(ranks):
    assert ranks.run(_no_loss_terms, False) == ["", ""]  # rank 1 alone has none: fine
    for message in ranks.run(_no_loss_terms, True):
        assert message == "The data has no loss terms on any rank (every target is ignored)."
