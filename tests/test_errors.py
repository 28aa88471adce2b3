"""Bad input gets a clear error, never a silent wrong answer."""

import io

import numpy as np
import pytest
import torch
from helpers import DOUBLE, random_orthogonal, random_psd

import curvops


@pytest.fixture
def op():
    return curvops.Kronecker(random_psd(2), random_psd(3, seed=1))


def test_wrong_vector_length(op):
    with pytest.raises(ValueError, match=r"shape \[6\] or \[6, K\], got \[5\]"):
        op @ torch.ones(5, dtype=DOUBLE)
    with pytest.raises(ValueError, match="got \\[6, 2, 1\\]"):
        op @ torch.ones(6, 2, 1, dtype=DOUBLE)
    with pytest.raises(ValueError, match="got \\[5, 2\\]"):
        op.matmat(np.ones((5, 2)))


def test_wrong_device_and_dtype(op):
    with pytest.raises(ValueError, match="is on meta but the operator is on cpu"):
        op @ torch.ones(6, dtype=DOUBLE, device="meta")
    with pytest.raises(TypeError, match=r"dtype torch\.float32 but the operator has dtype torch\.float64"):
        op @ torch.ones(6)
    with pytest.raises(TypeError, match=r"torch\.Tensor or numpy\.ndarray"):
        op.matmat([1.0] * 6)
    with pytest.raises(TypeError):
        op @ [1.0] * 6


@pytest.mark.parametrize("damping", [-1e-3, float("nan"), float("inf"), "0.1"])
def test_bad_damping(op, damping):
    for call in (op.logdet, op.det, op.inverse):
        with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
            call(damping)


def test_unknown_methods(op):
    with pytest.raises(ValueError, match="Unknown trace method 'exactly'"):
        op.trace(method="exactly")
    with pytest.raises(ValueError, match="Unknown logdet method"):
        op.logdet(method="cg")
    with pytest.raises(ValueError, match="Unknown inverse method"):
        op.inverse(method="slq")
    with pytest.raises(ValueError, match="Unknown diagonal method"):
        op.diagonal(method="lanczos")


def test_nan_or_inf_in_factors():
    bad = random_psd(3)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="Kronecker factor 1 contains NaN or inf"):
        curvops.Kronecker(random_psd(2), bad)
    with pytest.raises(ValueError, match="Dense factor 0 contains NaN"):
        curvops.Dense(bad)
    with pytest.raises(ValueError, match="Diagonal entries contain NaN or inf"):
        curvops.Diagonal(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="eigenvalues contain NaN or inf"):
        curvops.KroneckerEigen([torch.eye(2)], torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="factors contain NaN or inf"):
        curvops.LowRankUpdate(curvops.Identity(2), torch.tensor([1.0, float("nan")]))


def test_malformed_factors():
    with pytest.raises(ValueError, match="not symmetric"):
        curvops.Kronecker(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        curvops.Kronecker(torch.ones(2, 3))
    with pytest.raises(TypeError, match="floating point"):
        curvops.Dense(torch.eye(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one factor"):
        curvops.Kronecker()
    with pytest.raises(ValueError, match="one dtype and device"):
        curvops.Kronecker(torch.eye(2), torch.eye(2, dtype=DOUBLE))
    with pytest.raises(ValueError, match="not orthonormal"):
        curvops.KroneckerEigen([torch.ones(2, 2)], torch.ones(2))
    with pytest.raises(ValueError, match=r"shape \[2, 3\] or \[6\]"):
        curvops.KroneckerEigen([torch.eye(2), torch.eye(3)], torch.ones(5))
    with pytest.raises(ValueError, match="1-D floating-point"):
        curvops.Diagonal(torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"shape \[2, k\]"):
        curvops.LowRankUpdate(curvops.Identity(2), torch.ones(3, 1))
    with pytest.raises(ValueError, match="must match the base"):
        curvops.LowRankUpdate(curvops.Identity(2), torch.ones(2, 1, dtype=DOUBLE))
    with pytest.raises(ValueError, match="sign must be"):
        curvops.LowRankUpdate(curvops.Identity(2), torch.ones(2, 1), sign=2)


def test_mismatched_compositions():
    with pytest.raises(ValueError, match="one shape"):
        curvops.Identity(2) + curvops.Diagonal(torch.ones(3))
    with pytest.raises(ValueError, match="one dtype and device"):
        curvops.Diagonal(torch.ones(2)) + curvops.Diagonal(torch.ones(2, dtype=DOUBLE))
    with pytest.raises(ValueError, match="one dtype and device"):
        curvops.BlockDiagonal(
            [curvops.Diagonal(torch.ones(2)), curvops.Diagonal(torch.ones(2, dtype=DOUBLE))]
        )
    with pytest.raises(TypeError, match="curvops operators"):
        curvops.BlockDiagonal([torch.eye(2)])
    with pytest.raises(ValueError, match="finite scale"):
        curvops.Scaled(curvops.Identity(2), float("inf"))
    with pytest.raises(TypeError):
        curvops.Identity(2) + 1.0


def test_not_positive_definite_logdet():
    op = curvops.Diagonal(torch.tensor([1.0, -2.0], dtype=DOUBLE))
    with pytest.raises(curvops.NotPositiveDefiniteError, match=r"-2\.000e\+00"):
        op.logdet()
    assert torch.isfinite(op.logdet(damping=3.0))


def _saved(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_of_another_type(op):
    with pytest.raises(curvops.StateDictError, match="type 'Dense' but the operator has 'Kronecker'"):
        op.load_state_dict(_saved(curvops.Dense(random_psd(6)).state_dict()))


def test_state_dict_of_another_shape(op):
    other = curvops.Kronecker(random_psd(3), random_psd(2))
    with pytest.raises(curvops.StateDictError, match=r"tensors\['factor0'\]: state dict has shape \[3, 3\]"):
        op.load_state_dict(other.state_dict())
    nested = curvops.BlockDiagonal([op, curvops.Diagonal(torch.ones(2, dtype=DOUBLE))])
    state = curvops.BlockDiagonal([op, curvops.Diagonal(torch.ones(3, dtype=DOUBLE))]).state_dict()
    with pytest.raises(
        curvops.StateDictError,
        match=r"BlockDiagonal.children\[1\].tensors\['diagonal'\]: state dict has shape \[3\], the operator "
        r"has \[2\]",
    ):
        nested.load_state_dict(state)
    state = nested.state_dict()
    state["shape"] = [9, 9]
    with pytest.raises(curvops.StateDictError, match=r"BlockDiagonal: state dict has shape \[9, 9\]"):
        nested.load_state_dict(state)


def test_state_dict_of_another_dtype_or_structure(op):
    with pytest.raises(curvops.StateDictError, match="dtype 'float32' but the operator has 'float64'"):
        op.load_state_dict(op.to(dtype=torch.float32).state_dict())
    with pytest.raises(curvops.StateDictError, match="not a curvops operator state dict"):
        op.load_state_dict({"factor0": torch.eye(2)})
    total = op + op
    with pytest.raises(curvops.StateDictError, match="3 sub-operators, the operator has 2"):
        total.load_state_dict((op + op + op).state_dict())
    state = op.state_dict()
    state["type"] = "Mystery"
    with pytest.raises(curvops.StateDictError, match="Unknown operator type 'Mystery'"):
        curvops.from_state_dict(state)


def test_state_dict_with_nan_is_refused(op):
    state = op.state_dict()
    state["tensors"]["factor1"] = torch.full((3, 3), float("nan"), dtype=DOUBLE)
    with pytest.raises(ValueError, match="NaN"):
        op.load_state_dict(state)


def test_load_keeps_the_device_and_replaces_the_contents(op):
    other = curvops.Kronecker(2 * random_psd(2), random_psd(3, seed=1))
    other_eigen = other.eigendecompositions()
    op.eigendecompositions()
    op.load_state_dict(other.state_dict())
    torch.testing.assert_close(op.to_dense(), other.to_dense())
    torch.testing.assert_close(op.eigendecompositions()[0][0], other_eigen[0][0])


def test_kronecker_eigen_accepts_nearly_orthonormal_float32():
    q = random_orthogonal(50, dtype=torch.float32)
    curvops.KroneckerEigen([q], torch.ones(50))


def test_user_subclass_does_not_shadow_a_built_in_operator():
    class Dense(curvops.Diagonal):
        pass

    mine = Dense(torch.ones(2))
    assert mine.state_dict()["type"].endswith(
        "test_user_subclass_does_not_shadow_a_built_in_operator.<locals>.Dense"
    )
    rebuilt = curvops.from_state_dict(curvops.Dense(torch.eye(2)).state_dict())
    assert type(rebuilt) is curvops.Dense
    assert type(curvops.from_state_dict(mine.state_dict())) is Dense


def test_block_labels():
    blocks = [curvops.Diagonal(torch.ones(2)), curvops.Diagonal(torch.ones(3))]
    op = curvops.BlockDiagonal(blocks, labels=["a", "b"])
    assert op.block("b") is blocks[1]
    with pytest.raises(KeyError, match="No block labelled 'c'"):
        op.block("c")
    with pytest.raises(ValueError, match="2 distinct labels"):
        curvops.BlockDiagonal(blocks, labels=["a", "a"])
    other = curvops.BlockDiagonal(
        [curvops.Diagonal(torch.ones(2)), curvops.Diagonal(torch.ones(4))], ["a", "b"]
    )
    with pytest.raises(
        curvops.StateDictError, match=r"children\['b'\].tensors\['diagonal'\]: state dict has shape \[4\]"
    ):
        op.load_state_dict(other.state_dict())
    rebuilt = curvops.from_state_dict(op.state_dict())
    assert rebuilt.labels == ("a", "b") and op.inverse(1.0).labels == ("a", "b")
