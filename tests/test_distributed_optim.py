"""KFACOptimizer on a DistributedDataParallel model over two gloo ranks: the same steps as one
process on the global batch (float64), gradient accumulation under no_sync, uneven and empty
shards, checkpoints on every rank and identical parameters on every rank."""

import contextlib
import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from curvops.distributed import Shards
from curvops.optim import KFACOptimizer

TOLERANCE = 1e-10
SETTINGS = {"fisher_type": "type-2", "lr": 0.1, "damping": 0.05, "momentum": 0.9, "weight_decay": 1e-3}


INPUTS = {"mlp": (4,), "conv": (4, 5)}


def _model(kind: str = "mlp") -> nn.Module:
    """An MLP, or a grouped convolution, a LayerNorm (an exact block) and a linear layer (batches of
    16 keep the linear layer's input factor of rank 11 of 12: a unique EKFAC eigenbasis)."""
    torch.manual_seed(0)
    if kind == "conv":
        layers = [nn.Conv1d(4, 4, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.LayerNorm(12), nn.Linear(12, 3)]
    else:
        layers = [nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)]
    return nn.Sequential(*layers).double()


def _batch(
    step: int, size: int = 16, ignored: int = 0, kind: str = "mlp"
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(size, *INPUTS[kind], generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (size,), generator=g)
    y[size - ignored :] = -100
    return x, y


def _pair(loss_fn: nn.Module, kind: str = "mlp", **options):
    """A DDP model with its optimizer, and one process's copy (``group="local"``) with its own."""
    model = _model(kind)
    reference = copy.deepcopy(model)
    ddp = DistributedDataParallel(model)
    ddp_loss, reference_loss = copy.deepcopy(loss_fn), copy.deepcopy(loss_fn)
    options = {**SETTINGS, **options}
    optimizer = KFACOptimizer(ddp, ddp_loss, **options)
    reference_optimizer = KFACOptimizer(reference, reference_loss, group="local", **options)
    return (ddp, ddp_loss, optimizer), (reference, reference_loss, reference_optimizer)


def _step(model, loss_fn, optimizer, micro_batches) -> None:
    """One step on micro-batches of equal size, each backpropagated as ``loss / K``; under
    ``no_sync`` for all but the last one of a DDP model."""
    optimizer.zero_grad()
    for k, (x, y) in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        with (
            model.no_sync()
            if isinstance(model, DistributedDataParallel) and not last
            else contextlib.nullcontext()
        ):
            (loss_fn(model(x), y) / len(micro_batches)).backward()
    optimizer.step()


def _difference(model: nn.Module, reference: nn.Module) -> float:
    return max(
        float((p - q).detach().abs().max())
        for p, q in zip(model.parameters(), reference.parameters(), strict=True)
    )


def _flat(model: nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


def _train_against_one_process(
    kind: str, curvature: str, T_stats: int, T_inv: int, micro: int, steps: int, **options
):
    rank = Shards.of().rank
    (ddp, loss_fn, opt), (reference, reference_loss, reference_opt) = _pair(
        nn.CrossEntropyLoss(), kind, curvature=curvature, T_stats=T_stats, T_inv=T_inv, **options
    )
    initial = _difference(ddp.module, reference)
    for t in range(steps):
        micro_batches = [_batch(micro * t + k, kind=kind) for k in range(micro)]
        _step(ddp, loss_fn, opt, [(x[rank::2], y[rank::2]) for x, y in micro_batches])
        union = (torch.cat([x for x, _ in micro_batches]), torch.cat([y for _, y in micro_batches]))
        _step(reference, reference_loss, reference_opt, [union])
    moved = _difference(ddp.module, _model(kind))
    return initial, _difference(ddp.module, reference), moved, _flat(ddp.module)


@pytest.mark.parametrize(
    ("kind", "curvature", "T_stats", "T_inv", "options"),
    [
        ("mlp", "kfac", 1, 1, {}),
        ("mlp", "kfac", 1, 3, {"kl_clip": 1e-3}),
        ("mlp", "kfac", 2, 2, {"factored": True}),
        ("mlp", "ekfac", 1, 1, {}),
        ("mlp", "ekfac", 1, 2, {"kl_clip": 1e-3}),
        ("mlp", "tkfac", 1, 2, {}),
        ("mlp", "tekfac", 1, 2, {}),
        ("conv", "kfac", 1, 2, {}),
        ("conv", "ekfac", 1, 2, {}),
    ],
)
def test_ddp_steps_equal_one_process_on_the_global_batch(ranks, kind, curvature, T_stats, T_inv, options):
    results = ranks.run(_train_against_one_process, kind, curvature, T_stats, T_inv, 1, 5, **options)
    for initial, difference, moved, _ in results:
        assert initial == 0.0 and moved > 1e-3
        assert difference < TOLERANCE
    assert results[0][3] == results[1][3]  # every rank holds the same parameters, bit for bit


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_accumulation_under_no_sync_equals_one_process_on_the_concatenated_micro_batches(ranks, curvature):
    results = ranks.run(_train_against_one_process, "mlp", curvature, 1, 2, 2, 4)
    for initial, difference, moved, _ in results:
        assert initial == 0.0 and moved > 1e-3
        assert difference < TOLERANCE
    assert results[0][3] == results[1][3]


def _curvature_of_uneven_shards(reduction: str, sizes: tuple[int, int], ignored: tuple[int, int]) -> float:
    """Rank ``r`` holds ``sizes[r]`` data, its last ``ignored[r]`` padding: after one step the
    curvature is that of one process on the union (the global counts), whatever DDP's gradient."""
    rank = Shards.of().rank
    loss = nn.CrossEntropyLoss(reduction=reduction)
    (ddp, loss_fn, opt), (reference, reference_loss, reference_opt) = _pair(loss, curvature="ekfac", T_inv=1)
    shards = [_batch(r, sizes[r], ignored[r]) for r in range(2)]
    _step(ddp, loss_fn, opt, [shards[rank]])
    union = (torch.cat([x for x, _ in shards]), torch.cat([y for _, y in shards]))
    _step(reference, reference_loss, reference_opt, [union])
    dense, truth = opt.curvature_operator().to_dense(), reference_opt.curvature_operator().to_dense()
    return float((dense - truth).abs().max() / truth.abs().max())


@pytest.mark.parametrize(
    ("reduction", "sizes", "ignored"),
    [("mean", (5, 3), (0, 0)), ("mean", (6, 2), (2, 0)), ("sum", (5, 3), (0, 3))],
    ids=["mean-uneven", "mean-padding", "sum-rank-without-terms"],
)
def test_curvature_of_uneven_shards_uses_the_global_counts(ranks, reduction, sizes, ignored):
    assert max(ranks.run(_curvature_of_uneven_shards, reduction, sizes, ignored)) < TOLERANCE


def _resumes_on_every_rank(curvature: str) -> tuple[float, list[float]]:
    rank = Shards.of().rank
    (ddp, loss_fn, opt), _ = _pair(nn.CrossEntropyLoss(), curvature=curvature, T_inv=2)

    def train(model, loss, optimizer, steps):
        for t in steps:
            x, y = _batch(t)
            _step(model, loss, optimizer, [(x[rank::2], y[rank::2])])

    train(ddp, loss_fn, opt, range(3))
    buffer = io.BytesIO()
    torch.save({"model": ddp.module.state_dict(), "opt": opt.state_dict()}, buffer)
    train(ddp, loss_fn, opt, range(3, 6))
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    twin = _model()
    twin.load_state_dict(checkpoint["model"])
    twin_ddp, twin_loss = DistributedDataParallel(twin), nn.CrossEntropyLoss()
    resumed = KFACOptimizer(twin_ddp, twin_loss, curvature=curvature, T_inv=2, **SETTINGS)
    resumed.load_state_dict(checkpoint["opt"])
    train(twin_ddp, twin_loss, resumed, range(3, 6))
    return _difference(ddp.module, twin), _flat(twin)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_state_dict_resumes_on_every_rank(ranks, curvature):
    results = ranks.run(_resumes_on_every_rank, curvature)
    assert [difference for difference, _ in results] == [0.0, 0.0]
    assert results[0][1] == results[1][1]


def _module_and_local_group() -> list[float]:
    """The DDP wrapper or its module give the same optimizer; ``group="local"`` stays alone."""
    rank = Shards.of().rank
    curvatures = []
    for wrap, group in [(True, None), (False, None), (True, "local")]:
        model = _model()
        ddp = DistributedDataParallel(model)
        loss_fn = nn.CrossEntropyLoss()
        opt = KFACOptimizer(ddp if wrap else model, loss_fn, group=group, T_inv=1, **SETTINGS)
        x, y = _batch(0)
        _step(ddp, loss_fn, opt, [(x[rank::2], y[rank::2])])
        curvatures.append(opt.curvature_operator().to_dense())
    return [
        float((curvatures[0] - curvatures[1]).abs().max()),
        float((curvatures[0] - curvatures[2]).abs().max()),
    ]


def test_the_module_of_a_ddp_model_gives_the_same_optimizer_and_local_stays_alone(ranks):
    for same, local in ranks.run(_module_and_local_group):
        assert same == 0.0 and local > 1e-3


def test_an_unknown_group_is_refused():
    with pytest.raises(ValueError, match="group must be"):
        KFACOptimizer(_model(), nn.CrossEntropyLoss(), group="everyone")


def _skips_together() -> list[int]:
    """Rank 1's loss is not finite at step 1 (the model is not DDP-wrapped, so rank 0's gradient
    stays finite): both ranks skip that step."""
    rank = Shards.of().rank
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    opt = KFACOptimizer(model, loss_fn, T_inv=1, **SETTINGS)
    steps = []
    for t in range(3):
        x, y = _batch(t)
        x = x[rank::2]
        if t == 1 and rank == 1:
            x[0, 0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            _step(model, loss_fn, opt, [(x, y[rank::2])])
        steps.append(opt.steps)
    return steps


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(ranks):
    assert ranks.run(_skips_together) == [[1, 1, 2], [1, 1, 2]]


def _mc_draws_per_rank() -> float:
    """Both ranks hold the same data: with labels drawn per rank, the union's ``"mc"`` curvature
    is not one process's on that data (rank 0's draws), as it would be with common draws."""
    x, y = _batch(0, 4)
    options = {**SETTINGS, "fisher_type": "mc", "T_inv": 1}
    curvatures = []
    for group in (None, "local"):
        model, loss_fn = _model(), nn.CrossEntropyLoss()
        opt = KFACOptimizer(model, loss_fn, group=group, **options)
        _step(model, loss_fn, opt, [(x, y)])
        curvatures.append(opt.curvature_operator().to_dense())
    return float((curvatures[0] - curvatures[1]).abs().max())


def test_mc_labels_are_drawn_per_rank(ranks):
    assert min(ranks.run(_mc_draws_per_rank)) > 1e-6
