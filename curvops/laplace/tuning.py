"""Choosing the prior precision ``τ`` (and a Gaussian's ``σ``): by the log marginal likelihood on
a grid or by Adam on ``log τ`` (``log σ``), or on a grid by the validation negative log-likelihood
of the predictive."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from ..linalg.checks import check_positive

PRIOR_METHODS = ("marglik", "grid", "nll")


def check_grid(grid: Any, place: dict[str, Any]) -> Tensor:
    """The 1-D grid of candidate ``τ`` (default ``logspace(-4, 4, 100)``) on ``place``, each ``> 0``."""
    message = f"grid must be a 1-D tensor or sequence of numbers > 0, got {grid!r}."
    if grid is None:
        grid = torch.logspace(-4, 4, 100)
    elif isinstance(grid, (str, bytes, Real)):
        raise TypeError(message)
    try:
        grid = grid if isinstance(grid, Tensor) else torch.as_tensor(grid, dtype=torch.float64)
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


PREDICTIVE_OPTIONS = ("method", "link_approx", "n_samples", "generator", "batch_size")


def check_tuning_arguments(
    method: str,
    gaussian: bool,
    val_data: Any,
    learn_sigma_noise: bool,
    predictive_options: dict[str, Any] | None,
) -> None:
    """Raise a ``ValueError`` naming the argument that does not go with ``method``."""
    if method == "nll" and val_data is None:
        raise ValueError("method='nll' tunes τ on validation data: pass val_data=(X, y) or its batches.")
    if method != "nll" and (val_data is not None or predictive_options is not None):
        raise ValueError(f"val_data and predictive_options are for method='nll', not {method!r}.")
    unknown = sorted(set(predictive_options or {}) - set(PREDICTIVE_OPTIONS))
    if unknown:
        raise ValueError(f"predictive_options takes {list(PREDICTIVE_OPTIONS)}, not {unknown}.")
    if learn_sigma_noise and not gaussian:
        raise ValueError("learn_sigma_noise learns a Gaussian likelihood's σ; it needs nn.MSELoss.")
    if learn_sigma_noise and method != "marglik":
        raise ValueError("learn_sigma_noise learns σ by the marginal likelihood: use method='marglik'.")


def grid_search(score: Callable[[Tensor], Tensor | float], start: Tensor, grid: Tensor) -> Tensor:
    """The value of ``grid`` with the largest ``score(τ)``, in the shape of ``start`` (for a
    per-parameter ``τ`` every parameter tensor gets the same value); the first of equal ones."""
    with torch.no_grad():
        values = torch.tensor([float(score(torch.full_like(start, value))) for value in grid.tolist()])
    return torch.full_like(start, grid[int(values.argmax())].item())


def maximize(objective: Callable[..., Tensor], starts: list[Tensor], steps: int, lr: float) -> list[Tensor]:
    """The positive variables after ``steps`` Adam steps on their logarithms from ``starts``
    (learning rate ``lr``, cosine annealed to zero) maximising ``objective(*variables)``."""
    logs = [start.log().clone().requires_grad_(True) for start in starts]
    optimizer = torch.optim.Adam(logs, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            (-objective(*(log.exp() for log in logs))).backward()
            optimizer.step()
            schedule.step()
    return [log.detach().exp() for log in logs]


def negative_log_likelihood(
    predicted: Tensor | tuple[Tensor, Tensor], targets: Tensor, likelihood: str, ignore_index: int | None
) -> tuple[Tensor, int]:
    """The summed negative log-likelihood of ``targets`` under a predictive, and its number of
    terms: class probabilities ``[B, C]`` (class indices; ``ignore_index`` left out), sigmoid
    probabilities (0/1 targets of their shape), or a Gaussian's ``(mean, variance)``."""
    if likelihood == "regression":
        mean, variance = predicted
        targets = targets.reshape(mean.shape).to(mean.dtype)
        terms = 0.5 * torch.log(2 * math.pi * variance) + (targets - mean).square() / (2 * variance)
        return terms.sum(), terms.numel()
    tiny = torch.finfo(predicted.dtype).tiny
    if likelihood == "binary":
        targets = targets.reshape(predicted.shape).to(predicted.dtype)
        terms = -(
            targets * predicted.clamp(min=tiny).log() + (1 - targets) * (1 - predicted).clamp(min=tiny).log()
        )
        return terms.sum(), terms.numel()
    kept = targets != ignore_index if ignore_index is not None else torch.ones_like(targets, dtype=torch.bool)
    chosen = predicted[kept].gather(1, targets[kept].unsqueeze(1)).squeeze(1)
    return -chosen.clamp(min=tiny).log().sum(), int(kept.sum())


def validation_negative_log_likelihood(
    predict: Callable[[Tensor], Tensor | tuple[Tensor, Tensor]],
    batches: Iterable,
    likelihood: str,
    ignore_index: int | None,
) -> float:
    """The mean negative log-likelihood per target of the validation ``batches`` of ``(X, y)``
    under ``predict`` (the predictive at the current ``τ``)."""
    total, count = 0.0, 0
    for index, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(f"val_data batch {index}: expected a pair (X, y), got {type(batch).__name__}.")
        x, y = batch
        value, terms = negative_log_likelihood(predict(x), y, likelihood, ignore_index)
        total, count = total + float(value), count + terms
    if count == 0:
        raise ValueError("val_data has no targets to score (empty, or every target ignore_index).")
    return total / count
