"""Eigendecompositions of Kronecker factors: one per factor (shared by a layer's blocks), in
float32 with a float64 fallback, and spread over ranks (curvops.distributed.decompose_blocks)."""

import contextlib
import math

import pytest
import torch
from helpers import train_steps
from torch import nn

import curvops
from curvops.distributed import Shards, decompose_blocks
from curvops.errors import StateDictError
from curvops.linalg import Factor, spectral
from curvops.linalg.factor import factors_of
from curvops.nn.kfac import _kronecker_blocks
from curvops.nn.layers import find_layers
from curvops.nn.model import ModelData
from curvops.nn.options import KroneckerOptions

DAMPING = 0.1


@contextlib.contextmanager
def counted_eigh():
    """Every ``torch.linalg.eigh`` call's input dtype, while the block runs."""
    calls, original = [], torch.linalg.eigh

    def counting(matrix, *args, **kwargs):
        calls.append(matrix.dtype)
        return original(matrix, *args, **kwargs)

    torch.linalg.eigh = counting
    try:
        yield calls
    finally:
        torch.linalg.eigh = original


def mlp(dtype=torch.float64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def batches(dtype=torch.float64, seed=1, count=2):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(7, 4, generator=g, dtype=dtype), torch.randint(0, 3, (7,), generator=g))
        for _ in range(count)
    ]


def dense_truth(op: curvops.CurvatureOperator):
    """``(F + λI)^-1`` and ``logdet(F + λI)`` from the dense matrix by torch.linalg, in float64."""
    damped = op.to_dense().double() + DAMPING * torch.eye(op.shape[0], dtype=torch.float64)
    return torch.linalg.inv(damped), torch.linalg.slogdet(damped)[1]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------- one eigh per factor
@pytest.mark.parametrize("factored", [False, True])
def test_kfac_inverse_and_logdet_decompose_each_factor_once(factored):
    op = curvops.KFAC(mlp(), nn.CrossEntropyLoss(), batches(), fisher_type="type-2")
    assert [type(op.block(n)).__name__ for n in ("0.weight", "0.bias")] == ["Kronecker", "Dense"]
    with counted_eigh() as calls:
        inverse = op.inverse(damping=DAMPING, factored=factored).to_dense()
        logdet = op.logdet(damping=DAMPING)
    assert len(calls) == 4  # G and A of each of the two layers; the biases' G are the weights'
    if not factored:
        truth_inverse, truth_logdet = dense_truth(op)
        assert relative(inverse, truth_inverse) < 1e-10
        assert abs(float(logdet - truth_logdet)) < 1e-10 * abs(float(truth_logdet))


def test_ekfac_build_and_tkfac_decompose_each_factor_once():
    with counted_eigh() as calls:
        ekfac = curvops.EKFAC(mlp(), nn.CrossEntropyLoss(), batches(), fisher_type="type-2")
    assert len(calls) == 4
    with counted_eigh() as calls:
        ekfac.inverse(damping=DAMPING), ekfac.logdet(damping=DAMPING)
    assert not calls
    tkfac = curvops.TKFAC(mlp(), nn.CrossEntropyLoss(), batches(), fisher_type="type-2")
    with counted_eigh() as calls:
        tkfac.inverse(damping=DAMPING), tkfac.logdet(damping=DAMPING)
    assert len(calls) == 6  # δΨ, Φ and the scaled G of each layer: three distinct factors


def test_a_grouped_layers_weight_and_bias_share_g():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(24, 2)).double()
    data = [(torch.randn(5, 4, 4, 4, dtype=torch.float64), torch.randint(0, 2, (5,)))]
    op = curvops.KFAC(model, nn.CrossEntropyLoss(), data, fisher_type="type-2")
    weight, bias = op.block("0.weight"), op.block("0.bias")
    assert type(bias).__name__ == "GroupedKronecker" and bias.shared_factors[0] is weight.shared_factors[0]
    with counted_eigh() as calls:
        inverse = op.inverse(damping=DAMPING).to_dense()
    assert len(calls) == 4
    assert relative(inverse, dense_truth(op)[0]) < 1e-10


def test_blocks_on_one_factor_share_its_decomposition():
    g = Factor(torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
    weight, bias = curvops.Kronecker(g, torch.eye(3, dtype=torch.float64)), curvops.Dense(g)
    with counted_eigh() as calls:
        bias.inverse(damping=1.0), weight.logdet()
    assert len(calls) == 2 and weight.eigendecompositions()[0][1] is bias.eigendecompositions()[0][1]
    with pytest.raises(ValueError, match=r"factor 0 decomposes in torch\.float64"):
        curvops.Kronecker(g, decomposition_dtype=torch.float32)
    with pytest.raises(ValueError, match="decomposition_dtype must be torch"):
        curvops.Dense(torch.eye(2), decomposition_dtype=torch.float16)


# ---------------------------------------------------------------- float32 with a fallback
@pytest.mark.parametrize("builder", [curvops.KFAC, curvops.EKFAC, curvops.TKFAC])
def test_float32_decompositions_are_close_to_float64(builder):
    """Tolerance: 1e-5 relative (Frobenius) for the damped inverse, 1e-6 of the logdet; float32's
    eigh has a backward error of a few ε_32 = 1.2e-7, and (F + 0.1 I) is well conditioned."""
    ops = {
        dtype: builder(
            mlp(), nn.CrossEntropyLoss(), batches(), fisher_type="type-2", decomposition_dtype=dtype
        )
        for dtype in (torch.float64, torch.float32)
    }
    single, double = ops[torch.float32], ops[torch.float64]
    assert single.block("0.weight").to_dense().dtype == torch.float64  # the factors keep their dtype
    truth_inverse, truth_logdet = dense_truth(double)
    assert relative(single.inverse(damping=DAMPING).to_dense(), truth_inverse) < 1e-5
    assert relative(single.logdet(damping=DAMPING), truth_logdet) < 1e-6
    assert relative(double.inverse(damping=DAMPING).to_dense(), truth_inverse) < 1e-10


def test_a_float32_model_with_float32_decompositions():
    model, data = mlp(torch.float32), batches(torch.float32)
    op = curvops.KFAC(
        model, nn.CrossEntropyLoss(), data, fisher_type="type-2", decomposition_dtype=torch.float32
    )
    with counted_eigh() as calls:
        inverse = op.inverse(damping=DAMPING).to_dense()
    assert calls == [torch.float32] * 4  # every factor accepted in float32: no fallback
    assert relative(inverse, dense_truth(op)[0]) < 1e-5


def test_a_factor_beyond_float32s_range_falls_back_to_float64():
    """A float64 factor with entries near 1e39 overflows in float32: its eigh is redone in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64)
    factor = 1e39 * (x @ x.T)
    with counted_eigh() as calls:
        e, q = spectral.eigh(factor, torch.float32)
    assert calls == [torch.float32, torch.float64]
    e64, q64 = torch.linalg.eigh(factor)
    assert torch.equal(e, e64) and torch.equal(q, q64)


def test_a_failing_or_inaccurate_float32_eigh_falls_back(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g)
    factor, original = x @ x.T, torch.linalg.eigh
    truth = tuple(t.float() for t in original(factor.double()))

    def failing(matrix, **kwargs):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return original(matrix, **kwargs)

    def inaccurate(matrix, **kwargs):
        e, q = original(matrix, **kwargs)
        return (e.mul_(1 + 1e-3), q) if matrix.dtype == torch.float32 else (e, q)

    for fake in (failing, inaccurate):
        monkeypatch.setattr(torch.linalg, "eigh", fake)
        block = curvops.Dense(factor, decomposition_dtype=torch.float32)
        e, q = block.eigendecompositions()[0]
        assert torch.equal(e, truth[0]) and torch.equal(q, truth[1])


def test_the_accuracy_check_accepts_lapack_float32_and_rejects_a_perturbation():
    for n in (2, 3, 64, 300):
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, 2 * n, generator=g)
        f = x @ x.T / (2 * n)
        e, q = torch.linalg.eigh(f)
        assert spectral.accurate_eigh(f, e, q)
        assert not spectral.accurate_eigh(f, e, q @ torch.linalg.matrix_exp(1e-3 * (x[:, :n] - x[:, :n].T)))
        assert not spectral.accurate_eigh(f, e.clone().fill_(math.nan), q)


def test_decomposition_dtype_survives_state_dicts():
    model, data = mlp(), batches()
    op = curvops.KFAC(
        model, nn.CrossEntropyLoss(), data, fisher_type="type-2", decomposition_dtype=torch.float32
    )
    state = op.state_dict()
    blocks = state["children"]
    assert all(child["config"] == {"decomposition_dtype": "float32"} for child in blocks)
    rebuilt = curvops.from_state_dict(state)
    assert [b.decomposition_dtype for b in rebuilt.blocks] == [torch.float32] * 4
    assert (
        relative(rebuilt.inverse(damping=DAMPING).to_dense(), op.inverse(damping=DAMPING).to_dense()) < 1e-12
    )
    op.load_state_dict(state)
    default = curvops.KFAC(model, nn.CrossEntropyLoss(), data, fisher_type="type-2")
    assert all(child["config"] == {} for child in default.state_dict()["children"])  # as before
    tampered = {**blocks[0], "config": {"decomposition_dtype": "float16"}}
    with pytest.raises(StateDictError, match="'float32' or 'float64'"):
        curvops.from_state_dict(tampered)
    grouped = curvops.linalg.GroupedKronecker(torch.eye(2)[None], decomposition_dtype=torch.float32)
    assert curvops.from_state_dict(grouped.state_dict()).decomposition_dtype == torch.float32


# ---------------------------------------------------------------- spread over two ranks
def _random_factors(count: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    factors = []
    for i in range(count):
        n = 3 + 2 * i
        x = torch.randn(n, n + 2, generator=g, dtype=torch.float64)
        factors.append(x @ x.T)
    return factors


def _spread_blocks() -> list:
    """Spread decompositions against local ones, per rank: bit-for-bit equality, this rank's eigh
    calls and its share by the KAISA assignment, and eigh calls of inverse/logdet afterwards."""
    shards = Shards.of()
    factors = _random_factors(6)
    shared = [Factor(f) for f in factors]
    blocks = [
        curvops.Kronecker(shared[0], shared[1]),
        curvops.Dense(shared[0]),
        curvops.Kronecker(*shared[2:5]),
    ]
    operator = curvops.BlockDiagonal([*blocks, curvops.Dense(shared[5])], ["a", "b", "c", "d"])
    with counted_eigh() as calls:
        decomposed = decompose_blocks([operator], shards)
    share = sum(
        1
        for owner in curvops.distributed.assignment([f.shape[0] ** 3 for f in factors], 2)
        if owner == shards.rank
    )
    equal = all(
        torch.equal(a, b)
        for s, f in zip(shared, factors, strict=True)
        for a, b in zip(s.eigh(), spectral.eigh(f), strict=True)
    )
    with counted_eigh() as after:
        (
            operator.inverse(damping=DAMPING),
            operator.logdet(damping=DAMPING),
            blocks[0].inverse(1.0, factored=True),
        )
    return [decomposed, len(calls), share, equal, len(after)]


def test_spread_decompositions_equal_local_ones(ranks):
    results = ranks.run(_spread_blocks)
    assert [r[0] for r in results] == [6, 6]  # six distinct factors, the shared one once
    assert sum(r[1] for r in results) == 6 and all(r[1] == r[2] for r in results)
    assert all(r[3] for r in results) and all(r[4] == 0 for r in results)


def _builder_blocks(name: str, dtype: torch.dtype) -> list:
    """The Kronecker blocks of ``name`` from ``_kronecker_blocks`` with spread decompositions, on
    every rank from the same data, against this process alone (``shards=None``)."""
    model, data = mlp(), batches()
    options = KroneckerOptions.checked(name, "type-2", "expand", "separate", 1, 0)
    loss = options.loss(nn.CrossEntropyLoss())

    def blocks(shards):
        model_data = ModelData(model, data, None, False, False)
        layers, _ = find_layers(model, model_data.params, options.bias, options.kfac_approx)
        return _kronecker_blocks(options, model_data, loss, layers, shards=shards, decomposition_dtype=dtype)

    with counted_eigh() as calls:
        spread = [block for _, layer_blocks in blocks(Shards.of()) for block in layer_blocks]
    local = [block.inverse(DAMPING).to_dense() for _, layer_blocks in blocks(None) for block in layer_blocks]
    with counted_eigh() as after:
        inverses = [block.inverse(DAMPING).to_dense() for block in spread]
        [block.logdet(DAMPING) for block in spread]
    equal = all(torch.equal(a, b) for a, b in zip(inverses, local, strict=True))
    return [len(calls), len(after), equal]


@pytest.mark.parametrize(
    ("name", "dtype"), [("kfac", torch.float64), ("ekfac", torch.float64), ("tkfac", torch.float32)]
)
def test_the_builders_spread_their_decompositions(ranks, name, dtype):
    results = ranks.run(_builder_blocks, name, dtype)
    factors = 6 if name == "tkfac" else 4
    assert sum(r[0] for r in results) == factors and all(r[0] > 0 for r in results)  # each its share
    assert all(r[1] == 0 and r[2] for r in results)  # no eigh afterwards; bit for bit the local blocks


def test_decompose_blocks_alone_and_on_other_operators():
    diagonal = curvops.Diagonal(torch.ones(3))
    embedding = curvops.Kronecker(torch.eye(2), torch.ones(4))  # a 1-D factor needs no eigh
    with counted_eigh() as calls:
        assert decompose_blocks([diagonal, embedding]) == 1
    assert len(calls) == 1
    assert decompose_blocks([embedding.to(dtype=torch.bfloat16)]) == 1  # through a Cast: a new copy


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_the_optimizer_decomposes_each_factor_once_per_rebuild(curvature):
    """Per rebuild, one eigh per distinct factor: A_1, G_1, A_2, G_2 (the biases share G)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = curvops.optim.KFACOptimizer(model, loss_fn, curvature=curvature, fisher_type="type-2")
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    with counted_eigh() as calls:
        train_steps(model, optimizer, loss_fn, [(x, y)])
    assert len(calls) == 4


def test_eigh_in_place_gives_torchs_numbers_bit_for_bit():
    """The copy made straight into LAPACK's buffer changes no number (one matrix and a batch)."""
    g = torch.Generator().manual_seed(4)
    for shape in [(7, 7), (3, 5, 5)]:
        x = torch.randn(*shape, generator=g)
        factor = x @ x.mT
        e, q = spectral.eigh(factor)
        truth = torch.linalg.eigh(factor.double())
        assert torch.equal(e, truth[0].float()) and torch.equal(q, truth[1].float())


def test_a_block_diagonal_decomposes_every_factor_before_inverting_a_block(monkeypatch):
    """So no eigh's transient meets a block inverse's temporaries."""
    model = mlp()
    op = curvops.KFAC(model, nn.CrossEntropyLoss(), batches(), fisher_type="type-2")
    factors = [f for f in factors_of([op]) if not f.diagonal]
    original, seen = curvops.Kronecker._inverse, []

    def inverse(self, damping, factored):
        seen.append(all(f.decomposed for f in factors))
        return original(self, damping, factored)

    monkeypatch.setattr(curvops.Kronecker, "_inverse", inverse)
    op.inverse(damping=DAMPING)
    assert seen and all(seen)
