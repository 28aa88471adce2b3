"""A short tour of curvops on bundled data: softmax regression on scikit-learn's digits.

For a linear softmax model ``f(x) = W x`` (``W`` of shape ``[C, I]``) the GGN of the mean
cross-entropy is exactly ``G = (1/N) Σ_n Λ_n ⊗ x_n x_n^T`` with ``Λ_n = diag(p_n) - p_n p_n^T``,
and KFAC approximates it by ``mean(Λ_n) ⊗ mean(x_n x_n^T)``. The demo builds both as
operators and compares trace, log-determinant, damped inverses, SciPy eigenvalues and the
time each takes.

Run with ``python -m curvops.demo`` (needs ``scikit-learn``: ``pip install curvops[demo]``).
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse.linalg
import torch

import curvops


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float64)
    return torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1), torch.tensor(y)


def _fit_softmax_regression(x: torch.Tensor, y: torch.Tensor, classes: int = 10) -> torch.Tensor:
    weight = torch.zeros(classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight], max_iter=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T, y) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach()


def _seconds(function, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    """Fit the model, build exact GGN and KFAC operators, and print how they compare."""
    x, y = _digits()
    weight = _fit_softmax_regression(x, y)
    p = torch.softmax(x @ weight.T, dim=1)
    accuracy = (p.argmax(1) == y).double().mean().item()
    output_hessians = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    n, classes, inputs = len(x), p.shape[1], x.shape[1]

    ggn_matrix = torch.einsum("nij,nk,nl->ikjl", output_hessians, x, x).reshape(classes * inputs, -1) / n
    exact = curvops.Dense(ggn_matrix)
    kfac = curvops.Kronecker(output_hessians.mean(0), x.T @ x / n)
    print(f"digits: N={n}, softmax regression W of shape [{classes}, {inputs}], D={exact.shape[0]}")
    print(f"training accuracy {accuracy:.3f}")

    error = (kfac.to_dense() - ggn_matrix).norm() / ggn_matrix.norm()
    print(f"\nKFAC vs exact GGN: relative Frobenius error {error:.3f}")
    print(f"trace: exact {exact.trace().item():.4f}  KFAC {kfac.trace().item():.4f}")
    print("logdet(G + λI):")
    for damping in (1e-4, 1e-2, 1.0):
        exact_logdet, kfac_logdet = exact.logdet(damping).item(), kfac.logdet(damping).item()
        print(f"  λ={damping:<6g} exact {exact_logdet:10.2f}  KFAC {kfac_logdet:10.2f}")

    top_exact = scipy.sparse.linalg.eigsh(exact.to_scipy(), k=3, return_eigenvectors=False)
    top_kfac = scipy.sparse.linalg.eigsh(kfac.to_scipy(), k=3, return_eigenvectors=False)
    print(
        f"top-3 eigenvalues (SciPy eigsh): exact {np.sort(top_exact)[::-1].round(4)}  "
        f"KFAC {np.sort(top_kfac)[::-1].round(4)}"
    )

    damping = 1e-3
    gradient = torch.randn(exact.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact_inverse, kfac_inverse = exact.inverse(damping), kfac.inverse(damping)
    cg_step = exact.inverse(damping, method="cg", rtol=1e-10) @ gradient
    print(f"\nnatural-gradient step (G + {damping}I)^-1 g:")
    print(
        f"  eigendecomposition vs CG: relative difference "
        f"{((exact_inverse @ gradient - cg_step).norm() / cg_step.norm()).item():.1e}"
    )
    kfac_step = kfac_inverse @ gradient
    cosine = torch.nn.functional.cosine_similarity(kfac_step, cg_step, dim=0).item()
    print(f"  cosine(KFAC step, exact step) = {cosine:.3f}")

    dense_solve = _seconds(
        lambda: torch.linalg.solve(
            ggn_matrix + damping * torch.eye(len(ggn_matrix), dtype=torch.float64), gradient
        )
    )
    kfac_setup = _seconds(lambda: curvops.Kronecker(*kfac.factors).inverse(damping) @ gradient)
    kfac_apply = _seconds(lambda: kfac_inverse @ gradient)
    print("\ntime for one damped inverse-vector product:")
    print(
        f"  dense solve {dense_solve * 1e3:.2f} ms | KFAC from scratch {kfac_setup * 1e3:.2f} ms "
        f"({dense_solve / kfac_setup:.0f}x faster) | KFAC reusing its eigenbasis {kfac_apply * 1e3:.3f} ms"
    )


if __name__ == "__main__":
    main()
