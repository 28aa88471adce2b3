"""Kronecker and KroneckerEigen on random shapes (hypothesis), exact and factored damping."""

import math

import pytest
import torch
from helpers import DOUBLE, dense_inverse, dense_logdet, generator, kron, random_orthogonal, random_psd
from hypothesis import given
from hypothesis import strategies as st

import curvops

sizes = st.lists(st.integers(1, 4), min_size=1, max_size=3)


@given(
    sizes=sizes,
    seed=st.integers(0, 10_000),
    rank_drop=st.integers(0, 2),
    damping=st.sampled_from([0.0, 0.1, 2.0]),
)
def test_kronecker_matches_dense(sizes, seed, rank_drop, damping):
    factors = [random_psd(n, seed=seed + i) for i, n in enumerate(sizes)]
    if rank_drop and sizes[0] > rank_drop:
        factors[0] = random_psd(sizes[0], rank=sizes[0] - rank_drop, seed=seed)
    op, matrix = curvops.Kronecker(*factors), kron(*factors)
    x = torch.randn(matrix.shape[0], 3, generator=generator(seed), dtype=DOUBLE)
    torch.testing.assert_close(op @ x, matrix @ x)
    torch.testing.assert_close(op.trace(), matrix.trace())
    torch.testing.assert_close(op.diagonal(), matrix.diagonal())
    singular = rank_drop and sizes[0] > rank_drop and damping == 0
    if singular:
        with pytest.warns(curvops.SingularOperatorWarning):
            assert op.logdet(damping) == -math.inf
        with pytest.raises(curvops.SingularOperatorError):
            op.inverse(damping)
    else:
        torch.testing.assert_close(op.logdet(damping), dense_logdet(matrix, damping))
        torch.testing.assert_close(op.inverse(damping) @ x, dense_inverse(matrix, damping) @ x)


@given(sizes=sizes, seed=st.integers(0, 10_000), damping=st.sampled_from([0.0, 0.5]))
def test_kronecker_eigen_matches_dense(sizes, seed, damping):
    qs = [random_orthogonal(n, seed + i) for i, n in enumerate(sizes)]
    s = torch.rand(*sizes, generator=generator(seed), dtype=DOUBLE) + 0.1
    op = curvops.KroneckerEigen(qs, s)
    basis = kron(*qs)
    matrix = basis @ torch.diag(s.flatten()) @ basis.T
    x = torch.randn(matrix.shape[0], 2, generator=generator(seed), dtype=DOUBLE)
    torch.testing.assert_close(op @ x, matrix @ x)
    torch.testing.assert_close(op.diagonal(), matrix.diagonal())
    torch.testing.assert_close(op.logdet(damping), dense_logdet(matrix, damping))
    torch.testing.assert_close(op.inverse(damping) @ x, dense_inverse(matrix, damping) @ x)
    flat = curvops.KroneckerEigen(qs, s.flatten())
    torch.testing.assert_close(flat @ x, op @ x)


@pytest.mark.parametrize("damping", [1e-3, 0.5, 10.0])
def test_factored_inverse_is_pi_damping(damping):
    g, a = random_psd(3, seed=1), 5 * random_psd(4, seed=2)
    pi = math.sqrt((a.trace() / 4) / (g.trace() / 3))
    expected = kron(dense_inverse(g, math.sqrt(damping) / pi), dense_inverse(a, pi * math.sqrt(damping)))
    inverse = curvops.Kronecker(g, a).inverse(damping, factored=True)
    assert isinstance(inverse, curvops.Kronecker)
    torch.testing.assert_close(inverse.to_dense(), expected)


def test_factored_inverse_differs_from_exact_and_generalises_to_three_factors():
    factors = [random_psd(n, seed=n) for n in (2, 3, 2)]
    op = curvops.Kronecker(*factors)
    exact, factored = op.inverse(0.5).to_dense(), op.inverse(0.5, factored=True).to_dense()
    assert not torch.allclose(exact, factored)
    means = torch.stack([f.trace() / f.shape[0] for f in factors])
    pis = means / means.prod() ** (1 / 3)
    expected = kron(*(dense_inverse(f, 0.5 ** (1 / 3) * p) for f, p in zip(factors, pis, strict=True)))
    torch.testing.assert_close(factored, expected)
    torch.testing.assert_close(op.inverse(0.0, factored=True).to_dense(), op.inverse(0.0).to_dense())


def test_dense_is_one_factor_kronecker():
    m = random_psd(4)
    assert isinstance(curvops.Dense(m), curvops.Kronecker)
    torch.testing.assert_close(curvops.Dense(m).inverse(0.2, factored=True).to_dense(), dense_inverse(m, 0.2))


def test_singular_factor_logdet_is_minus_inf_not_nan():
    """CE's output-gradient factor diag(p) - pp^T has the null vector 1."""
    p = torch.softmax(torch.randn(5, generator=generator(0), dtype=DOUBLE), 0)
    g = torch.diag(p) - torch.outer(p, p)
    op = curvops.Kronecker(g, random_psd(3))
    with pytest.warns(curvops.SingularOperatorWarning, match="pass damping > 0"):
        value = op.logdet()
    assert value == -math.inf and not torch.isnan(value)
    torch.testing.assert_close(op.logdet(1e-3), dense_logdet(kron(g, random_psd(3)), 1e-3))
    with pytest.raises(curvops.SingularOperatorError, match="pass damping > 0"):
        op.inverse()


def test_eigendecomposition_is_cached_and_float64_for_float32_factors():
    g, a = random_psd(3, dtype=torch.float32), random_psd(2, seed=1, dtype=torch.float32)
    op = curvops.Kronecker(g, a)
    first = op.eigendecompositions()
    again = op.eigendecompositions()
    assert all(e is f and q is r for (e, q), (f, r) in zip(again, first, strict=True))  # cached
    assert first[0][0].dtype == torch.float32
    torch.testing.assert_close(op.logdet(0.1), dense_logdet(kron(g.double(), a.double()), 0.1).float())


def test_zero_trace_factor_has_no_pi_damping():
    op = curvops.Kronecker(torch.zeros(2, 2, dtype=DOUBLE), random_psd(2))
    with pytest.raises(curvops.SingularOperatorError, match="positive trace"):
        op.inverse(0.1, factored=True)
    torch.testing.assert_close(op.inverse(0.1).to_dense(), torch.eye(4, dtype=DOUBLE) / 0.1)


def test_damping_below_the_rounding_tolerance_is_still_exact():
    """float32, n = 64: eps·n·max|e| ≈ 1e-5·max, yet damping 1e-6·max is a valid damping."""
    g = random_psd(64, rank=60, seed=3)
    a = random_psd(64, seed=4)
    op = curvops.Kronecker(g.float(), a.float())
    damping = 1e-6 * op.eigenvalues().max().item()
    x = torch.randn(64 * 64, dtype=torch.float64, generator=generator(0))
    expected = dense_inverse(kron(g, a), damping) @ x
    result = (op.inverse(damping) @ x.float()).double()
    assert (result - expected).norm() / expected.norm() < 1e-3
    torch.testing.assert_close(
        op.logdet(damping).double(), dense_logdet(kron(g, a), damping), rtol=1e-4, atol=0
    )
    with pytest.warns(curvops.SingularOperatorWarning):
        assert op.logdet() == -math.inf
