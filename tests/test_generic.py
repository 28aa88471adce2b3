"""An operator that only knows its products gets every quantity from the base class."""

import pytest
import torch
from helpers import DOUBLE, dense_inverse, dense_logdet, generator, random_psd

import curvops


class MatrixFree(curvops.CurvatureOperator):
    """Like a Hessian: products only, no structure."""

    def __init__(self, matrix):
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self._matrix = matrix

    def _matmat(self, x):
        return self._matrix @ x


@pytest.fixture
def case():
    matrix = random_psd(37, seed=11)
    return MatrixFree(matrix), matrix


def test_exact_quantities_from_products(case):
    op, matrix = case
    torch.testing.assert_close(op.to_dense(), matrix)
    torch.testing.assert_close(op.diagonal(), matrix.diagonal())
    torch.testing.assert_close(op.trace(), matrix.trace())
    torch.testing.assert_close(op.logdet(0.2), dense_logdet(matrix, 0.2))
    torch.testing.assert_close(op.det(), torch.linalg.det(matrix))
    torch.testing.assert_close(op.inverse(0.2).to_dense(), dense_inverse(matrix, 0.2))


def test_unit_vectors_come_in_bounded_blocks():
    op = MatrixFree(torch.zeros(3000, 3000, dtype=torch.float32))
    blocks = list(op._unit_blocks(3000))
    assert [start for start, _ in blocks] == [0, 1398, 2796]
    assert max(block.numel() for _, block in blocks) <= 2**22
    torch.testing.assert_close(torch.cat([block for _, block in blocks], dim=1), torch.eye(3000))


def test_matrix_free_inverse_by_cg_and_its_own_quantities(case):
    op, matrix = case
    inverse = op.inverse(0.2, method="cg", rtol=1e-12)
    expected = dense_inverse(matrix, 0.2)
    torch.testing.assert_close(inverse.to_dense(), expected)
    torch.testing.assert_close(inverse.diagonal(), expected.diagonal())
    torch.testing.assert_close(inverse.trace(), expected.trace())
    x = torch.randn(37, 3, generator=generator(0), dtype=DOUBLE)
    torch.testing.assert_close(inverse @ x, expected @ x)
    rebuilt = curvops.from_state_dict(curvops.CGInverse(curvops.Dense(matrix), 0.2, rtol=1e-12).state_dict())
    torch.testing.assert_close(rebuilt @ x, expected @ x)


def test_matrix_free_operator_without_a_state_recipe_says_so(case):
    op, _ = case
    with pytest.raises(TypeError, match="cannot be rebuilt from a state dict"):
        curvops.from_state_dict(op.state_dict())
