"""Kronecker with 1-D (diagonal) factors, mixed with dense ones, against dense ground truth."""

import math
from unittest import mock

import pytest
import torch
from helpers import DOUBLE, dense_inverse, dense_logdet, generator, kron, random_psd

import curvops


def positive(n, seed):
    return torch.rand(n, generator=generator(seed), dtype=DOUBLE) + 0.2


# each case: the factors' kinds ("dense" [n, n] or "diagonal" [n]) and sizes
CASES = {
    "dense-diagonal": [("dense", 3), ("diagonal", 4)],
    "diagonal-dense": [("diagonal", 4), ("dense", 3)],
    "dense-diagonal-dense": [("dense", 2), ("diagonal", 3), ("dense", 2)],
    "all-diagonal": [("diagonal", 3), ("diagonal", 2)],
}
DAMPINGS = [0.0, 0.3]


def make(name, seed=0, zero_entry=False):
    """The operator, its factors as given, and the dense ground truth."""
    factors = [
        random_psd(n, seed=seed + i) if kind == "dense" else positive(n, seed + i)
        for i, (kind, n) in enumerate(CASES[name])
    ]
    if zero_entry:
        first = next(i for i, f in enumerate(factors) if f.ndim == 1)
        factors[first] = factors[first].clone()
        factors[first][1] = 0.0
    matrix = kron(*(torch.diag(f) if f.ndim == 1 else f for f in factors))
    return curvops.Kronecker(*factors), factors, matrix


@pytest.fixture(params=sorted(CASES))
def name(request):
    return request.param


def test_products_to_dense_trace_diagonal(name):
    op, _, matrix = make(name)
    x = torch.randn(matrix.shape[0], 3, generator=generator(1), dtype=DOUBLE)
    torch.testing.assert_close(op @ x, matrix @ x)
    torch.testing.assert_close(op @ x[:, 0], matrix @ x[:, 0])
    torch.testing.assert_close(op.to_dense(), matrix)
    torch.testing.assert_close(op.trace(), matrix.trace())
    torch.testing.assert_close(op.diagonal(), matrix.diagonal())


def test_eigendecompositions(name):
    op, factors, matrix = make(name)
    for factor, (e, q) in zip(factors, op.eigendecompositions(), strict=True):
        if factor.ndim == 1:
            assert q is None and torch.equal(e, factor)
        else:
            torch.testing.assert_close((q * e) @ q.T, factor)
    torch.testing.assert_close(op.eigenvalues().flatten().sort().values, torch.linalg.eigvalsh(matrix))


@pytest.mark.parametrize("damping", DAMPINGS)
def test_logdet_det_and_inverses(name, damping):
    op, factors, matrix = make(name)
    torch.testing.assert_close(op.logdet(damping), dense_logdet(matrix, damping))
    eye = torch.eye(matrix.shape[0], dtype=DOUBLE)
    torch.testing.assert_close(op.det(damping), torch.linalg.det(matrix + damping * eye))
    expected = dense_inverse(matrix, damping)
    x = torch.randn(matrix.shape[0], 2, generator=generator(2), dtype=DOUBLE)
    inverse = op.inverse(damping)
    assert isinstance(inverse, curvops.KroneckerEigen)
    assert [q is None for q in inverse.eigenvectors] == [f.ndim == 1 for f in factors]
    torch.testing.assert_close(inverse @ x, expected @ x)
    torch.testing.assert_close(inverse.to_dense(), expected)
    torch.testing.assert_close(inverse.diagonal(), expected.diagonal())
    torch.testing.assert_close(inverse.trace(), expected.trace())
    torch.testing.assert_close(inverse.logdet(), -dense_logdet(matrix, damping))
    cg = op.inverse(damping, method="cg", rtol=1e-12)
    torch.testing.assert_close(cg @ x, expected @ x)


@pytest.mark.parametrize("damping", [0.05, 2.0])
def test_factored_inverse_keeps_diagonal_factors_diagonal(name, damping):
    op, factors, _ = make(name)
    means = torch.stack([(f if f.ndim == 1 else f.diagonal()).mean() for f in factors])
    pis = means / means.prod() ** (1 / len(factors))
    strength = damping ** (1 / len(factors))
    expected = kron(
        *(
            torch.diag(1 / (f + strength * pi)) if f.ndim == 1 else dense_inverse(f, strength * pi)
            for f, pi in zip(factors, pis, strict=True)
        )
    )
    factored = op.inverse(damping, factored=True)
    assert isinstance(factored, curvops.Kronecker)
    assert [f.ndim for f in factored.factors] == [f.ndim for f in factors]
    torch.testing.assert_close(factored.to_dense(), expected)


def test_two_factor_pi_damping_with_a_diagonal_input_factor():
    g, d = random_psd(3, seed=1), 5 * positive(4, 2)
    pi = math.sqrt((d.mean()) / (g.trace() / 3))
    expected = kron(dense_inverse(g, math.sqrt(0.1) / pi), torch.diag(1 / (d + pi * math.sqrt(0.1))))
    torch.testing.assert_close(curvops.Kronecker(g, d).inverse(0.1, factored=True).to_dense(), expected)


def test_state_dicts_round_trip_through_a_file(name, tmp_path):
    op, factors, matrix = make(name)
    for i, operator in enumerate([op, op.inverse(0.3), op.inverse(0.3, factored=True)]):
        path = tmp_path / f"op{i}.pt"
        torch.save(operator.state_dict(), path)
        state = torch.load(path, weights_only=True)
        rebuilt = curvops.from_state_dict(state)
        assert type(rebuilt) is type(operator)
        torch.testing.assert_close(rebuilt.to_dense(), operator.to_dense())
        operator.load_state_dict(state)
    assert [f.ndim for f in curvops.from_state_dict(op.state_dict()).factors] == [f.ndim for f in factors]
    inverse = curvops.from_state_dict(op.inverse(0.3).state_dict())
    assert [q is None for q in inverse.eigenvectors] == [f.ndim == 1 for f in factors]
    torch.testing.assert_close(inverse.to_dense(), dense_inverse(matrix, 0.3))


def test_a_dense_state_dict_does_not_load_into_a_diagonal_factor():
    op, _, _ = make("dense-diagonal")
    other = curvops.Kronecker(random_psd(3), random_psd(4))
    with pytest.raises(curvops.StateDictError, match=r"tensors\['factor1'\]: state dict has shape \[4, 4\]"):
        op.load_state_dict(other.state_dict())


def test_singular_diagonal_factor(name):
    op, _, matrix = make(name, zero_entry=True)
    with pytest.warns(curvops.SingularOperatorWarning, match="damping > 0"):
        assert op.logdet() == -math.inf
    with pytest.warns(curvops.SingularOperatorWarning):
        assert op.det() == 0
    with pytest.raises(curvops.SingularOperatorError, match="damping > 0"):
        op.inverse()
    torch.testing.assert_close(op.logdet(0.1), dense_logdet(matrix, 0.1))
    torch.testing.assert_close(op.inverse(0.1).to_dense(), dense_inverse(matrix, 0.1))


def test_small_diagonal_entries_are_exact_not_rounding_noise():
    """float32: eps·n·max ≈ 4e-7 of the largest eigenvalue, yet 1e-7 · (G's eigenvalues) are real."""
    g = random_psd(3, seed=4)
    d = torch.tensor([1.0, 1e-7, 0.5], dtype=DOUBLE)
    op = curvops.Kronecker(g.float(), d.float())
    matrix = kron(g, torch.diag(d))
    torch.testing.assert_close(op.logdet().double(), dense_logdet(matrix), rtol=1e-5, atol=1e-4)
    x = torch.randn(9, dtype=DOUBLE, generator=generator(3))
    expected = dense_inverse(matrix) @ x
    result = (op.inverse() @ x.float()).double()
    assert (result - expected).norm() / expected.norm() < 1e-4


def test_a_large_diagonal_factor_is_never_materialised():
    """An Embedding's input factor: 50_000 x 50_000 would be 20 GB in float64."""
    n = 50_000
    g, d = random_psd(3, seed=5), positive(n, 6)
    d[::7] = 0.0  # tokens that never occur
    op = curvops.Kronecker(g, d)
    x = torch.randn(3 * n, 2, dtype=DOUBLE, generator=generator(4))
    eye, diag = torch.eye, torch.diag

    def small_eye(size, *args, **kwargs):
        assert size < n, "an n x n identity was built"
        return eye(size, *args, **kwargs)

    def small_diag(vector, *args, **kwargs):
        assert vector.shape[0] < n, "an n x n diagonal matrix was built"
        return diag(vector, *args, **kwargs)

    def apply(g, d, x):
        """(G ⊗ diag(d)) x, independently of curvops."""
        return torch.einsum("ij,jnk,n->ink", g, x.reshape(3, n, 2), d).reshape(3 * n, 2)

    with mock.patch("torch.eye", small_eye), mock.patch("torch.diag", small_diag):
        torch.testing.assert_close(op @ x, apply(g, d, x))
        torch.testing.assert_close(op.trace(), g.trace() * d.sum())
        torch.testing.assert_close(op.diagonal(), torch.outer(g.diagonal(), d).flatten())
        e_g = torch.linalg.eigvalsh(g)
        torch.testing.assert_close(op.logdet(0.1), torch.log(torch.outer(e_g, d) + 0.1).sum())
        y = op.inverse(0.1) @ x
        factored = op.inverse(0.1, factored=True)
        pi = math.sqrt(d.mean() / (g.trace() / 3))
        g_inverse = dense_inverse(g, math.sqrt(0.1) / pi)
        assert factored.factors[1].shape == (n,)
        torch.testing.assert_close(factored @ x, apply(g_inverse, 1 / (d + pi * math.sqrt(0.1)), x))
    torch.testing.assert_close(apply(g, d, y) + 0.1 * y, x)  # (op + 0.1 I) y = x


def test_kronecker_eigen_with_identity_eigenvectors():
    q = torch.linalg.qr(torch.randn(3, 3, generator=generator(0), dtype=DOUBLE))[0]
    s = positive(6, 1).reshape(3, 2)
    op = curvops.KroneckerEigen([q, None], s)
    assert op.sizes == (3, 2)
    matrix = (
        kron(q, torch.eye(2, dtype=DOUBLE)) @ torch.diag(s.flatten()) @ kron(q, torch.eye(2, dtype=DOUBLE)).T
    )
    torch.testing.assert_close(op.to_dense(), matrix)
    torch.testing.assert_close(op.diagonal(), matrix.diagonal())
    torch.testing.assert_close(op @ torch.ones(6, dtype=DOUBLE), matrix @ torch.ones(6, dtype=DOUBLE))
    assert sorted(op.state_dict()["tensors"]) == ["eigenvalues", "eigenvectors0"]
    with pytest.raises(ValueError, match=r"one axis per factor, \[n_1, \.\.\., n_2\], got \[6\]"):
        curvops.KroneckerEigen([q, None], s.flatten())
    with pytest.raises(ValueError, match=r"to match the eigenvectors, got \[2, 3\]"):
        curvops.KroneckerEigen([q, None], s.T)


def test_diagonal_factors_are_validated():
    with pytest.raises(ValueError, match="Kronecker factor 1 contains NaN or inf"):
        curvops.Kronecker(random_psd(2), torch.tensor([1.0, float("nan")], dtype=DOUBLE))
    with pytest.raises(TypeError, match="Kronecker factor 0 must be floating point"):
        curvops.Kronecker(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"square \[n, n\] tensor or a 1-D \[n\] diagonal, got \[2, 2, 2\]"):
        curvops.Kronecker(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="one dtype and device"):
        curvops.Kronecker(random_psd(2), torch.ones(2))
    with pytest.raises(ValueError, match="use Diagonal"):
        curvops.Dense(torch.ones(3))
