"""The generic fallbacks (Hutchinson, Hutch++, Diag++, SLQ, CG) against dense answers.

Tolerances come from each estimator's known variance, not from its output: a bound of
five standard deviations fails with probability below 1e-6 per check.
"""

import math

import pytest
import torch
from helpers import DOUBLE, dense_inverse, dense_logdet, generator, random_orthogonal, random_psd

import curvops


def _spd_with_spectrum(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    q = random_orthogonal(eigenvalues.shape[0], seed)
    return q @ torch.diag(eigenvalues) @ q.T


def _hutchinson_std(matrix: torch.Tensor, samples: int) -> float:
    """Standard deviation of Hutchinson's trace estimate with Rademacher probes."""
    return math.sqrt(2 * (matrix.square().sum() - matrix.diagonal().square().sum()) / samples)


@pytest.fixture
def unstructured():
    """A sum of two operators: no structure, so every quantity takes the generic path."""
    a, b = random_psd(30, seed=1), random_psd(30, rank=3, seed=2)
    return curvops.Dense(a) + curvops.Dense(b), a + b


def test_hutchinson_trace_within_its_standard_deviation(unstructured):
    op, matrix = unstructured
    estimate = op.trace(method="hutchinson", num_samples=400, generator=generator(0))
    assert abs(estimate - matrix.trace()) < 5 * _hutchinson_std(matrix, 400)
    assert estimate != matrix.trace()


def test_hutchpp_is_exact_for_low_rank_and_beats_hutchinson():
    u = torch.randn(40, 4, generator=generator(3), dtype=DOUBLE)
    op = curvops.LowRankUpdate(curvops.Diagonal(torch.zeros(40, dtype=DOUBLE)), u)
    torch.testing.assert_close(
        op.trace(method="hutch++", num_samples=12, generator=generator(1)), (u * u).sum()
    )
    decaying = _spd_with_spectrum(0.5 ** torch.arange(40, dtype=DOUBLE))
    dense = curvops.Dense(decaying) + curvops.Dense(torch.zeros(40, 40, dtype=DOUBLE))
    errors = {
        method: torch.stack(
            [
                (dense.trace(method=method, num_samples=30, generator=generator(s)) - decaying.trace()).abs()
                for s in range(20)
            ]
        ).mean()
        for method in ("hutchinson", "hutch++")
    }
    assert errors["hutch++"] < 0.01 * errors["hutchinson"]


def test_hutchinson_diagonal_within_its_standard_deviation(unstructured):
    op, matrix = unstructured
    samples = 400
    estimate = op.diagonal(method="hutchinson", num_samples=samples, generator=generator(0))
    std = ((matrix.square().sum(1) - matrix.diagonal().square()) / samples).sqrt()
    assert bool(((estimate - matrix.diagonal()).abs() < 5 * std).all())


def test_diagpp_is_exact_for_low_rank():
    u = torch.randn(25, 3, generator=generator(4), dtype=DOUBLE)
    op = curvops.LowRankUpdate(curvops.Diagonal(torch.zeros(25, dtype=DOUBLE)), u)
    estimate = op.diagonal(method="hutch++", num_samples=9, generator=generator(2))
    torch.testing.assert_close(estimate, (u * u).sum(1))


@pytest.mark.parametrize("num_steps", [8, 40])
def test_slq_logdet_within_its_standard_deviation(num_steps):
    eigenvalues = torch.linspace(1.0, 10.0, 40, dtype=DOUBLE)
    matrix = _spd_with_spectrum(eigenvalues)
    op = curvops.Dense(matrix) + curvops.Dense(torch.zeros(40, 40, dtype=DOUBLE))
    log_matrix = _spd_with_spectrum(eigenvalues.log())
    samples = 200
    estimate = op.logdet(method="slq", num_samples=samples, num_steps=num_steps, generator=generator(0))
    assert abs(estimate - dense_logdet(matrix)) < 5 * _hutchinson_std(log_matrix, samples) + 1e-6


def test_slq_with_damping_and_on_singular_operator():
    matrix = random_psd(20, rank=5, seed=3)
    op = curvops.Dense(matrix) + curvops.Dense(torch.zeros(20, 20, dtype=DOUBLE))
    estimate = op.logdet(damping=0.5, method="slq", num_samples=300, num_steps=20, generator=generator(1))
    log_matrix = torch.linalg.eigh(matrix + 0.5 * torch.eye(20, dtype=DOUBLE))
    log_matrix = (
        log_matrix.eigenvectors @ torch.diag(log_matrix.eigenvalues.log()) @ log_matrix.eigenvectors.T
    )
    assert abs(estimate - dense_logdet(matrix, 0.5)) < 5 * _hutchinson_std(log_matrix, 300) + 1e-6
    indefinite = curvops.Dense(-matrix) + curvops.Dense(torch.zeros(20, 20, dtype=DOUBLE))
    with pytest.raises(curvops.NotPositiveDefiniteError, match="damping"):
        indefinite.logdet(method="slq")


def test_lanczos_stops_at_an_invariant_subspace():
    matrix = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DOUBLE))
    start = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=DOUBLE)
    alphas, _betas, lengths = curvops.linalg.lanczos(lambda v: matrix @ v, start, 4)
    assert lengths == [2, 1]
    assert alphas[0, 1] == 1.0


def test_cg_inverse_matches_dense_and_batches_columns():
    matrix = random_psd(15, seed=5)
    op = curvops.Dense(matrix) + curvops.Dense(random_psd(15, rank=2, seed=6))
    dense = op.to_dense()
    rhs = torch.randn(15, 4, generator=generator(0), dtype=DOUBLE)
    rhs[:, 2] = 0
    inverse = op.inverse(damping=0.1, method="cg", rtol=1e-12)
    torch.testing.assert_close(inverse @ rhs, dense_inverse(dense, 0.1) @ rhs)
    assert isinstance(inverse, curvops.CGInverse)


def test_cg_warns_when_it_stops_early_and_refuses_indefinite_operators():
    op = curvops.Dense(_spd_with_spectrum(torch.logspace(0, 4, 30, dtype=DOUBLE)))
    rhs = torch.randn(30, dtype=DOUBLE)
    with pytest.warns(curvops.ConvergenceWarning, match="maxiter"):
        op.inverse(method="cg", maxiter=2) @ rhs
    indefinite = curvops.Dense(torch.diag(torch.tensor([1.0, -1.0], dtype=DOUBLE)))
    with pytest.raises(curvops.NotPositiveDefiniteError, match="damping"):
        indefinite.inverse(method="cg") @ torch.tensor([1.0, 1.0], dtype=DOUBLE)


def test_estimators_refuse_too_few_samples():
    op = curvops.Dense(random_psd(4))
    with pytest.raises(ValueError, match="num_samples"):
        op.trace(method="hutch++", num_samples=2)
    with pytest.raises(ValueError, match="num_samples"):
        op.diagonal(method="hutchinson", num_samples=0)
