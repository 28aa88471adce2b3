"""Numerics (issue 11, items 10-15): low-precision models, ill-conditioned spectra, dtype
conversions, the memory budget for dense results, CG on singular operators, strict types.

Every expected value is a float64 ground truth from torch.linalg or a float64 model."""

import copy
import math

import numpy as np
import pytest
import torch

import curvops
from curvops.linalg import Cast, memory_budget, set_memory_budget
from tests.helpers import DOUBLE, dense_inverse, generator, random_orthogonal, random_psd


def _relative(x: torch.Tensor, truth: torch.Tensor) -> float:
    return ((x.double() - truth).norm() / truth.norm()).item()


def _mlp_and_data(dtype: torch.dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x, y = torch.randn(64, 5, dtype=DOUBLE), torch.randint(0, 3, (64,))
    return copy.deepcopy(model).to(dtype), [(x.to(dtype), y)]


# ----------------------------------------------------------------- item 10: bf16 / fp16 models
@pytest.mark.parametrize("build", [curvops.KFAC, curvops.EKFAC])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_kronecker_inverse_matches_float64(build, dtype):
    """Statistics in float32, eigh in float64, products in the model's dtype: within 5% of float64."""
    loss = torch.nn.CrossEntropyLoss()
    reference = build(*_mlp_and_data(DOUBLE)[:1], loss, _mlp_and_data(DOUBLE)[1], fisher_type="type-2")
    model, data = _mlp_and_data(dtype)
    op = build(model, loss, data, fisher_type="type-2")
    v = torch.randn(op.shape[0], dtype=DOUBLE, generator=generator(1))
    for damping in (1e-3, 1e-2):
        truth = reference.inverse(damping) @ v
        result = op.inverse(damping) @ v.to(dtype)
        assert result.dtype == dtype and op.dtype == dtype
        assert _relative(result, truth) < 0.05
    assert (op @ v.to(dtype)).dtype == dtype
    block = op.block("0.weight")
    assert isinstance(block, Cast) and block.op.dtype == torch.float32  # the statistics' dtype


def test_cast_goes_through_structure_and_keeps_the_dtype():
    inner = curvops.Kronecker(random_psd(3).float(), random_psd(2, seed=1).float())
    op = Cast(inner, torch.bfloat16)
    truth = dense_inverse(inner.to_dense().double(), 0.1)
    inverse = op.inverse(0.1)
    assert isinstance(inverse, Cast) and isinstance(inverse.op, curvops.KroneckerEigen)
    assert inverse.to_dense().dtype == torch.bfloat16
    torch.testing.assert_close(inverse.to_dense().double(), truth, rtol=2e-2, atol=2e-2 * truth.abs().max())
    assert op.logdet(0.1).dtype == torch.bfloat16
    restored = curvops.from_state_dict(op.state_dict())
    assert (
        isinstance(restored, Cast) and restored.dtype == torch.bfloat16 and restored.op.dtype == torch.float32
    )


# ------------------------------------------------- item 11: the same matrix, the same answer
LOGSPACE = torch.logspace(0, -12, 8, dtype=DOUBLE)


def _logspace_operators():
    d = LOGSPACE.float()
    a, b = torch.logspace(0, -8, 4, dtype=DOUBLE), torch.logspace(0, -4, 2, dtype=DOUBLE)
    return {
        "Dense": (curvops.Dense(torch.diag(d)), LOGSPACE),
        "Diagonal": (curvops.Diagonal(d), LOGSPACE),
        "KroneckerEigen": (curvops.KroneckerEigen([torch.eye(8)], d), LOGSPACE),
        "Kronecker": (
            curvops.Kronecker(torch.diag(a.float()), torch.diag(b.float())),
            torch.kron(a, b),
        ),
        "Kronecker, a 1-D factor": (
            curvops.Kronecker(torch.diag(a.float()), b.float()),
            torch.kron(a, b),
        ),
        "BlockDiagonal": (
            curvops.BlockDiagonal([curvops.Dense(torch.diag(d[:4])), curvops.Dense(torch.diag(d[4:]))]),
            LOGSPACE,
        ),
    }


@pytest.mark.parametrize("name", list(_logspace_operators()))
def test_an_ill_conditioned_diagonal_matrix_gives_the_exact_answer_in_every_structure(name):
    """Dense(diag(logspace(0, -12, 8)).float()): inverse(1e-10) was 120% off and logdet -inf."""
    op, entries = _logspace_operators()[name]
    v = torch.ones(op.shape[0])
    truth = dense_inverse(torch.diag(entries), 1e-10) @ v.double()
    assert _relative(op.inverse(1e-10) @ v, truth) < 1e-5
    logdet = op.logdet()
    assert math.isclose(logdet.item(), entries.log().sum().item(), rel_tol=1e-6)
    assert math.isclose(op.logdet(1e-10).item(), (entries + 1e-10).log().sum().item(), rel_tol=1e-6)


def test_rounding_noise_of_a_dense_rank_deficient_matrix_is_still_singular():
    """A small eigenvalue of a well-mixed float32 matrix is within its rounding bound: zero."""
    op = curvops.Dense(random_psd(6, rank=3).float())
    with pytest.raises(curvops.SingularOperatorError, match="pass damping > 0"):
        op.inverse()
    with pytest.warns(curvops.SingularOperatorWarning):
        assert op.logdet().item() == -math.inf


def test_rotated_ill_conditioned_float64_matrix_is_resolved():
    q = random_orthogonal(8, seed=2)
    matrix = (q * LOGSPACE) @ q.T
    op = curvops.Dense(0.5 * (matrix + matrix.T))
    v = torch.randn(8, dtype=DOUBLE, generator=generator(0))
    truth = (q / (LOGSPACE + 1e-6)) @ (q.T @ v)
    assert _relative(op.inverse(1e-6) @ v, truth) < 1e-6


# --------------------------------------------------------------- item 12: dtype conversions
def _float32_psd(size: int, seed: int = 0) -> torch.Tensor:
    """A float32 PSD matrix symmetric to float32's precision only (1e-6 relative), as computed
    factors are: within float32's tolerance, outside float64's."""
    matrix = random_psd(size, seed=seed).float()
    return matrix + 1e-6 * matrix.abs().max() * torch.ones(size, size).triu(1)


def _linalg_operators():
    g, a = _float32_psd(3), _float32_psd(2, seed=1)
    kron = curvops.Kronecker(g, a)
    q = random_orthogonal(3, seed=3).float()
    return [
        curvops.Dense(_float32_psd(4)),
        curvops.Diagonal(torch.tensor([1.0, 2.0, 3.0])),
        curvops.Identity(3),
        kron,
        curvops.Kronecker(g, torch.tensor([1.0, 2.0])),
        curvops.KroneckerEigen([q, None], torch.rand(3, 2)),
        kron.inverse(0.1),
        2.0 * kron,
        kron + curvops.Dense(_float32_psd(6, seed=4)) + 0.5 * curvops.Identity(6),
        curvops.BlockDiagonal([kron, curvops.Diagonal(torch.ones(2))], labels=["k", "d"]),
        curvops.Permuted(kron, torch.tensor([1, 0, 2, 3, 5, 4])),
        curvops.LowRankUpdate(kron, torch.randn(6, 2, generator=generator(0))),
        Cast(kron, torch.bfloat16),
    ]


@pytest.mark.parametrize("index", range(len(_linalg_operators())))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_linalg_operator_converts_and_keeps_its_matrix(index, dtype):
    op = _linalg_operators()[index].to(dtype=torch.float32 if dtype == torch.float64 else DOUBLE)
    converted = op.to(dtype=dtype)
    assert converted.dtype == dtype and type(converted) is type(op)
    source, result = op.to_dense().double(), converted.to_dense().double()
    eps = max(torch.finfo(op.dtype).eps, torch.finfo(dtype).eps)
    torch.testing.assert_close(result, source, rtol=0, atol=10 * eps * source.abs().max().item())


@pytest.mark.parametrize("index", [0, 1])
def test_iterative_operators_convert_with_their_operand(index):
    kron = curvops.Kronecker(random_psd(3).float(), random_psd(2, seed=1).float())
    op = [kron.inverse(0.1, method="cg"), kron.power(-0.5, 0.1, method="lanczos")][index]
    converted = op.to(dtype=DOUBLE)
    assert converted.dtype == DOUBLE and converted.op.dtype == DOUBLE
    torch.testing.assert_close(converted.op.to_dense(), kron.to_dense().double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("build", [curvops.KFAC, curvops.EKFAC, curvops.TKFAC])
def test_kronecker_approximations_convert_to_float64_and_back(build):
    """KFAC(...).to(dtype=float64) of a float32 model failed ("factor 0 is not symmetric")."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 10))
    data = [(torch.randn(256, 20), torch.randint(0, 10, (256,)))]
    op = build(model, torch.nn.CrossEntropyLoss(), data, fisher_type="type-2")
    wide = op.to(dtype=DOUBLE)
    source = op.to_dense().double()
    tol = 10 * torch.finfo(torch.float32).eps * source.abs().max().item()
    torch.testing.assert_close(wide.to_dense(), source, rtol=0, atol=tol)
    torch.testing.assert_close(wide.to(dtype=torch.float32).to_dense().double(), source, rtol=0, atol=tol)
    v = torch.randn(op.shape[0], dtype=DOUBLE, generator=generator(0))
    assert _relative(wide.inverse(1e-2) @ v, op.inverse(1e-2).to(dtype=DOUBLE) @ v) < 1e-4


# ------------------------------------------------------------------ item 13: memory budget
def _large_ggn():
    model = torch.nn.Linear(451, 451)  # D = 451 * 452 = 203,852: 155 GiB dense in float32
    return curvops.GGN(model, torch.nn.MSELoss(), [(torch.randn(2, 451), torch.randn(2, 451))])


@pytest.mark.parametrize(
    "quantity",
    [
        lambda op: op.to_dense(),
        lambda op: op.eigenvalues(),
        lambda op: op.inverse(method="exact"),
        lambda op: op.logdet(method="exact"),
        lambda op: op.power(0.5, method="exact"),
        lambda op: op.inverse(method="cg").to_dense(),
        lambda op: curvops.compare(op, op, exact=True),
    ],
)
def test_dense_results_over_the_memory_budget_are_refused_before_computing(quantity):
    op = _large_ggn()
    with pytest.raises(
        curvops.MemoryBudgetError, match=r"D = 203852.*GiB.*memory budget of 8.0 GiB.*set_memory_budget"
    ):
        quantity(op)


def test_structure_needs_no_dense_matrix_and_the_budget_is_overridable():
    big = curvops.Kronecker(torch.eye(452), 2 * torch.eye(452))  # D = 204,304
    assert big.eigenvalues().shape == (452 * 452,) and big.logdet().item() == pytest.approx(
        452**2 * math.log(2)
    )
    with pytest.raises(curvops.MemoryBudgetError):
        big.to_dense()
    with pytest.raises(curvops.MemoryBudgetError, match="dense fallback of Sum"):
        (big + big.inverse()).eigenvalues()
    small = curvops.Dense(random_psd(4))
    with memory_budget(64):
        with pytest.raises(curvops.MemoryBudgetError, match=r"128 B.*budget of 64 B"):
            small.to_dense()
    assert small.to_dense().shape == (4, 4)
    set_memory_budget(0)
    try:
        with pytest.raises(curvops.MemoryBudgetError, match="dense fallback of Sum"):
            (small + small).logdet()
    finally:
        set_memory_budget(None)
    assert curvops.linalg.get_memory_budget() == 8 * 2**30
    with pytest.raises(ValueError, match="memory budget"):
        set_memory_budget(-1)


# --------------------------------------------------------------- item 14: CG on singular ops
def _singular_ggn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    data = [(torch.randn(3, 3, dtype=DOUBLE), torch.randn(3, 2, dtype=DOUBLE))]  # rank <= 6 < D = 26
    return curvops.GGN(model, torch.nn.MSELoss(), data)


@pytest.mark.parametrize(
    "make", [_singular_ggn, lambda: curvops.Dense(torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=DOUBLE)))]
)
def test_cg_on_a_singular_operator_raises_like_the_exact_method(make):
    """CG returned ‖x‖ = 6e19 with a warning; the exact method raises SingularOperatorError."""
    op = make()
    v = torch.ones(op.shape[0], dtype=DOUBLE)
    with pytest.raises(curvops.SingularOperatorError, match="damping"):
        op.inverse(method="exact") @ v
    with pytest.raises(curvops.SingularOperatorError, match=r"op \+ 0.0\*I is singular.*pass damping > 0"):
        op.inverse(method="cg") @ v
    dense = op.to_dense()
    truth = dense_inverse(0.5 * (dense + dense.T), 1e-2) @ v
    assert _relative(op.inverse(1e-2, method="cg", rtol=1e-12) @ v, truth) < 1e-8


def test_cg_still_calls_an_indefinite_operator_not_positive_definite():
    op = curvops.Dense(torch.diag(torch.tensor([2.0, -1.0, 1.0], dtype=DOUBLE)))
    with pytest.raises(curvops.NotPositiveDefiniteError, match="not positive definite"):
        op.inverse(method="cg") @ torch.ones(3, dtype=DOUBLE)


# ------------------------------------------------------------------- item 15: strict types
OP = curvops.Kronecker(random_psd(2), random_psd(3, seed=1))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: OP.inverse(0.1, factored="False"), TypeError, "factored must be True or False"),
        (lambda: OP.inverse(0.1, factored=1), TypeError, "factored"),
        (lambda: OP.power(True), ValueError, "power p"),
        (lambda: OP.logdet(method="slq", num_steps=0), ValueError, "num_steps"),
        (lambda: OP.logdet(method="slq", num_samples=True), ValueError, "num_samples"),
        (lambda: OP.trace(method="hutchinson", num_samples=2.5), ValueError, "num_samples"),
        (lambda: OP.diagonal(method="hutch++", num_samples=True), ValueError, "num_samples"),
        (lambda: OP.inverse(0.1, method="cg", maxiter=1.5), ValueError, "maxiter"),
        (lambda: OP.inverse(0.1, method="cg", rtol="1e-3"), ValueError, "rtol"),
        (lambda: OP.power(0.5, 0.1, method="lanczos", num_steps=0), ValueError, "num_steps"),
        (lambda: curvops.LowRankUpdate(OP, torch.ones(6, dtype=DOUBLE), sign=True), ValueError, "sign"),
        (lambda: curvops.compare(OP, OP, exact="False"), TypeError, "exact must be True or False"),
        (lambda: curvops.linalg.cg(lambda v: v, torch.ones(2, 1), maxiter=True), ValueError, "maxiter"),
    ],
)
def test_arguments_of_the_wrong_type_are_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_complex_numpy_input_is_refused_not_truncated():
    z = np.array([1.0 + 2.0j] * 6)
    with pytest.raises(TypeError, match="complex"):
        OP @ z
    with pytest.raises(TypeError, match="complex"):
        OP.to_scipy().matvec(z)
    real = OP @ z.real + 1j * (OP @ z.imag)  # the suggested fix is exact
    np.testing.assert_allclose(real, OP.to_dense().numpy() @ z)
