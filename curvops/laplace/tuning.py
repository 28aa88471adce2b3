"""Choosing the prior precision ``τ`` by the log marginal likelihood: a grid, or Adam on ``log τ``."""

from __future__ import annotations

from numbers import Real
from typing import Any

import torch
from torch import Tensor

from ..linalg.checks import check_positive
from .posterior import Posterior

PRIOR_METHODS = ("marglik", "grid")


def check_grid(grid: Any, place: dict[str, Any]) -> Tensor:
    """The 1-D grid of candidate ``τ`` (default ``logspace(-4, 4, 100)``) on ``place``, each ``> 0``."""
    message = f"grid must be a 1-D tensor or sequence of numbers > 0, got {grid!r}."
    if grid is None:
        grid = torch.logspace(-4, 4, 100)
    elif isinstance(grid, (str, bytes, Real)):
        raise TypeError(message)
    try:
        grid = torch.as_tensor(grid)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(message) from error
    if grid.dtype == torch.bool or grid.is_complex():
        raise TypeError(message)
    grid = grid.to(**place).reshape(-1)
    if grid.numel() == 0:
        raise ValueError("grid is empty.")
    for value in grid.tolist():
        check_positive(value, "every grid value")
    return grid


def grid_search(posterior: Posterior, start: Tensor, temperature: float, grid: Tensor) -> Tensor:
    """The value of ``grid`` with the largest log marginal likelihood, in the shape of ``start``
    (for a per-parameter ``τ`` every parameter tensor gets the same value)."""
    with torch.no_grad():
        values = torch.stack(
            [
                posterior.log_marginal_likelihood(tau, temperature)
                for tau in (torch.full_like(start, value) for value in grid.tolist())
            ]
        )
    return torch.full_like(start, grid[int(values.argmax())].item())


def maximize_marglik(
    posterior: Posterior, start: Tensor, temperature: float, steps: int, lr: float
) -> Tensor:
    """``τ`` after ``steps`` Adam steps on ``log τ`` from ``start`` (learning rate ``lr``, cosine
    annealed to zero) maximising the log marginal likelihood; ``τ`` has the shape of ``start``."""
    log_tau = start.log().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([log_tau], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = -posterior.log_marginal_likelihood(log_tau.exp(), temperature)
            loss.backward()
            optimizer.step()
            schedule.step()
    return log_tau.detach().exp()
