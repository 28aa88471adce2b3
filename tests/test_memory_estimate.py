"""curvops.memory_estimate against the real bytes of the built operators' tensors."""

import pytest
import torch
from torch import nn

import curvops
from curvops.linalg.factor import factors_of

DAMPING = 0.1


def distinct_bytes(tensors) -> int:
    """``Σ element_size · numel`` over distinct tensors (one storage view counted once)."""
    seen = {(t.data_ptr(), t.numel(), t.dtype): t for t in tensors}
    return sum(t.element_size() * t.numel() for t in seen.values())


def state_tensors(state: dict) -> list[torch.Tensor]:
    """Every floating-point tensor of a state dict, nested ones included (not a joint bias's
    ``Permuted`` indices)."""
    tensors = [t for t in state["tensors"].values() if t.is_floating_point()]
    for child in state["children"]:
        tensors += state_tensors(child)
    return tensors


def cached_decompositions(op: curvops.CurvatureOperator) -> list[torch.Tensor]:
    """The cached ``(e, Q)`` and rounding bounds of the operator's distinct factors."""
    factors = {id(f): f for f in factors_of([op]) if not f.diagonal and f.decomposed}
    return [t for f in factors.values() for t in (*f.eigh(), f.noise())]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, 3))


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.LayerNorm([4, 5, 5]),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, groups=2),
        nn.Flatten(),
        nn.Linear(54, 3),
    )


def embedding_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 3))


def data_for(model: nn.Module):
    g = torch.Generator().manual_seed(1)
    if isinstance(model[0], nn.Embedding):
        inputs = torch.randint(0, 7, (9, 3), generator=g)
    elif isinstance(model[0], nn.Conv2d):
        inputs = torch.randn(9, 2, 5, 5, generator=g)
    else:
        inputs = torch.randn(9, 6, generator=g)
    return [(inputs, torch.randint(0, 3, (9,), generator=g))]


CASES = [
    (mlp, "separate"),
    (mlp, "joint"),
    (conv_net, "separate"),
    (conv_net, "joint"),
    (embedding_net, "separate"),
]


@pytest.mark.parametrize(("make", "bias"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kfac_and_tkfac_bytes_are_the_operators(make, bias, dtype):
    for builder, name in ((curvops.KFAC, "kfac"), (curvops.TKFAC, "tkfac")):
        model = make().to(dtype)
        estimate = curvops.memory_estimate(model, name, bias=bias)
        op = builder(model, nn.CrossEntropyLoss(), data_for(model), fisher_type="type-2", bias=bias)
        assert estimate.factors == distinct_bytes(state_tensors(op.state_dict()))
        assert not cached_decompositions(op)  # nothing decomposed before inverse or logdet
        inverse = op.inverse(damping=DAMPING)
        op.logdet(damping=DAMPING)
        cached = cached_decompositions(op)
        assert estimate.eigenbases == distinct_bytes(cached)
        kept = {t.data_ptr() for t in cached}
        own = [t for t in state_tensors(inverse.state_dict()) if t.data_ptr() not in kept]
        assert estimate.inverse == distinct_bytes(own)
        assert estimate.operator == estimate.factors + estimate.eigenbases
        assert estimate.dtype == dtype and estimate.decomposition > 0


@pytest.mark.parametrize(("make", "bias"), CASES)
@pytest.mark.parametrize("name", ["ekfac", "tekfac"])
def test_ekfac_bytes_are_the_operators(make, bias, name):
    model = make()
    built = curvops.memory_estimate(model, name, bias=bias, inverse=False)
    estimate = curvops.memory_estimate(model, name, bias=bias)
    kfac = curvops.memory_estimate(model, "tkfac" if name == "tekfac" else "kfac", bias=bias)
    op = curvops.nn.kfac.kronecker_approximation(
        name, model, nn.CrossEntropyLoss(), data_for(model), fisher_type="type-2", bias=bias
    )
    held = state_tensors(op.state_dict())
    assert built.operator == distinct_bytes(held)  # corrected blocks' eigenbases, exact blocks' factors
    assert estimate.factors == kfac.factors  # the factors it decomposes during the build
    inverse = state_tensors(op.inverse(damping=DAMPING).state_dict())
    cached = cached_decompositions(op)  # the exact (normalization) blocks'
    assert estimate.operator == distinct_bytes(held + cached)
    kept = {t.data_ptr() for t in held + cached}
    assert estimate.inverse == distinct_bytes([t for t in inverse if t.data_ptr() not in kept])


def test_a_large_normalization_layer_and_the_inverse_flag():
    model = nn.Sequential(nn.Linear(3, 3000), nn.LayerNorm(3000))
    estimate = curvops.memory_estimate(model, inverse=False)
    assert estimate["1"].block == "exact-diagonal" and estimate["1"].factors == 4 * 6000
    assert estimate.eigenbases == estimate.inverse == estimate.decomposition == 0
    assert estimate.factors == 4 * (3000**2 + 3**2) + 4 * 6000  # G, A; the norm layer's diagonal
    with pytest.raises(KeyError, match="No layer 'x'"):
        estimate["x"]


def test_the_table_and_the_decomposition_peaks():
    model = nn.Sequential(nn.Linear(100, 200), nn.PReLU(), nn.Linear(200, 10))
    double = curvops.memory_estimate(model, decomposition_dtype=torch.float64)
    single = curvops.memory_estimate(model, decomposition_dtype=torch.float32)
    # float64: the result (on the CPU also the factor's copy) and syevd's 2n² workspace; float32 on a
    # float32 factor: no copy, and
    # the rounding bounds' |Q| and row chunk of |F| (all 200 rows here) outweigh the workspace
    assert double.decomposition == 8 * 200**2 * 3 + 8 * (6 * 200 + 1) + 8 * 200
    assert single.decomposition == 4 * (200**2 + 3 * 200 * 200) > 4 * (2 * 200**2 + 6 * 200 + 1)
    assert single.factors == double.factors and single.peak < double.peak
    text = str(single)
    assert text.splitlines()[0] == "KFAC memory (torch.float32, eigh in torch.float32)"
    assert "not counted (no rule): 1" in text and "total" in text
    with pytest.raises(ValueError, match="decomposition_dtype"):
        curvops.memory_estimate(model, decomposition_dtype=torch.float16)
    half = curvops.memory_estimate(model.to(torch.bfloat16))
    assert half.dtype == torch.float32 and half.factors == double.factors
