"""Stochastic estimators for operators known only through products.

Each takes ``matmat``, a function from ``[D, K]`` to ``[D, K]`` tensors, so it serves any
operator (structured, matrix-free, damped), and ``sample``, a function from a count ``k`` to
``[D, k]`` random probes (:func:`rademacher`). The probes of one stage are applied as one
``[D, k]`` block.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import NotPositiveDefiniteError

MatMat = Callable[[Tensor], Tensor]
Sampler = Callable[[int], Tensor]


def rademacher(
    size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Sampler:
    """A source of Rademacher probes: ``sample(k)`` gives ``[size, k]`` independent signs ``±1``.

    Example:
        >>> z = rademacher(4, torch.float32)(2)
        >>> z.shape, bool((z.abs() == 1).all())
        (torch.Size([4, 2]), True)
    """

    def sample(count: int) -> Tensor:
        bits = torch.randint(0, 2, (size, count), device=device, generator=generator)
        return (2 * bits - 1).to(dtype)

    return sample


def _check_samples(num_samples: int, minimum: int, what: str) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < minimum:
        raise ValueError(f"{what} needs num_samples >= {minimum}, got {num_samples!r}.")


def hutchinson_trace(matmat: MatMat, sample: Sampler, num_samples: int) -> Tensor:
    """Hutchinson's estimate ``tr(A) ≈ (1/m) Σ_i z_i^T A z_i`` with Rademacher ``z_i``.

    Unbiased; variance ``(2/m) (‖A‖_F² - Σ_i A_ii²)``.

    Example:
        >>> a = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> hutchinson_trace(lambda x: a @ x, rademacher(3, torch.float32), 10).item()
        6.0
    """
    _check_samples(num_samples, 1, "Hutchinson")
    z = sample(num_samples)
    return (z * matmat(z)).sum() / num_samples


def hutchpp_trace(matmat: MatMat, sample: Sampler, num_samples: int) -> Tensor:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021) with ``m = num_samples`` products.

    ``Q`` spans ``A S`` for ``m/3`` random signs ``S``; ``tr(A) ≈ tr(Q^T A Q) +``
    Hutchinson on ``(I - QQ^T) A (I - QQ^T)`` with the remaining ``m/3`` probes. Exact when
    ``rank(A) <= m/3``; error ``O(1/m)`` instead of Hutchinson's ``O(1/√m)``.

    Example:
        >>> u = torch.randn(50, 2, dtype=torch.float64)
        >>> estimate = hutchpp_trace(lambda x: u @ (u.T @ x), rademacher(50, torch.float64), 9)
        >>> torch.allclose(estimate, (u * u).sum())
        True
    """
    _check_samples(num_samples, 3, "Hutch++")
    k = num_samples // 3
    q, _ = torch.linalg.qr(matmat(sample(k)))
    sketched = (q * matmat(q)).sum()
    g = sample(num_samples - 2 * k)
    g = g - q @ (q.T @ g)
    return sketched + (g * matmat(g)).sum() / g.shape[1]


def hutchinson_diagonal(matmat: MatMat, sample: Sampler, num_samples: int) -> Tensor:
    """Bekas et al.'s estimate ``diag(A) ≈ (1/m) Σ_i z_i ⊙ A z_i`` with Rademacher ``z_i``.

    Example:
        >>> a = torch.diag(torch.tensor([1.0, 2.0]))
        >>> hutchinson_diagonal(lambda x: a @ x, rademacher(2, torch.float32), 5).tolist()
        [1.0, 2.0]
    """
    _check_samples(num_samples, 1, "Hutchinson")
    z = sample(num_samples)
    return (z * matmat(z)).mean(dim=1)


def hutchpp_diagonal(matmat: MatMat, sample: Sampler, num_samples: int) -> Tensor:
    """Diag++ (Baston & Nakatsukasa 2022): ``diag(Q Q^T A)`` exactly plus Hutchinson on the rest.

    ``Q`` spans ``A S`` for ``m/3`` random signs; ``diag(QQ^T A)_i = Σ_j Q_ij (AQ)_ij`` for
    symmetric ``A``, and the remainder ``(I - QQ^T) A`` is estimated with ``m/3`` probes.
    Exact when ``rank(A) <= m/3``.

    Example:
        >>> u = torch.randn(30, 2, dtype=torch.float64)
        >>> estimate = hutchpp_diagonal(lambda x: u @ (u.T @ x), rademacher(30, torch.float64), 9)
        >>> torch.allclose(estimate, (u * u).sum(1))
        True
    """
    _check_samples(num_samples, 3, "Diag++")
    k = num_samples // 3
    q, _ = torch.linalg.qr(matmat(sample(k)))
    aq = matmat(q)
    z = sample(num_samples - 2 * k)
    remainder = matmat(z) - q @ (aq.T @ z)
    return (q * aq).sum(dim=1) + (z * remainder).mean(dim=1)


def lanczos(matmat: MatMat, start: Tensor, num_steps: int) -> tuple[Tensor, Tensor, list[int]]:
    """Lanczos tridiagonalisation with full reorthogonalisation, one run per column of ``start``.

    Args:
        matmat: a symmetric ``A``'s product with ``[D, P]`` blocks.
        start: ``[D, P]`` non-zero start vectors, run side by side.
        num_steps: at most ``m`` steps (``<= D``).

    Returns:
        ``(alphas [m, P], betas [m - 1, P], lengths)``: column ``p``'s tridiagonal ``T_p`` has
        diagonal ``alphas[:lengths[p], p]`` and off-diagonal ``betas[:lengths[p] - 1, p]``
        (shorter than ``m`` where an invariant subspace was found).

    Memory: the ``m`` basis blocks, ``m D P`` numbers.
    """
    _, alphas, betas, lengths = lanczos_basis(matmat, start, num_steps)
    return alphas, betas, lengths


def lanczos_basis(matmat: MatMat, start: Tensor, num_steps: int) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """:func:`lanczos`, also returning the orthonormal Krylov bases ``Q_p``.

    Returns:
        ``(basis [m, D, P], alphas, betas, lengths)``: column ``p``'s basis vectors are
        ``basis[:lengths[p], :, p]`` (the rest zero), and ``A Q_p ≈ Q_p T_p``.
    """
    size, count = start.shape
    steps = max(1, min(num_steps, size))
    eps = torch.finfo(start.dtype).eps
    basis = start.new_zeros(steps, size, count)
    basis[0] = start / start.norm(dim=0)
    alphas, betas = start.new_zeros(steps, count), start.new_zeros(max(steps - 1, 0), count)
    lengths = [steps] * count
    active = torch.ones(count, dtype=torch.bool, device=start.device)
    for j in range(steps):
        w = matmat(basis[j])
        alphas[j] = (basis[j] * w).sum(0)
        if j == steps - 1:
            break
        scale = w.norm(dim=0)
        for _ in range(2):  # Gram-Schmidt twice keeps the basis orthogonal to working precision
            w = w - torch.einsum("jdp,jp->dp", basis[: j + 1], torch.einsum("jdp,dp->jp", basis[: j + 1], w))
        beta = w.norm(dim=0)
        stopped = active & (beta <= math.sqrt(eps) * scale)
        for p in stopped.nonzero().flatten().tolist():
            lengths[p] = j + 1
        active = active & ~stopped
        betas[j] = torch.where(active, beta, 0)
        basis[j + 1] = torch.where(active, w / beta.clamp_min(torch.finfo(beta.dtype).tiny), 0)
    return basis, alphas, betas, lengths


def ritz_pairs(alphas: Tensor, betas: Tensor, lengths: list[int]) -> list[tuple[Tensor, Tensor]]:
    """``[(θ_p, S_p)]`` with ``T_p = S_p diag(θ_p) S_p^T`` for each column of a :func:`lanczos` run.

    The Ritz values ``θ_p`` (ascending) and the eigenvectors ``S_p`` of the tridiagonal
    ``T_p`` (``[L_p]`` and ``[L_p, L_p]``, ``L_p = lengths[p]``), computed in float64.
    """
    pairs = []
    for p, length in enumerate(lengths):
        off = betas[: length - 1, p].to(torch.float64)
        tridiagonal = (
            torch.diag(alphas[:length, p].to(torch.float64)) + torch.diag(off, 1) + torch.diag(off, -1)
        )
        pairs.append(torch.linalg.eigh(tridiagonal))
    return pairs


def slq_logdet(
    matmat: MatMat, sample: Sampler, num_samples: int, num_steps: int, damping: float = 0.0
) -> Tensor:
    """Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017) for ``logdet(A + λI)``.

    ``logdet = tr log(A + λI) ≈ (1/m) Σ_p ‖z_p‖² Σ_k τ_pk² log θ_pk``, where ``θ_pk`` and
    ``τ_pk`` are the eigenvalues and first eigenvector components of the Lanczos tridiagonal
    ``T_p`` (``num_steps`` Lanczos steps) started at the probe ``z_p``. Needs ``A + λI`` positive definite: a
    non-positive Ritz value raises :class:`~curvops.errors.NotPositiveDefiniteError`.

    Example:
        >>> a = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
        >>> estimate = slq_logdet(lambda x: a @ x, rademacher(3, torch.float64), 4, 3)
        >>> round(estimate.item(), 4)  # log 8, exact here: a diagonal A is all probes alike
        2.0794
    """
    _check_samples(num_samples, 1, "SLQ")
    z = sample(num_samples)
    alphas, betas, lengths = lanczos(lambda v: matmat(v) + damping * v, z, num_steps)
    estimates = []
    for p, (ritz, vectors) in enumerate(ritz_pairs(alphas, betas, lengths)):
        if bool((ritz <= 0).any()):
            raise NotPositiveDefiniteError(
                f"SLQ found a Ritz value {ritz.min().item():.3e} <= 0: op + {damping}*I is not positive "
                "definite. Pass damping > 0 or use method='exact'."
            )
        estimates.append(z[:, p].square().sum() * (vectors[0].square() * ritz.log()).sum())
    return torch.stack(estimates).mean().to(z.dtype)
