"""The structure of curvops.linalg (no import cycle, Dense in its own module) and the Kronecker
methods the optimizer builds on: per-factor damping, π-dampings, the eigenbasis form and new
eigenvalues in a kept eigenbasis, each against torch.linalg on the dense matrix (float64)."""

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DOUBLE, dense_inverse, kron, random_psd

import curvops
from curvops.linalg.dense import Dense

LINALG = Path(curvops.linalg.__file__).parent
MODULES = sorted(path.stem for path in LINALG.glob("*.py") if path.stem != "__init__")


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _linalg_imports(node: ast.stmt) -> set[str]:
    """The ``curvops.linalg`` modules an import statement loads (relative imports of this package)."""
    if not isinstance(node, ast.ImportFrom) or node.level != 1:
        return set()
    if node.module is None:  # from . import spectral
        return {alias.name for alias in node.names if alias.name in MODULES}
    return {node.module.split(".")[0]} & set(MODULES)


def _top_level_imports(module: str) -> set[str]:
    """What ``module`` imports from curvops.linalg when it is imported (``TYPE_CHECKING`` blocks,
    which never run, left out)."""
    tree = ast.parse((LINALG / f"{module}.py").read_text())
    return {name for node in tree.body if not _is_type_checking(node) for name in _linalg_imports(node)}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a path ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return [*path[path.index(child) :], child]
            if child not in state and (cycle := visit(child, [*path, child])) is not None:
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])) is not None:
            return cycle
    return None


def test_no_import_cycle_among_linalg_modules():
    graph = {module: _top_level_imports(module) for module in MODULES}
    assert _find_cycle(graph) is None, f"import cycle: {' -> '.join(_find_cycle(graph))}"
    assert _find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # the check finds one


def test_base_imports_no_operator_module_and_no_module_imports_at_call_time():
    operators = {"composite", "dense", "diagonal", "kronecker", "lowrank", "matrix_functions"}
    operators |= {"permuted", "solvers", "blocks"}
    assert not _top_level_imports("base") & operators
    for module in MODULES:
        tree = ast.parse((LINALG / f"{module}.py").read_text())
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        local = [
            n.name for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))
        ]
        assert not local, f"{module}.py imports inside a function"


def test_base_imports_alone_and_every_module_is_under_500_lines():
    done = subprocess.run(
        [sys.executable, "-c", "import curvops.linalg.base"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for path in LINALG.glob("*.py"):
        assert len(path.read_text().splitlines()) < 500, path.name


def test_dense_lives_in_its_own_module_with_its_api():
    assert curvops.Dense is curvops.linalg.Dense is Dense
    m = random_psd(3, seed=4)
    op = Dense(m)
    assert isinstance(op, curvops.Kronecker) and op.matrix is m
    state = op.state_dict()
    assert state["type"] == "Dense" and list(state["tensors"]) == ["matrix"]
    rebuilt = curvops.from_state_dict(state)
    assert type(rebuilt) is Dense
    torch.testing.assert_close(rebuilt.inverse(0.3).to_dense(), dense_inverse(m, 0.3))
    with pytest.raises(ValueError, match="use Diagonal"):
        Dense(torch.ones(3, dtype=DOUBLE))


def _three_factors() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A dense, a 1-D diagonal and a rank-1 dense factor, and their matrices."""
    diagonal = torch.tensor([0.5, 2.0, 3.0, 1.5], dtype=DOUBLE)
    factors = [random_psd(3, seed=1), diagonal, random_psd(2, rank=1, seed=2)]
    return factors, [f if f.ndim == 2 else torch.diag(f) for f in factors]


def test_factor_inverse_matches_dense_per_factor_damping():
    factors, matrices = _three_factors()
    dampings = [0.3, 0.0, 2.0]  # the diagonal factor is invertible without damping
    inverse = curvops.Kronecker(*factors).factor_inverse(dampings)
    assert isinstance(inverse, curvops.Kronecker) and inverse.factors[1].ndim == 1
    expected = kron(*(dense_inverse(m, lam) for m, lam in zip(matrices, dampings, strict=True)))
    torch.testing.assert_close(inverse.to_dense(), expected)


def test_factor_inverse_errors_name_the_factor():
    factors, _ = _three_factors()
    op = curvops.Kronecker(*factors)
    with pytest.raises(curvops.SingularOperatorError, match=r"Kronecker factor 2: .*pass damping > 0"):
        op.factor_inverse([0.1, 0.1, 0.0])  # the rank-1 factor, undamped
    with pytest.raises(ValueError, match=r"one damping per factor \(3\), got 2"):
        op.factor_inverse([0.1, 0.1])
    with pytest.raises(ValueError, match=r"dampings\[1\] must be a finite number >= 0"):
        op.factor_inverse([0.1, -1.0, 0.1])


@pytest.mark.parametrize("balance", ["mean", "trace"])
def test_pi_dampings_balance_the_factors(balance):
    factors, matrices = _three_factors()
    op = curvops.Kronecker(*factors)
    scales = torch.stack([m.trace() / (m.shape[0] if balance == "mean" else 1) for m in matrices])
    pis = scales / scales.prod() ** (1 / 3)
    dampings = op.pi_dampings(0.2, balance=balance)
    torch.testing.assert_close(torch.tensor(dampings, dtype=DOUBLE), 0.2 ** (1 / 3) * pis)
    assert math.isclose(math.prod(dampings), 0.2, rel_tol=1e-12)


def test_factored_inverse_is_factor_inverse_of_pi_dampings():
    factors, _ = _three_factors()
    op = curvops.Kronecker(*factors)
    factored = op.inverse(0.2, factored=True)
    torch.testing.assert_close(factored.to_dense(), op.factor_inverse(op.pi_dampings(0.2)).to_dense())


def test_pi_dampings_errors():
    op = curvops.Kronecker(random_psd(2), torch.zeros(3, dtype=DOUBLE))
    with pytest.raises(curvops.SingularOperatorError, match=r"factor 1 has trace 0\.000e"):
        op.pi_dampings(0.1)
    with pytest.raises(ValueError, match="Unknown balance 'median'"):
        curvops.Kronecker(random_psd(2)).pi_dampings(0.1, balance="median")


def _unit_trace(matrix: torch.Tensor) -> torch.Tensor:
    return matrix / matrix.trace()


def test_trace_balance_gives_gao_et_al_tkfac_inverse():
    """``F = δ Ψ ⊗ Φ``, ``tr Ψ = tr Φ = 1``: ``(√δ Ψ + √λ I)^-1 ⊗ (√δ Φ + √λ I)^-1`` at λ = 0.1."""
    delta, damping = 2.5, 0.1
    psi, phi = _unit_trace(random_psd(3, seed=5)), _unit_trace(random_psd(4, rank=2, seed=6))
    eye = torch.eye
    root = math.sqrt(delta)
    expected = kron(
        torch.linalg.inv(root * psi + math.sqrt(damping) * eye(3, dtype=DOUBLE)),
        torch.linalg.inv(root * phi + math.sqrt(damping) * eye(4, dtype=DOUBLE)),
    )
    for op in (curvops.Kronecker(delta * psi, phi), curvops.Kronecker(root * psi, root * phi)):
        inverse = op.factor_inverse(op.pi_dampings(damping, balance="trace"))
        torch.testing.assert_close(inverse.to_dense(), expected)


def test_eigen_is_the_same_matrix_in_its_eigenbasis():
    factors, matrices = _three_factors()
    op = curvops.Kronecker(*factors)
    eigen = op.eigen()
    assert isinstance(eigen, curvops.KroneckerEigen) and eigen.eigenvectors[1] is None
    torch.testing.assert_close(eigen.to_dense(), kron(*matrices))
    values = [torch.linalg.eigvalsh(matrices[0]), factors[1], torch.linalg.eigvalsh(matrices[2])]
    expected = values[0][:, None, None] * values[1][None, :, None] * values[2][None, None, :]
    torch.testing.assert_close(eigen.spectrum, expected)
    for i in (0, 2):
        q = eigen.eigenvectors[i]
        torch.testing.assert_close(matrices[i] @ q, q * values[i])
    two = curvops.Kronecker(matrices[0], matrices[2]).eigen()  # the optimizer's torch.outer(γ, α)
    torch.testing.assert_close(two.spectrum, torch.outer(values[0], values[2]))


def test_with_eigenvalues_keeps_the_eigenbasis():
    factors, _ = _three_factors()
    eigen = curvops.Kronecker(*factors).eigen()
    s = torch.rand(3, 4, 2, dtype=DOUBLE, generator=torch.Generator().manual_seed(0)) + 0.1
    new = eigen.with_eigenvalues(s)
    assert new.eigenvectors is eigen.eigenvectors and new.spectrum is s and eigen.spectrum is not s
    q = [eigen.eigenvectors[0], torch.eye(4, dtype=DOUBLE), eigen.eigenvectors[2]]
    basis = kron(*q)
    torch.testing.assert_close(new.to_dense(), basis @ torch.diag(s.flatten()) @ basis.T)
    torch.testing.assert_close(
        new.inverse(0.5).to_dense(), torch.linalg.inv(new.to_dense() + 0.5 * torch.eye(24))
    )


def test_with_eigenvalues_checks_shape_finiteness_and_place():
    eigen = curvops.Kronecker(random_psd(2), random_psd(3, seed=1)).eigen()
    with pytest.raises(ValueError, match=r"spectrum's shape \[2, 3\], got \[6\]"):
        eigen.with_eigenvalues(torch.ones(6, dtype=DOUBLE))
    with pytest.raises(ValueError, match="contain NaN or inf"):
        eigen.with_eigenvalues(torch.full((2, 3), math.nan, dtype=DOUBLE))
    with pytest.raises(ValueError, match="share one dtype and device"):
        eigen.with_eigenvalues(torch.ones(2, 3))
