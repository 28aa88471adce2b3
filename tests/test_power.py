"""Matrix powers ``(op + λI)^p`` and eigenvalues of every operator against dense ``torch.linalg.eigh``."""

import math

import pytest
import torch
from helpers import DOUBLE, generator, random_orthogonal, random_psd
from torch import nn

import curvops
from curvops.linalg import LanczosPower

POWERS = (-1.0, -0.5, 0.5, 2.0)
DAMPINGS = (0.0, 0.3)


def _dense_power(matrix, p, damping):
    """``(M + λI)^p`` from an independent ``eigh`` of the symmetrised dense matrix."""
    e, q = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (q * (e + damping) ** p) @ q.T


def _positive(size, seed, device="cpu"):
    return (0.5 + torch.rand(size, generator=generator(seed), dtype=DOUBLE)).to(device)


def _mlp_data(seed=0, size=10):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(size, 4, generator=generator(seed), dtype=DOUBLE)
    y = torch.randn(size, 3, generator=generator(seed + 1), dtype=DOUBLE)
    return model, nn.MSELoss(), [(x[:6], y[:6]), (x[6:], y[6:])]


def _kfac(approximation, bias):
    build = curvops.KFAC if approximation == "kfac" else curvops.EKFAC
    return build(*_mlp_data(), fisher_type="type-2", bias=bias)


CASES = {
    "dense": lambda: curvops.Dense(random_psd(6, seed=1)),
    "diagonal": lambda: curvops.Diagonal(_positive(5, 2)),
    "identity": lambda: curvops.Identity(4, dtype=DOUBLE),
    "kronecker2": lambda: curvops.Kronecker(random_psd(3, seed=3), random_psd(4, seed=4)),
    "kronecker3": lambda: curvops.Kronecker(
        random_psd(2, seed=5), random_psd(3, seed=6), random_psd(2, seed=7)
    ),
    "kronecker_diagonal_factor": lambda: curvops.Kronecker(random_psd(3, seed=8), _positive(4, 9)),
    "ekfac_like": lambda: curvops.KroneckerEigen(
        [random_orthogonal(3, seed=10), random_orthogonal(4, seed=11)], _positive(12, 12).reshape(3, 4)
    ),
    "kronecker_eigen_identity_basis": lambda: curvops.KroneckerEigen(
        [random_orthogonal(3, seed=13), None], _positive(12, 14).reshape(3, 4)
    ),
    "scaled": lambda: 2.5 * curvops.Kronecker(random_psd(2, seed=15), random_psd(3, seed=16)),
    "damped_sum": lambda: curvops.Dense(random_psd(5, rank=2, seed=17)) + 0.7 * curvops.Identity(5, DOUBLE),
    "sum": lambda: curvops.Dense(random_psd(5, seed=18)) + curvops.Diagonal(_positive(5, 19)),
    "block_diagonal": lambda: curvops.BlockDiagonal(
        [
            curvops.Dense(random_psd(3, seed=20)),
            curvops.Kronecker(random_psd(2, seed=21), _positive(3, 22)),
            curvops.Diagonal(_positive(2, 23)),
        ],
        labels=["dense", "kronecker", "diagonal"],
    ),
    "permuted": lambda: curvops.Permuted(
        curvops.Kronecker(random_psd(2, seed=24), random_psd(3, seed=25)),
        torch.randperm(6, generator=generator(26)),
    ),
    "low_rank_update": lambda: curvops.LowRankUpdate(
        curvops.Diagonal(_positive(6, 27)), torch.randn(6, 2, generator=generator(28), dtype=DOUBLE)
    ),
    "kfac": lambda: _kfac("kfac", "separate"),
    "kfac_joint": lambda: _kfac("kfac", "joint"),
    "ekfac": lambda: _kfac("ekfac", "separate"),
    "ekfac_joint": lambda: _kfac("ekfac", "joint"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    """``(op, its dense matrix)``; every case is positive definite (checked), so damping 0 is allowed."""
    op = CASES[request.param]()
    dense = op.to_dense()
    eigenvalues = torch.linalg.eigvalsh(dense)
    assert eigenvalues.min() > 1e-6 * eigenvalues.max(), request.param
    return op, dense


@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("p", POWERS)
def test_power_matches_dense(case, p, damping):
    op, dense = case
    result = op.power(p, damping=damping)
    assert isinstance(result, curvops.CurvatureOperator)
    assert result.shape == op.shape and result.dtype == DOUBLE
    torch.testing.assert_close(result.to_dense(), _dense_power(dense, p, damping))


def test_eigenvalues_match_eigvalsh(case):
    op, dense = case
    eigenvalues = op.eigenvalues()
    assert eigenvalues.shape == (op.shape[0],) and eigenvalues.dtype == DOUBLE
    assert bool((eigenvalues.diff() >= 0).all())
    torch.testing.assert_close(eigenvalues, torch.linalg.eigvalsh(dense))


def test_power_minus_one_is_the_inverse(case):
    op, _ = case
    torch.testing.assert_close(op.power(-1, damping=0.3).to_dense(), op.inverse(damping=0.3).to_dense())


def test_square_root_squared_is_the_damped_operator(case):
    op, dense = case
    root = op.power(0.5, damping=0.3).to_dense()
    torch.testing.assert_close(root @ root, dense + 0.3 * torch.eye(op.shape[0], dtype=DOUBLE))


def test_power_one_is_the_operator_and_power_zero_the_identity(case):
    op, dense = case
    assert op.power(1) is op
    eye = torch.eye(op.shape[0], dtype=DOUBLE)
    torch.testing.assert_close(op.power(1.0, damping=0.3).to_dense(), dense + 0.3 * eye)
    torch.testing.assert_close(op.power(0).to_dense(), eye)


def test_power_keeps_the_structure():
    g, a, d = random_psd(3, seed=0), random_psd(4, seed=1), _positive(2, 2)
    kronecker = curvops.Kronecker(g, a, d).power(-0.5, damping=0.1)
    assert isinstance(kronecker, curvops.KroneckerEigen)
    assert kronecker.eigenvectors[2] is None and kronecker.spectrum.shape == (3, 4, 2)
    eigen = curvops.KroneckerEigen([random_orthogonal(3)], _positive(3, 3))
    assert eigen.power(0.5).eigenvectors[0] is eigen.eigenvectors[0]
    blocks = curvops.BlockDiagonal([curvops.Dense(g), curvops.Diagonal(d)], labels=["w", "b"]).power(2)
    assert isinstance(blocks, curvops.BlockDiagonal) and blocks.labels == ("w", "b")
    assert isinstance(blocks.block("b"), curvops.Diagonal)
    permuted = curvops.Permuted(curvops.Dense(g), torch.tensor([2, 0, 1])).power(0.5)
    assert isinstance(permuted, curvops.Permuted)
    assert isinstance((2.0 * curvops.Diagonal(d)).power(-1), curvops.Scaled)
    damped = curvops.Kronecker(g, a) + 0.5 * curvops.Identity(12, DOUBLE)
    assert isinstance(damped.power(0.5), curvops.KroneckerEigen)
    assert isinstance(curvops.Identity(3, DOUBLE).power(-0.5, damping=3.0), curvops.Scaled)
    torch.testing.assert_close(
        curvops.Identity(3, DOUBLE).power(-0.5, damping=3.0).to_dense(), 0.5 * torch.eye(3, dtype=DOUBLE)
    )


def test_power_of_a_kfac_operator_keeps_labels_and_state_dict():
    op = _kfac("ekfac", "joint")
    root = op.power(-0.5, damping=0.1)
    assert isinstance(root, curvops.BlockDiagonal) and root.labels == op.labels
    assert all(isinstance(block, curvops.Permuted) for block in root.blocks)
    rebuilt = curvops.from_state_dict(root.state_dict())
    torch.testing.assert_close(rebuilt.to_dense(), root.to_dense())


def test_negative_scale_and_integer_powers_of_indefinite_operators():
    matrix = random_psd(4, seed=0) - 1.5 * torch.eye(4, dtype=DOUBLE)
    assert torch.linalg.eigvalsh(matrix).min() < 0 < torch.linalg.eigvalsh(matrix).max()
    for op in (curvops.Dense(matrix), -2.0 * curvops.Dense(random_psd(4, seed=1))):
        dense = op.to_dense()
        for p in (-1, 2, 3):
            torch.testing.assert_close(op.power(p).to_dense(), _dense_power(dense, p, 0.0))
        torch.testing.assert_close(op.eigenvalues(), torch.linalg.eigvalsh(dense))
        with pytest.raises(ValueError, match="indefinite"):
            op.power(0.5)
        with pytest.raises(curvops.NotPositiveDefiniteError, match="damping"):
            op.power(-0.5, damping=0.1)


@pytest.mark.parametrize(
    "singular",
    [
        curvops.Dense(random_psd(5, rank=3)),
        curvops.Diagonal(torch.tensor([0.0, 1.0, 2.0], dtype=DOUBLE)),
        curvops.Kronecker(random_psd(3, rank=2), random_psd(2)),
        curvops.Kronecker(random_psd(3), torch.tensor([1.0, 0.0], dtype=DOUBLE)),
        curvops.KroneckerEigen([random_orthogonal(2)], torch.tensor([0.0, 1.0], dtype=DOUBLE)),
        curvops.BlockDiagonal(
            [curvops.Diagonal(torch.ones(2, dtype=DOUBLE)), curvops.Dense(random_psd(3, rank=1))]
        ),
        2.0 * curvops.Dense(random_psd(4, rank=2)),
    ],
    ids=[
        "dense",
        "diagonal",
        "kronecker",
        "kronecker_diagonal_factor",
        "kronecker_eigen",
        "blocks",
        "scaled",
    ],
)
def test_negative_power_of_a_singular_operator_needs_damping(singular):
    for p in (-1, -0.5):
        with pytest.raises(curvops.SingularOperatorError, match="damping > 0"):
            singular.power(p)
    dense = singular.to_dense()
    torch.testing.assert_close(singular.power(-0.5, damping=0.3).to_dense(), _dense_power(dense, -0.5, 0.3))
    root = singular.power(0.5).to_dense()  # zero eigenvalues have the real root 0
    torch.testing.assert_close(root @ root, dense)


@pytest.mark.parametrize("p", [math.nan, math.inf, "2", None])
def test_power_must_be_a_finite_real(p):
    with pytest.raises(ValueError, match="finite real"):
        curvops.Diagonal(torch.ones(2)).power(p)


def test_power_checks_damping_and_method():
    op = curvops.Diagonal(torch.ones(2))
    with pytest.raises(ValueError, match="damping"):
        op.power(0.5, damping=-1.0)
    with pytest.raises(ValueError, match="power method"):
        op.power(0.5, method="cg")
    with pytest.raises(ValueError, match="num_steps"):
        op.power(0.5, method="lanczos", num_steps=0)


def _small_ggn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 4, generator=generator(0), dtype=DOUBLE)
    y = torch.randn(5, 2, generator=generator(1), dtype=DOUBLE)
    return curvops.GGN(model, nn.MSELoss(), [(x[:3], y[:3]), (x[3:], y[3:])])


@pytest.mark.parametrize("p", POWERS)
def test_lanczos_power_of_a_model_operator_is_exact_with_d_steps(p):
    ggn = _small_ggn()
    size = ggn.shape[0]
    assert size == 30
    power = ggn.power(p, damping=0.3, num_steps=size)
    assert isinstance(power, LanczosPower)  # model operators default to Lanczos
    v = torch.randn(size, 3, generator=generator(2), dtype=DOUBLE)
    v[:, 1] = 0
    expected = _dense_power(ggn.to_dense(), p, 0.3) @ v
    torch.testing.assert_close(power @ v, expected, rtol=1e-8, atol=1e-8 * expected.abs().max().item())
    torch.testing.assert_close(
        power @ v[:, 0], expected[:, 0], rtol=1e-8, atol=1e-8 * expected.abs().max().item()
    )


def test_lanczos_power_with_fewer_steps_than_d():
    matrix = random_psd(40, seed=3)
    op = curvops.Dense(matrix)
    v = torch.randn(40, 2, generator=generator(4), dtype=DOUBLE)
    for p in POWERS:
        expected = _dense_power(matrix, p, 0.3) @ v
        approximate = op.power(p, damping=0.3, method="lanczos", num_steps=15) @ v
        assert (approximate - expected).norm() <= 1e-4 * expected.norm()
        exact = op.power(p, damping=0.3, method="lanczos", num_steps=40) @ v
        torch.testing.assert_close(exact, expected)


def test_lanczos_power_errors_and_state_dict():
    singular = curvops.Diagonal(torch.tensor([0.0, 1.0, 2.0], dtype=DOUBLE))
    with pytest.raises(curvops.SingularOperatorError, match="damping > 0"):
        singular.power(-1, method="lanczos") @ torch.ones(3, dtype=DOUBLE)
    indefinite = curvops.Diagonal(torch.tensor([-1.0, 1.0, 2.0], dtype=DOUBLE))
    with pytest.raises(ValueError, match="indefinite"):
        indefinite.power(0.5, method="lanczos") @ torch.ones(3, dtype=DOUBLE)
    op = curvops.Dense(random_psd(5)).power(-0.5, damping=0.2, method="lanczos", num_steps=5)
    rebuilt = curvops.from_state_dict(op.state_dict())
    assert isinstance(rebuilt, LanczosPower) and (rebuilt.p, rebuilt.damping, rebuilt.num_steps) == (
        -0.5,
        0.2,
        5,
    )
    torch.testing.assert_close(rebuilt.to_dense(), op.to_dense())


def test_power_and_eigenvalues_on_device(device):
    g, a = random_psd(3, seed=0, device=device), random_psd(4, seed=1, device=device)
    d = _positive(2, 2, device)
    op = curvops.BlockDiagonal([curvops.Kronecker(g, a), curvops.Kronecker(g, d), curvops.Dense(a)])
    dense = op.to_dense()
    for method in ("exact", "lanczos"):
        result = op.power(-0.5, damping=0.3, method=method, num_steps=op.shape[0])
        v = torch.randn(op.shape[0], 2, dtype=DOUBLE, device=device)
        out = result @ v
        assert out.device == dense.device
        torch.testing.assert_close(out, _dense_power(dense, -0.5, 0.3) @ v)
    eigenvalues = op.eigenvalues()
    assert eigenvalues.device == dense.device
    torch.testing.assert_close(eigenvalues, torch.linalg.eigvalsh(dense))


def test_exact_power_and_eigenvalues_of_a_model_operator_use_the_dense_matrix():
    ggn = _small_ggn()
    dense = ggn.to_dense()
    for p in POWERS:
        torch.testing.assert_close(
            ggn.power(p, damping=0.3, method="exact").to_dense(), _dense_power(dense, p, 0.3)
        )
    torch.testing.assert_close(ggn.eigenvalues(), torch.linalg.eigvalsh(dense))
