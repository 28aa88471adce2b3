"""Every method of every structured operator against the same quantity from the dense matrix."""

import io

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from helpers import DOUBLE, dense_inverse, dense_logdet, generator, kron, random_orthogonal, random_psd

import curvops


def _dense(seed, device):
    m = random_psd(5, seed=seed, device=device)
    return curvops.Dense(m), m


def _dense_singular(seed, device):
    m = random_psd(5, rank=2, seed=seed, device=device)
    return curvops.Dense(m), m


def _diagonal(seed, device):
    d = torch.rand(6, generator=generator(seed), dtype=DOUBLE).to(device) + 0.1
    return curvops.Diagonal(d), torch.diag(d)


def _identity(seed, device):
    return curvops.Identity(4, dtype=DOUBLE, device=device), torch.eye(4, dtype=DOUBLE, device=device)


def _kronecker(seed, device):
    g, a = random_psd(3, seed=seed, device=device), random_psd(4, seed=seed + 1, device=device)
    return curvops.Kronecker(g, a), kron(g, a)


def _kronecker3(seed, device):
    fs = [random_psd(n, seed=seed + n, device=device) for n in (2, 3, 2)]
    return curvops.Kronecker(*fs), kron(*fs)


def _kronecker_singular(seed, device):
    g, a = random_psd(3, rank=1, seed=seed, device=device), random_psd(4, seed=seed + 1, device=device)
    return curvops.Kronecker(g, a), kron(g, a)


def _kronecker_with_diagonal_factor(seed, device):
    g, a = random_psd(3, seed=seed, device=device), random_psd(2, seed=seed + 1, device=device)
    d = torch.rand(4, generator=generator(seed), dtype=DOUBLE).to(device) + 0.1
    return curvops.Kronecker(g, d, a), kron(g, torch.diag(d), a)


def _kronecker_eigen(seed, device):
    qs = [random_orthogonal(n, seed + n).to(device) for n in (3, 2)]
    s = torch.rand(3, 2, generator=generator(seed), dtype=DOUBLE).to(device) + 0.2
    basis = kron(*qs)
    return curvops.KroneckerEigen(qs, s), basis @ torch.diag(s.flatten()) @ basis.T


def _permuted(seed, device):
    op, m = _kronecker_with_diagonal_factor(seed, device)
    perm = torch.randperm(m.shape[0], generator=generator(seed)).to(device)
    p = torch.eye(m.shape[0], dtype=DOUBLE, device=device)[:, perm]  # P^T x = x[perm]
    return curvops.Permuted(op, perm), p @ m @ p.T


def _block_diagonal(seed, device):
    parts = [_kronecker(seed, device), _diagonal(seed, device), _dense(seed, device)]
    return curvops.BlockDiagonal([p[0] for p in parts]), torch.block_diag(*(p[1] for p in parts))


def _scaled(seed, device):
    op, m = _kronecker(seed, device)
    return 2.5 * op, 2.5 * m


def _sum(seed, device):
    (k, mk), (d, md) = _kronecker3(seed, device), _dense(seed, device)
    d = curvops.Dense(torch.nn.functional.pad(md, (0, 7, 0, 7)))
    return k + d, mk + d.matrix


def _damped(seed, device):
    op, m = _kronecker_singular(seed, device)
    return op + 0.3 * curvops.Identity(op.shape[0], dtype=DOUBLE), m + 0.3 * torch.eye(
        12, dtype=DOUBLE, device=device
    )


def _low_rank_add(seed, device):
    op, m = _kronecker(seed, device)
    u = torch.randn(12, 2, generator=generator(seed), dtype=DOUBLE).to(device)
    return curvops.LowRankUpdate(op, u), m + u @ u.T


def _low_rank_remove(seed, device):
    m = random_psd(6, seed=seed, device=device)
    u = torch.randn(6, 1, generator=generator(seed), dtype=DOUBLE).to(device)
    return curvops.LowRankUpdate(curvops.Dense(m + u @ u.T), u, sign=-1), m


FACTORIES = {
    f.__name__.lstrip("_"): f
    for f in [
        _dense,
        _dense_singular,
        _diagonal,
        _identity,
        _kronecker,
        _kronecker3,
        _kronecker_singular,
        _kronecker_with_diagonal_factor,
        _kronecker_eigen,
        _permuted,
        _block_diagonal,
        _scaled,
        _sum,
        _damped,
        _low_rank_add,
        _low_rank_remove,
    ]
}
DAMPINGS = [0.0, 0.37]


@pytest.fixture(params=sorted(FACTORIES))
def case(request, device):
    op, matrix = FACTORIES[request.param](seed=len(request.param), device=device)
    eigenvalues = torch.linalg.eigvalsh(matrix)
    singular = bool(eigenvalues.min() <= 1e-10 * eigenvalues.max())
    return op, matrix, singular


def test_products(case):
    op, matrix, _ = case
    x = torch.randn(matrix.shape[0], 3, dtype=DOUBLE, device=matrix.device)
    assert op.shape == matrix.shape and op.dtype == DOUBLE and op.device == matrix.device
    torch.testing.assert_close(op @ x, matrix @ x)
    torch.testing.assert_close(op @ x[:, 0], matrix @ x[:, 0])
    torch.testing.assert_close(op.matvec(x[:, 0]), matrix @ x[:, 0])


def test_to_dense_trace_diagonal(case):
    op, matrix, _ = case
    torch.testing.assert_close(op.to_dense(), matrix)
    torch.testing.assert_close(op.trace(), matrix.trace())
    torch.testing.assert_close(op.diagonal(), matrix.diagonal())


@pytest.mark.parametrize("damping", DAMPINGS)
def test_logdet_and_det(case, damping):
    op, matrix, singular = case
    if singular and damping == 0:
        with pytest.warns(curvops.SingularOperatorWarning, match="damping"):
            assert op.logdet() == -torch.inf
        with pytest.warns(curvops.SingularOperatorWarning):
            assert op.det() == 0
        return
    torch.testing.assert_close(op.logdet(damping), dense_logdet(matrix, damping))
    eye = torch.eye(matrix.shape[0], dtype=DOUBLE, device=matrix.device)
    torch.testing.assert_close(op.det(damping), torch.linalg.det(matrix + damping * eye))


@pytest.mark.parametrize("damping", DAMPINGS)
def test_inverse(case, damping):
    op, matrix, singular = case
    if singular and damping == 0:
        with pytest.raises(curvops.SingularOperatorError, match="damping > 0"):
            op.inverse()
        return
    inverse = op.inverse(damping)
    expected = dense_inverse(matrix, damping)
    x = torch.randn(matrix.shape[0], 2, dtype=DOUBLE, device=matrix.device)
    torch.testing.assert_close(inverse @ x, expected @ x)
    torch.testing.assert_close(inverse.to_dense(), expected)
    torch.testing.assert_close(inverse.trace(), expected.trace())
    torch.testing.assert_close(inverse.logdet(), -dense_logdet(matrix, damping))
    cg = op.inverse(damping, method="cg", rtol=1e-12)
    torch.testing.assert_close(cg @ x, expected @ x)


def test_state_dict_round_trip_through_a_file(case):
    op, matrix, _ = case
    buffer = io.BytesIO()
    torch.save(op.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    rebuilt = curvops.from_state_dict(state)
    assert type(rebuilt) is type(op) and rebuilt.device == op.device
    x = torch.randn(matrix.shape[0], 2, dtype=DOUBLE, device=matrix.device)
    torch.testing.assert_close(rebuilt @ x, op @ x)
    blank = curvops.from_state_dict(state)
    blank.load_state_dict(state)
    torch.testing.assert_close(blank @ x, op @ x)


def test_numpy_and_scipy(case):
    op, matrix, _ = case
    x = np.random.default_rng(0).standard_normal((matrix.shape[0], 2))
    expected = matrix.cpu().numpy() @ x
    np.testing.assert_allclose(op.matmat(x), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(op @ x, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(op.matvec(x[:, 0]), expected[:, 0], rtol=1e-10, atol=1e-12)
    linear = op.to_scipy()
    assert linear.shape == op.shape and linear.dtype == np.float64
    k = min(2, matrix.shape[0] - 1)
    top = scipy.sparse.linalg.eigsh(linear, k=k, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), torch.linalg.eigvalsh(matrix).cpu().numpy()[-k:], rtol=1e-8)
    b = x[:, 0]
    shifted = scipy.sparse.linalg.aslinearoperator(linear) + scipy.sparse.linalg.aslinearoperator(
        np.eye(matrix.shape[0])
    )
    solution, info = scipy.sparse.linalg.cg(shifted, b, rtol=1e-12)
    assert info == 0
    np.testing.assert_allclose(solution, dense_inverse(matrix, 1.0).cpu().numpy() @ b, rtol=1e-7, atol=1e-9)


def test_to_moves_dtype(case):
    op, matrix, _ = case
    single = op.to(dtype=torch.float32)
    assert single.dtype == torch.float32 and single.device == op.device
    x = torch.randn(matrix.shape[0], dtype=torch.float32, device=matrix.device)
    torch.testing.assert_close(single @ x, matrix.float() @ x, rtol=1e-4, atol=1e-5)
