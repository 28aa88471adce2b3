"""A short tour of curvops on bundled data: softmax regression on scikit-learn's digits.

For a linear softmax model ``f(x) = W x`` (``W`` of shape ``[C, I]``, the input carrying a
constant 1 for the bias) the GGN of the mean cross-entropy is
``G = (1/N) Σ_n Λ_n ⊗ x_n x_n^T`` with ``Λ_n = diag(p_n) - p_n p_n^T``; KFAC approximates
it by ``mean(Λ_n) ⊗ mean(x_n x_n^T)``. The demo takes the exact GGN as a matrix-free
:class:`curvops.GGN` of the trained model, KFAC from :func:`curvops.KFAC`, and compares
trace, log-determinant, damped inverses, SciPy eigenvalues and the time each takes.

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


def _fit_softmax_regression(x: torch.Tensor, y: torch.Tensor, classes: int = 10) -> torch.nn.Linear:
    model = torch.nn.Linear(x.shape[1], classes, bias=False).double()
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y) + 1e-3 * model.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


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
    model = _fit_softmax_regression(x, y)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    accuracy = (p.argmax(1) == y).double().mean().item()
    output_hessians = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    n, classes, inputs = len(x), p.shape[1], x.shape[1]

    batches = list(zip(x.split(256), y.split(256), strict=True))
    ggn = curvops.GGN(model, torch.nn.CrossEntropyLoss(), batches)  # matrix-free, exact
    dense = curvops.Dense(ggn.to_dense())
    kfac = curvops.KFAC(model, torch.nn.CrossEntropyLoss(), batches, fisher_type="type-2")
    (block,) = kfac.blocks
    textbook = torch.kron(output_hessians.mean(0), x.T @ x / n)
    print(f"digits: N={n}, softmax regression W of shape [{classes}, {inputs}], D={ggn.shape[0]}")
    print(f"training accuracy {accuracy:.3f}")
    difference = (kfac.to_dense() - textbook).abs().max().item()
    print(f"curvops.KFAC vs the textbook mean(Λ_n) ⊗ mean(x_n x_n^T): max difference {difference:.1e}")

    error = (kfac.to_dense() - dense.matrix).norm() / dense.matrix.norm()
    print(f"\nKFAC vs exact GGN: relative Frobenius error {error:.3f}")
    hutchpp = ggn.trace(method="hutch++", num_samples=60, generator=torch.Generator().manual_seed(0))
    print(
        f"trace: exact {ggn.trace().item():.4f}  Hutch++ (60 products) {hutchpp.item():.4f}  "
        f"KFAC {kfac.trace().item():.4f}"
    )
    print("logdet(G + λI):")
    for damping in (1e-4, 1e-2, 1.0):
        exact_logdet, kfac_logdet = dense.logdet(damping).item(), kfac.logdet(damping).item()
        print(f"  λ={damping:<6g} exact {exact_logdet:10.2f}  KFAC {kfac_logdet:10.2f}")
    slq = ggn.logdet(1e-2, num_samples=20, num_steps=40, generator=torch.Generator().manual_seed(0))
    print(f"  λ=0.01   stochastic Lanczos quadrature on the matrix-free GGN: {slq.item():.2f}")

    top_exact = scipy.sparse.linalg.eigsh(ggn.to_scipy(), k=3, return_eigenvectors=False)
    top_kfac = scipy.sparse.linalg.eigsh(kfac.to_scipy(), k=3, return_eigenvectors=False)
    print(
        f"top-3 eigenvalues (SciPy eigsh): GGN {np.sort(top_exact)[::-1].round(4)}  "
        f"KFAC {np.sort(top_kfac)[::-1].round(4)}"
    )

    damping = 1e-3
    gradient = torch.randn(ggn.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense_inverse, kfac_inverse = dense.inverse(damping), kfac.inverse(damping)
    cg_step = ggn.inverse(damping, rtol=1e-10) @ gradient
    exact_step = dense_inverse @ gradient
    print(f"\nnatural-gradient step (G + {damping}I)^-1 g:")
    relative = ((exact_step - cg_step).norm() / exact_step.norm()).item()
    print(f"  matrix-free CG vs dense eigendecomposition: relative difference {relative:.1e}")
    cosine = torch.nn.functional.cosine_similarity(kfac_inverse @ gradient, exact_step, dim=0).item()
    print(f"  cosine(KFAC step, exact step) = {cosine:.3f}")

    eye = torch.eye(len(dense.matrix), dtype=torch.float64)
    dense_solve = _seconds(lambda: torch.linalg.solve(dense.matrix + damping * eye, gradient))
    kfac_setup = _seconds(lambda: curvops.Kronecker(*block.factors).inverse(damping) @ gradient)
    kfac_apply = _seconds(lambda: kfac_inverse @ gradient)
    print("\ntime for one damped inverse-vector product:")
    print(
        f"  dense solve {dense_solve * 1e3:.2f} ms | KFAC from scratch {kfac_setup * 1e3:.2f} ms "
        f"({dense_solve / kfac_setup:.0f}x faster) | KFAC reusing its eigenbasis {kfac_apply * 1e3:.3f} ms"
    )


if __name__ == "__main__":
    main()
