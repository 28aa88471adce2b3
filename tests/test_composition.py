"""Composition (sums, scaling, damping, blocks) keeps structure; low-rank updates use Woodbury."""

import math
from unittest import mock

import pytest
import torch
from helpers import DOUBLE, dense_inverse, dense_logdet, generator, kron, random_psd

import curvops


def test_damping_through_identity_uses_the_structure():
    g, a = random_psd(3, rank=1), random_psd(4, seed=1)
    op = curvops.Kronecker(g, a)
    damped = op + 0.2 * curvops.Identity(12)  # float32 identity: only its multiple matters
    assert isinstance(damped, curvops.Sum) and damped.terms == (op,) and damped.shift == 0.2
    with mock.patch.object(curvops.Kronecker, "_to_dense", side_effect=AssertionError("dense used")):
        torch.testing.assert_close(damped.logdet(), dense_logdet(kron(g, a), 0.2))
        torch.testing.assert_close(damped.logdet(0.1), op.logdet(0.3))
        inverse = damped.inverse(0.1)
    assert isinstance(inverse, curvops.KroneckerEigen)
    torch.testing.assert_close(inverse.to_dense(), dense_inverse(kron(g, a), 0.3))
    torch.testing.assert_close(damped.trace(), op.trace() + 0.2 * 12)


def test_negative_shift_falls_back_to_dense():
    op = curvops.Dense(random_psd(4)) - 0.1 * curvops.Identity(4)
    assert op.shift == -0.1
    matrix = random_psd(4) - 0.1 * torch.eye(4, dtype=DOUBLE)
    torch.testing.assert_close(op.logdet(0.05), dense_logdet(matrix, 0.05))
    torch.testing.assert_close(op.inverse(0.05).to_dense(), dense_inverse(matrix, 0.05))


def test_scaling_and_nested_sums_flatten():
    d = curvops.Diagonal(torch.tensor([1.0, 2.0], dtype=DOUBLE))
    scaled = 3.0 * (2.0 * d)
    assert isinstance(scaled, curvops.Scaled) and scaled.op is d and scaled.scale == 6.0
    assert (d / 2).scale == 0.5 and (-d).scale == -1.0
    total = (d + d) + (d + 0.5 * curvops.Identity(2))
    assert len(total.terms) == 3 and total.shift == 0.5
    torch.testing.assert_close(total.to_dense(), torch.diag(torch.tensor([3.5, 6.5], dtype=DOUBLE)))
    torch.testing.assert_close((d - d).to_dense(), torch.zeros(2, 2, dtype=DOUBLE))
    torch.testing.assert_close((torch.tensor(2.0) * d).to_dense(), 2 * d.to_dense())


def test_scaled_logdet_uses_inner_structure_and_negative_scale_is_dense():
    op = curvops.Kronecker(random_psd(2), random_psd(3, seed=1))
    matrix = op.to_dense()
    torch.testing.assert_close((0.5 * op).logdet(0.1), dense_logdet(0.5 * matrix, 0.1))
    negative = -2.0 * op
    torch.testing.assert_close(negative.inverse(0.0).to_dense(), dense_inverse(-2.0 * matrix))
    with pytest.raises(curvops.NotPositiveDefiniteError, match="positive semi-definite"):
        negative.logdet()


def test_identity_only_sum_and_identity_inverse():
    total = curvops.Identity(3, dtype=DOUBLE) + curvops.Identity(3, dtype=DOUBLE)
    torch.testing.assert_close(total.to_dense(), 2 * torch.eye(3, dtype=DOUBLE))
    inverse = curvops.Identity(3, dtype=DOUBLE).inverse(1.0)
    torch.testing.assert_close(inverse.to_dense(), 0.5 * torch.eye(3, dtype=DOUBLE))


def test_block_diagonal_passes_factored_damping_to_its_blocks():
    blocks = [curvops.Kronecker(random_psd(2, seed=i), random_psd(3, seed=i + 5)) for i in range(2)]
    op = curvops.BlockDiagonal([*blocks, curvops.Diagonal(torch.ones(2, dtype=DOUBLE))])
    inverse = op.inverse(0.1, factored=True)
    expected = torch.block_diag(
        *(b.inverse(0.1, factored=True).to_dense() for b in blocks), torch.eye(2, dtype=DOUBLE) / 1.1
    )
    torch.testing.assert_close(inverse.to_dense(), expected)
    assert op.block_sizes == (6, 6, 2)


def test_low_rank_update_inverse_keeps_structure_and_matches_sherman_morrison():
    base = curvops.Kronecker(random_psd(3), random_psd(2, seed=1))
    u = torch.randn(6, generator=generator(0), dtype=DOUBLE)
    op = curvops.LowRankUpdate(base, u)
    inverse = op.inverse(0.3)
    assert isinstance(inverse, curvops.LowRankUpdate) and inverse.sign == -1
    m_inv = dense_inverse(base.to_dense(), 0.3)
    d = torch.randn(6, generator=generator(1), dtype=DOUBLE)
    sherman_morrison = m_inv @ d - (m_inv @ u) * (u @ m_inv @ d) / (1 + u @ m_inv @ u)
    torch.testing.assert_close(inverse @ d, sherman_morrison)
    determinant_lemma = dense_logdet(base.to_dense(), 0.3) + math.log(1 + u @ m_inv @ u)
    torch.testing.assert_close(op.logdet(0.3), determinant_lemma)


def test_removing_a_datum_from_an_empirical_fisher():
    grads = torch.randn(8, 5, generator=generator(2), dtype=DOUBLE)
    fisher = curvops.Dense(grads.T @ grads)
    leave_one_out = curvops.LowRankUpdate(fisher, grads[3], sign=-1)
    rest = torch.cat([grads[:3], grads[4:]])
    torch.testing.assert_close(leave_one_out.to_dense(), rest.T @ rest)
    torch.testing.assert_close(leave_one_out.inverse(1e-2).to_dense(), dense_inverse(rest.T @ rest, 1e-2))
    torch.testing.assert_close(leave_one_out.logdet(1e-2), dense_logdet(rest.T @ rest, 1e-2))


def test_update_that_makes_the_operator_singular():
    null = torch.tensor([1.0, 1.0, 1.0], dtype=DOUBLE) / math.sqrt(3)
    projector = torch.eye(3, dtype=DOUBLE) - torch.outer(null, null)
    op = curvops.LowRankUpdate(curvops.Dense(projector + torch.outer(null, null)), null, sign=-1)
    with pytest.raises(curvops.SingularOperatorError, match="damping"):
        op.inverse()
    with pytest.warns(curvops.SingularOperatorWarning):
        assert op.logdet() == -math.inf
    torch.testing.assert_close(op.inverse(0.5).to_dense(), dense_inverse(projector, 0.5))


def test_update_on_singular_or_indefinite_base_falls_back_to_dense():
    u = torch.tensor([[1.0], [0.0]], dtype=DOUBLE)
    singular_base = curvops.Diagonal(torch.tensor([0.0, 2.0], dtype=DOUBLE))
    op = curvops.LowRankUpdate(singular_base, u)
    torch.testing.assert_close(op.inverse().to_dense(), torch.diag(torch.tensor([1.0, 0.5], dtype=DOUBLE)))
    torch.testing.assert_close(op.logdet(), torch.tensor(math.log(2.0), dtype=DOUBLE))
    indefinite = curvops.LowRankUpdate(curvops.Diagonal(torch.tensor([-0.5, 2.0], dtype=DOUBLE)), u)
    torch.testing.assert_close(indefinite.logdet(), torch.tensor(math.log(1.0), dtype=DOUBLE))
    removal = curvops.LowRankUpdate(curvops.Diagonal(torch.tensor([1.0, 2.0], dtype=DOUBLE)), 2 * u, sign=-1)
    torch.testing.assert_close(
        removal.inverse().to_dense(), torch.diag(torch.tensor([-1 / 3, 0.5], dtype=DOUBLE))
    )
    with pytest.raises(curvops.NotPositiveDefiniteError):
        removal.logdet()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_det_refuses_to_overflow_or_underflow(dtype):
    big = curvops.Diagonal(torch.full((1000,), 1e3, dtype=dtype))
    assert torch.isfinite(big.logdet())
    with pytest.raises(OverflowError, match="use logdet"):
        big.det()
    with pytest.raises(OverflowError, match="use logdet"):
        curvops.Diagonal(torch.full((1000,), 1e-3, dtype=dtype)).det()
    small = curvops.Kronecker(random_psd(3, dtype=dtype), random_psd(2, seed=1, dtype=dtype))
    torch.testing.assert_close(
        small.det(0.1), torch.linalg.det(small.to_dense() + 0.1 * torch.eye(6, dtype=dtype))
    )
