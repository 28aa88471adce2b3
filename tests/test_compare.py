"""``curvops.compare`` against the same metrics computed here from the dense matrices."""

import dataclasses
import math

import pytest
import torch
from helpers import DOUBLE, dense_inverse, dense_logdet, generator, kron, random_psd
from model_truth import Truth
from torch import nn

import curvops

FIELDS = (
    "frobenius_error",
    "trace_ratio",
    "logdet_error",
    "inverse_angle",
    "top_eigenvalues_reference",
    "top_eigenvalues_approximation",
    "eigenvector_overlap",
)


def _expected(a, b, dampings, vectors, k):
    """The metrics of approximation ``b`` against reference ``a`` (dense), written independently."""
    x = dense_inverse(a, dampings[0]) @ vectors.reshape(a.shape[0], -1)
    y = dense_inverse(b, dampings[0]) @ vectors.reshape(a.shape[0], -1)
    cosines = (x * y).sum(0) / (x.norm(dim=0) * y.norm(dim=0))
    (ea, ua), (eb, ub) = torch.linalg.eigh(a), torch.linalg.eigh(b)
    return {
        "frobenius_error": (torch.linalg.norm(a - b) / torch.linalg.norm(a)).item(),
        "trace_ratio": (b.trace() / a.trace()).item(),
        "logdet_error": tuple(
            ((dense_logdet(b, d) - dense_logdet(a, d)).abs() / dense_logdet(a, d).abs()).item()
            for d in dampings
        ),
        "inverse_angle": torch.arccos(cosines.clamp(-1, 1)).mean().item(),
        "top_eigenvalues_reference": tuple(ea.flip(0)[:k].tolist()),
        "top_eigenvalues_approximation": tuple(eb.flip(0)[:k].tolist()),
        "eigenvector_overlap": (ua[:, -k:].T @ ub[:, -k:]).square().sum().item() / k,
    }


def _assert_matches(result, expected, rel=1e-9, abs=1e-12, fields=FIELDS):
    for name in fields:
        assert getattr(result, name) == pytest.approx(expected[name], rel=rel, abs=abs), name


def _dense_pair():
    a, b = random_psd(12, seed=0), random_psd(12, seed=1)
    return curvops.Dense(a), a, curvops.Dense(b), b


def _kronecker_pair():
    """A Kronecker approximation G ⊗ A of a dense reference near it."""
    g, f = random_psd(3, seed=2), random_psd(4, seed=3)
    a = kron(g, f) + 0.3 * random_psd(12, seed=4)
    return curvops.Dense(a), a, curvops.Kronecker(g, f), kron(g, f)


@pytest.mark.parametrize("pair", [_dense_pair, _kronecker_pair])
@pytest.mark.parametrize("shape", [(12,), (12, 3)])
def test_exact_mode_matches_dense_metrics(pair, shape):
    reference, a, approximation, b = pair()
    vectors = torch.randn(*shape, generator=generator(5), dtype=DOUBLE)
    dampings = (1e-3, 0.1, 1.0)
    result = curvops.compare(reference, approximation, damping=list(dampings), vectors=vectors, k=3)
    assert result.exact and result.dampings == dampings and len(result.logdet_error) == 3
    _assert_matches(result, _expected(a, b, dampings, vectors, 3))


@pytest.mark.parametrize("exact", [True, False])
def test_identical_operators(exact):
    g, f = random_psd(3, seed=6), random_psd(4, seed=7)
    result = curvops.compare(
        curvops.Dense(kron(g, f)), curvops.Kronecker(g, f), k=3, exact=exact, generator=generator(8)
    )
    assert result.exact is exact
    assert result.frobenius_error == pytest.approx(0, abs=1e-12)
    assert result.trace_ratio == pytest.approx(1, rel=1e-12)
    assert result.logdet_error == pytest.approx((0,), abs=1e-12)
    assert result.inverse_angle == pytest.approx(0, abs=1e-7)
    assert result.top_eigenvalues_approximation == pytest.approx(result.top_eigenvalues_reference, rel=1e-10)
    assert result.eigenvector_overlap == pytest.approx(1, rel=1e-10)


def test_estimated_mode_agrees_with_exact_mode():
    g, f = random_psd(5, seed=9), random_psd(6, seed=10)
    a = kron(g, f) + 0.5 * random_psd(30, seed=11)
    reference, approximation = curvops.Dense(a), curvops.Kronecker(g, f)
    m = 4000
    kwargs = {"damping": [1e-2, 1.0], "k": 3, "num_samples": m}
    exact = curvops.compare(reference, approximation, exact=True, generator=generator(12), **kwargs)
    estimated = curvops.compare(reference, approximation, exact=False, generator=generator(12), **kwargs)
    assert not estimated.exact
    assert estimated == curvops.compare(
        reference, approximation, exact=False, generator=generator(12), **kwargs
    )
    # ‖MZ‖_F² / m with m Rademacher probes has relative standard deviation <= sqrt(2/m) for both
    # squared norms; their ratio's square root, the error, is then within 5 sigma at 5 sqrt(2/m).
    assert estimated.frobenius_error == pytest.approx(exact.frobenius_error, rel=5 * math.sqrt(2 / m))
    # Structured operators' trace, logdet and inverse are exact in both modes; eigsh converges.
    _assert_matches(estimated, dataclasses.asdict(exact), rel=1e-8, abs=1e-8, fields=FIELDS[1:])


@pytest.fixture(scope="module")
def mlp_problem():
    """The exact GGN and type-2 KFAC of a tiny MLP with cross-entropy, and their dense matrices."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(12, 4, generator=generator(13), dtype=DOUBLE)
    y = torch.randint(0, 3, (12,), generator=generator(14))
    loss_fn = nn.CrossEntropyLoss()
    ggn = curvops.GGN(model, loss_fn, [(x, y)])
    kfac = curvops.KFAC(model, loss_fn, [(x, y)], fisher_type="type-2")
    return ggn, kfac, Truth(model, loss_fn, x, y).ggn(), kfac.to_dense()


def test_kfac_against_ggn_on_a_tiny_mlp(mlp_problem):
    ggn, kfac, a, b = mlp_problem
    vectors = torch.randn(ggn.shape[0], 4, generator=generator(15), dtype=DOUBLE)
    dampings = (1e-3, 1e-1)
    result = curvops.compare(ggn, kfac, damping=dampings, vectors=vectors, k=3)
    assert result.exact
    _assert_matches(result, _expected(a, b, dampings, vectors, 3), rel=1e-7, abs=1e-10)
    assert 0.25 < result.trace_ratio < 4
    assert 0 < result.frobenius_error < 1.5


def test_estimated_mode_on_a_model_operator(mlp_problem):
    """The GGN's trace by Hutch++, its logdet by SLQ (10 probes) and its inverse by CG."""
    ggn, kfac, a, _ = mlp_problem
    m, damping = 2000, 0.1
    vectors = torch.randn(ggn.shape[0], 4, generator=generator(15), dtype=DOUBLE)
    kwargs = {"damping": damping, "vectors": vectors, "k": 3, "num_samples": m, "generator": generator(16)}
    exact = curvops.compare(ggn, kfac, exact=True, **kwargs)
    estimated = curvops.compare(ggn, kfac, exact=False, **kwargs)
    assert estimated.frobenius_error == pytest.approx(exact.frobenius_error, rel=5 * math.sqrt(2 / m))
    # rank(GGN) <= 12 data x 2 < m/3: Hutch++'s sketch captures the GGN, so its trace is exact.
    assert estimated.trace_ratio == pytest.approx(exact.trace_ratio, rel=1e-8)
    # The GGN has < 30 distinct eigenvalues, so SLQ's Lanczos quadrature is exact and its error is
    # Hutchinson's on tr L, L = log(A + λI): standard deviation sigma = sqrt(2 (‖L‖_F² - Σ L_ii²) / 10).
    # The error e = |ℓ_B - ℓ_A| / |ℓ_A| moves by at most (1 + e) |δ| / |ℓ_A| when ℓ_A moves by δ.
    e, q = torch.linalg.eigh(a)
    log = q @ torch.diag((e.clamp_min(0) + damping).log()) @ q.T
    sigma = math.sqrt(2 * (log.square().sum() - log.diagonal().square().sum()).item() / 10)
    tolerance = 5 * sigma * (1 + exact.logdet_error[0]) / abs(dense_logdet(a, damping).item())
    assert estimated.logdet_error == pytest.approx(exact.logdet_error, abs=tolerance)
    # CG stops at a relative residual sqrt(eps): each solve is within κ sqrt(eps) of the truth.
    kappa = ((e.max() + damping) / (e.clamp_min(0).min() + damping)).item()
    eps = torch.finfo(DOUBLE).eps
    assert estimated.inverse_angle == pytest.approx(exact.inverse_angle, abs=kappa * math.sqrt(eps))
    _assert_matches(estimated, dataclasses.asdict(exact), rel=1e-8, abs=1e-8, fields=FIELDS[4:])


def test_default_mode_depends_on_size():
    small = curvops.Diagonal(torch.arange(1.0, 5.0, dtype=DOUBLE))
    assert curvops.compare(small, small, k=1).exact
    large = curvops.Diagonal(torch.linspace(1.0, 2.0, 2049, dtype=DOUBLE))
    result = curvops.compare(large, 2.0 * large, k=1, generator=generator(17))
    assert not result.exact
    assert result.frobenius_error == pytest.approx(1.0, rel=1e-12)  # ‖A Z‖ = ‖(A - 2A) Z‖ for any Z
    assert result.trace_ratio == pytest.approx(2.0)
    assert result.top_eigenvalues_approximation == pytest.approx((4.0,))


def _operator(size=4, dtype=DOUBLE):
    return curvops.Dense(random_psd(size, seed=18).to(dtype))


@pytest.mark.parametrize(
    ("reference", "approximation", "kwargs", "error", "match"),
    [
        (random_psd(4), _operator(), {}, TypeError, "reference must be a curvops.CurvatureOperator"),
        (_operator(), "B", {}, TypeError, "approximation must be"),
        (_operator(), _operator(5), {}, ValueError, "Shapes differ"),
        (_operator(), _operator(dtype=torch.float32), {}, TypeError, "Dtypes differ"),
        (_operator(), _operator(), {"k": 0}, ValueError, "1 <= k < D = 4"),
        (_operator(), _operator(), {"k": 4}, ValueError, "1 <= k < D"),
        (_operator(), _operator(), {"k": 1.0}, ValueError, "k must be an integer"),
        (_operator(), _operator(), {"damping": -1.0}, ValueError, "damping must be a finite number >= 0"),
        (_operator(), _operator(), {"damping": [0.1, math.nan]}, ValueError, "damping must be a finite"),
        (_operator(), _operator(), {"damping": []}, ValueError, "non-empty sequence"),
        (_operator(), _operator(), {"num_samples": 0}, ValueError, "num_samples must be a positive"),
        (_operator(), _operator(), {"vectors": torch.ones(3, dtype=DOUBLE)}, ValueError, r"shape \[4\]"),
        (_operator(), _operator(), {"vectors": torch.ones(4)}, ValueError, "dtype torch.float64"),
        (
            _operator(),
            _operator(),
            {"vectors": torch.zeros(4, 2, dtype=DOUBLE)},
            ValueError,
            "no zero column",
        ),
    ],
)
def test_bad_inputs_raise(reference, approximation, kwargs, error, match):
    with pytest.raises(error, match=match):
        curvops.compare(reference, approximation, **{"k": 1, **kwargs})


@pytest.mark.parametrize("exact", [True, False])
def test_undefined_metrics_raise(exact):
    other = curvops.Diagonal(torch.ones(4, dtype=DOUBLE))
    zero = curvops.Diagonal(torch.zeros(4, dtype=DOUBLE))
    with pytest.raises(ValueError, match="reference is zero"):
        curvops.compare(zero, other, k=1, exact=exact)
    traceless = curvops.Diagonal(torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=DOUBLE))
    with pytest.raises(ValueError, match="trace 0"):
        curvops.compare(traceless, other, damping=2.0, k=1, exact=exact)
    with pytest.raises(ValueError, match=r"logdet\(A \+ 0.0\*I\) = 0"):
        curvops.compare(curvops.Identity(4, dtype=DOUBLE), other, damping=0.0, k=1, exact=exact)


def test_runs_on_the_operators_device(device):
    a, b = random_psd(6, seed=19, device=device), random_psd(6, seed=20, device=device)
    vectors = torch.randn(6, 2, generator=generator(21), dtype=DOUBLE)
    expected = _expected(a.cpu(), b.cpu(), (1e-3,), vectors, 2)
    for exact, fields in ((True, FIELDS), (False, FIELDS[1:])):
        result = curvops.compare(
            curvops.Dense(a), curvops.Dense(b), vectors=vectors.to(device), k=2, exact=exact
        )
        _assert_matches(result, expected, rel=1e-8, abs=1e-10, fields=fields)
    if device.type == "cuda":
        with pytest.raises(ValueError, match="Devices differ"):
            curvops.compare(curvops.Dense(a), curvops.Dense(b.cpu()), k=1)
