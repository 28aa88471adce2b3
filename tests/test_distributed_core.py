"""curvops.distributed.Shards on two gloo processes: sums, statistics of uneven shards, seeds and
eigendecompositions spread over the ranks, against one process."""

import pytest
import torch
import torch.distributed as dist

from curvops.distributed import BUCKET_NUMBERS, LOCAL, Shards, assignment
from curvops.linalg import spectral
from curvops.nn.layers import find_layers
from curvops.nn.statistics import Corrections, LayerStatistics


def _rank_tensors(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return [
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(5, generator=g),
        torch.randn(2, dtype=torch.float64, generator=g),
    ]


def _sums() -> list[float]:
    shards = Shards.of()
    mine = _rank_tensors(shards.rank)
    summed = shards.sum(mine)
    truth = [a + b for a, b in zip(_rank_tensors(0), _rank_tensors(1), strict=True)]
    untouched = all(torch.equal(m, t) for m, t in zip(mine, _rank_tensors(shards.rank), strict=True))
    errors = [float((s - t).abs().max()) for s, t in zip(summed, truth, strict=True)]
    numbers = shards.sum_numbers([1.5, shards.rank])
    return [max(errors), untouched, numbers, shards.rank, shards.size, Shards.of(LOCAL).size]


def test_sums_over_two_ranks(ranks):
    for error, untouched, numbers, _, size, local in ranks.run(_sums):
        assert error == 0.0 and untouched
        assert numbers == [3.0, 1.0] and size == 2 and local == 1
    assert [r[3] for r in ranks.run(_sums)] == [0, 1]


def _many_buckets() -> float:
    shards = Shards.of()
    big = torch.full((BUCKET_NUMBERS // 2 + 1,), float(shards.rank + 1))
    small = torch.ones(3, dtype=torch.float64) * shards.rank
    summed = shards.sum([big, big.clone(), small])
    return max(float((summed[0] - 3).abs().max()), float((summed[1] - 3).abs().max()), float(summed[2].sum()))


def test_sums_split_into_buckets(ranks):
    assert ranks.run(_many_buckets) == [3.0, 3.0]


def _layer():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    layers, _ = find_layers(model, list(model.parameters()), "separate", "expand")
    return layers[0]


def _statistics_of_uneven_shards() -> float:
    """Rank 1 saw no batch: its statistics are empty, and the sum is rank 0's."""
    shards = Shards.of()
    layer = _layer()
    g = torch.Generator().manual_seed(0)
    full = LayerStatistics(
        layer,
        input_factor=torch.randn(4, 4, generator=g, dtype=torch.float64),
        output_factor=torch.randn(2, 2, generator=g, dtype=torch.float64),
        input_count=7.0,
    )
    mine = full if shards.rank == 0 else LayerStatistics(layer)
    (summed,) = shards.sum_statistics([mine])
    corrections = Corrections(torch.ones(2, 4, dtype=torch.float64)) if shards.rank == 1 else Corrections()
    (corrected,) = shards.sum_corrections([corrections], [layer.name])
    return max(
        float((summed.input_factor - full.input_factor).abs().max()),
        float((summed.output_factor - full.output_factor).abs().max()),
        abs(summed.input_count - 7.0),
        float((corrected.weight - 1).abs().max()),
        float(corrected.bias is not None),
    )


def test_statistics_of_an_empty_shard_enter_as_zeros(ranks):
    assert ranks.run(_statistics_of_uneven_shards) == [0.0, 0.0]


def _mismatched_statistics() -> None:
    shards = Shards.of()
    n = 4 if shards.rank == 0 else 5
    shards.sum_statistics([LayerStatistics(_layer(), input_factor=torch.eye(n), input_count=1.0)])


def test_mismatched_statistics_name_the_layer(ranks):
    with pytest.raises(AssertionError, match="Layer '0': rank 1 holds input_factor of shape"):
        ranks.run(_mismatched_statistics)


def _decompositions() -> list:
    shards = Shards.of()
    g = torch.Generator().manual_seed(3)
    factors = [torch.randn(n, n, generator=g, dtype=torch.float64) for n in (6, 2, 9, 3)]
    factors = [f @ f.T for f in factors] + [torch.eye(4).expand(2, 4, 4).clone()]
    spread = shards.decompose(factors)
    local = [spectral.eigh(f) for f in factors]
    error = max(
        float((e - le).abs().max() + (q - lq).abs().max())
        for (e, q), (le, lq) in zip(spread, local, strict=True)
    )
    return [error, [e.dtype for e, _ in spread], dist.get_rank()]


def test_decompositions_spread_equal_local_ones(ranks):
    for error, dtypes, _ in ranks.run(_decompositions):
        assert error == 0.0
        assert dtypes == [torch.float64] * 4 + [torch.float32]


def _seeds() -> int:
    return Shards.of().seed(5)


def test_seeds_differ_per_rank_and_rank_zero_keeps_the_seed(ranks):
    seeds = ranks.run(_seeds)
    assert seeds[0] == 5 and seeds[1] != 5
    assert Shards.of().seed(5) == 5  # alone


def test_assignment_balances_costs():
    costs = [27.0, 8.0, 1.0, 27.0, 1.0]
    owners = assignment(costs, 2)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in (0, 1)]
    assert sorted(loads) == [29.0, 35.0] and owners[0] != owners[3]


def test_groups_other_than_a_process_group_are_refused():
    with pytest.raises(ValueError, match=r"group must be a torch\.distributed ProcessGroup"):
        Shards.of("world")
    assert not Shards.of().active  # no process group here
