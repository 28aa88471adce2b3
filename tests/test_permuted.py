"""Permuted(op, perm) = P op P^T against a permutation matrix built here, method by method."""

from unittest import mock

import pytest
import torch
from helpers import DOUBLE, dense_inverse, dense_logdet, generator, kron, random_psd

import curvops

DAMPINGS = [0.0, 0.3]


def permutation_matrix(perm: torch.Tensor) -> torch.Tensor:
    """``P = I[:, perm]``, so that ``P^T x = x[perm]``."""
    return torch.eye(perm.shape[0], dtype=DOUBLE)[:, perm]


def make(seed=0, singular=False):
    g = random_psd(3, rank=1 if singular else None, seed=seed)
    a = random_psd(4, seed=seed + 1)
    perm = torch.randperm(12, generator=generator(seed))
    p = permutation_matrix(perm)
    return curvops.Kronecker(g, a), perm, p @ kron(g, a) @ p.T


def test_the_convention():
    op, perm, matrix = make()
    permuted = curvops.Permuted(op, perm)
    x = torch.randn(12, 3, generator=generator(1), dtype=DOUBLE)
    torch.testing.assert_close((permuted @ x)[perm], op @ x[perm])
    torch.testing.assert_close(permuted.to_dense()[perm][:, perm], op.to_dense())
    inv = torch.argsort(perm)
    torch.testing.assert_close(permuted.to_dense(), op.to_dense()[inv][:, inv])
    torch.testing.assert_close(permuted.to_dense(), matrix)
    assert torch.equal(permuted.permutation, perm) and torch.equal(permuted.inverse_permutation, inv)


def test_products_and_structure_free_quantities():
    op, perm, matrix = make()
    permuted = curvops.Permuted(op, perm)
    x = torch.randn(12, 3, generator=generator(2), dtype=DOUBLE)
    assert permuted.shape == (12, 12) and permuted.dtype == DOUBLE
    torch.testing.assert_close(permuted @ x, matrix @ x)
    torch.testing.assert_close(permuted @ x[:, 0], matrix @ x[:, 0])
    torch.testing.assert_close(permuted.to_dense(), matrix)
    torch.testing.assert_close(permuted.trace(), matrix.trace())
    torch.testing.assert_close(permuted.diagonal(), matrix.diagonal())


@pytest.mark.parametrize("damping", DAMPINGS)
def test_logdet_det_and_inverses(damping):
    op, perm, matrix = make()
    permuted = curvops.Permuted(op, perm)
    torch.testing.assert_close(permuted.logdet(damping), dense_logdet(matrix, damping))
    eye = torch.eye(12, dtype=DOUBLE)
    torch.testing.assert_close(permuted.det(damping), torch.linalg.det(matrix + damping * eye))
    x = torch.randn(12, 2, generator=generator(3), dtype=DOUBLE)
    expected = dense_inverse(matrix, damping)
    inverse = permuted.inverse(damping)
    assert isinstance(inverse, curvops.Permuted) and isinstance(inverse.op, curvops.KroneckerEigen)
    torch.testing.assert_close(inverse @ x, expected @ x)
    torch.testing.assert_close(inverse.to_dense(), expected)
    cg = permuted.inverse(damping, method="cg", rtol=1e-12)
    torch.testing.assert_close(cg @ x, expected @ x)


def test_factored_inverse_is_the_permuted_factored_inverse():
    op, perm, _ = make()
    p = permutation_matrix(perm)
    factored = curvops.Permuted(op, perm).inverse(0.2, factored=True)
    assert isinstance(factored, curvops.Permuted) and isinstance(factored.op, curvops.Kronecker)
    torch.testing.assert_close(factored.to_dense(), p @ op.inverse(0.2, factored=True).to_dense() @ p.T)


def test_quantities_go_through_the_structure():
    op, perm, matrix = make()
    permuted = curvops.Permuted(op, perm)
    with mock.patch.object(curvops.Kronecker, "_to_dense", side_effect=AssertionError("dense used")):
        torch.testing.assert_close(permuted.trace(), matrix.trace())
        torch.testing.assert_close(permuted.diagonal(), matrix.diagonal())
        torch.testing.assert_close(permuted.logdet(0.1), dense_logdet(matrix, 0.1))
        inverse = permuted.inverse(0.1)
    torch.testing.assert_close(inverse.to_dense(), dense_inverse(matrix, 0.1))


def test_singular_operator():
    op, perm, matrix = make(singular=True)
    permuted = curvops.Permuted(op, perm)
    with pytest.warns(curvops.SingularOperatorWarning, match="damping > 0"):
        assert permuted.logdet() == -torch.inf
    with pytest.raises(curvops.SingularOperatorError, match="damping > 0"):
        permuted.inverse()
    torch.testing.assert_close(permuted.logdet(0.1), dense_logdet(matrix, 0.1))


def test_state_dict_round_trip_through_a_file(tmp_path):
    op, perm, matrix = make()
    permuted = curvops.Permuted(op, perm)
    state = permuted.state_dict()
    assert sorted(state["tensors"]) == ["permutation"] and len(state["children"]) == 1
    torch.save(state, tmp_path / "permuted.pt")
    rebuilt = curvops.from_state_dict(torch.load(tmp_path / "permuted.pt", weights_only=True))
    assert type(rebuilt) is curvops.Permuted and type(rebuilt.op) is curvops.Kronecker
    assert torch.equal(rebuilt.permutation, perm)
    torch.testing.assert_close(rebuilt.to_dense(), matrix)
    single = rebuilt.to(dtype=torch.float32)
    assert single.permutation.dtype == torch.int64 and single.dtype == torch.float32
    other = curvops.Permuted(op, torch.randperm(12, generator=generator(9)))
    other.load_state_dict(state)
    torch.testing.assert_close(other.to_dense(), matrix)


def test_nested_permutations_compose_into_one():
    op, p, _ = make()
    q = torch.randperm(12, generator=generator(5))
    nested = curvops.Permuted(curvops.Permuted(op, p), q)
    assert type(nested.op) is curvops.Kronecker and torch.equal(nested.permutation, q[p])
    pp, pq = permutation_matrix(p), permutation_matrix(q)
    expected = pq @ (pp @ op.to_dense() @ pp.T) @ pq.T
    torch.testing.assert_close(nested.to_dense(), expected)
    x = torch.randn(12, 2, generator=generator(6), dtype=DOUBLE)
    torch.testing.assert_close(nested @ x, expected @ x)


def test_kfac_block_on_a_flat_weight_and_bias_vector():
    """A block laid out as vec([W b]) applied to the parameter vector [vec(W), b]."""
    out, inp = 3, 4
    g, a = random_psd(out, seed=1), random_psd(inp + 1, seed=2)
    index = torch.arange(out * inp + out)
    perm = torch.cat([index[: out * inp].reshape(out, inp), index[out * inp :].reshape(out, 1)], 1).flatten()
    w = torch.randn(out, inp, generator=generator(7), dtype=DOUBLE)
    b = torch.randn(out, generator=generator(8), dtype=DOUBLE)
    flat = torch.cat([w.flatten(), b])
    block = curvops.Kronecker(g, a)
    result = g @ torch.cat([w, b[:, None]], 1) @ a.T  # (G ⊗ A) vec([W b]) as a matrix
    expected = torch.cat([result[:, :inp].flatten(), result[:, inp]])
    torch.testing.assert_close(curvops.Permuted(block, perm) @ flat, expected)


def test_matrix_free_defaults_are_kept():
    class MatrixFree(curvops.CurvatureOperator):
        _inverse_method = "cg"
        _logdet_method = "slq"

        def __init__(self, matrix):
            super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
            self.matrix = matrix

        def _matmat(self, x):
            return self.matrix @ x

    matrix = random_psd(5)
    permuted = curvops.Permuted(MatrixFree(matrix), torch.tensor([4, 2, 0, 1, 3]))
    assert isinstance(permuted.inverse(0.1), curvops.CGInverse)
    assert permuted._logdet_method == "slq"
    assert curvops.Permuted(curvops.Dense(matrix), torch.arange(5))._inverse_method == "exact"


def test_permutation_is_validated():
    op = curvops.Dense(random_psd(3))
    for bad in (torch.tensor([0.0, 1.0, 2.0]), torch.tensor([True, False, True])):
        with pytest.raises(ValueError, match="integer permutation"):
            curvops.Permuted(op, bad)
    for bad in (torch.tensor([0, 1]), torch.tensor([[0, 1, 2]]), [0, 1, 2]):
        with pytest.raises(ValueError, match="1-D permutation of length 3"):
            curvops.Permuted(op, bad)
    for bad in (torch.tensor([0, 1, 1]), torch.tensor([0, 1, 3]), torch.tensor([-1, 0, 1])):
        with pytest.raises(ValueError, match=r"each of 0, \.\.\., 2 exactly once"):
            curvops.Permuted(op, bad)
    with pytest.raises(ValueError, match="permutation is on meta but the operator is on cpu"):
        curvops.Permuted(op, torch.arange(3, device="meta"))
    with pytest.raises(TypeError, match="curvops operator"):
        curvops.Permuted(torch.eye(3), torch.arange(3))
    small = curvops.Permuted(op, torch.tensor([2, 0, 1], dtype=torch.int32))
    assert small.permutation.dtype == torch.int64
