"""The validation negative log-likelihood of the GLM predictive as a function of ``τ`` with its
exact gradient, for ``optimize_prior_precision(method="nll")`` to refine the grid's best ``τ``.

The GLM's output covariance ``Σ_b = J_b P^-1 J_b^T``, ``P = K/T + diag(τ_g)``, has
``∂Σ_b/∂τ_g = -J_b P^-1 E_g P^-1 J_b^T`` (``E_g`` the coordinates of parameter group ``g``): with
``S = P^-1 J^T`` (one structured solve per step) it is ``-Σ_{d∈g} S_d,bc S_d,be``. The probit and
Laplace-bridge links and the Gaussian's variance are differentiable in ``Σ``, so autograd takes
the rest. The Monte-Carlo link and weight sampling are not (the grid alone serves them), nor is a
block that mixes several ``τ`` (made dense per ``τ``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .predictive import glm_predictive
from .tuning import negative_log_likelihood

JACOBIAN_CACHE = 2**26
"""Numbers of validation Jacobians kept across the Adam steps (above: made again every step)."""


class _GLMCovariance(torch.autograd.Function):
    """``Σ = J P(τ)^-1 J^T`` ``[b, C, C]`` with the exact gradient in ``τ`` (0-dim or ``[G]``)."""

    @staticmethod
    def forward(ctx: Any, taus: Tensor, jacobians: Tensor, covariance: Callable, group_of: Tensor) -> Tensor:
        data, outputs, size = jacobians.shape
        solved = covariance(taus.detach()) @ jacobians.reshape(-1, size).T  # [D, b·C]
        solved = solved.reshape(size, data, outputs)
        ctx.save_for_backward(solved, group_of)
        ctx.groups, ctx.scalar = (1 if taus.ndim == 0 else taus.numel()), taus.ndim == 0
        sigma = torch.einsum("bcd,dbe->bce", jacobians, solved)
        return 0.5 * (sigma + sigma.mT)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        solved, group_of = ctx.saved_tensors
        per_coordinate = -torch.einsum("dbc,bce,dbe->d", solved, grad, solved)
        if ctx.scalar:
            return per_coordinate.sum(), None, None, None
        per_group = per_coordinate.new_zeros(ctx.groups).index_add_(0, group_of, per_coordinate)
        return per_group, None, None, None


def differentiable(laplace: Any, prior_precision: Tensor, options: dict[str, Any]) -> bool:
    """Whether the validation NLL at these options is differentiable in ``τ`` here."""
    method, link = options.get("method", "glm"), options.get("link_approx", "probit")
    if method != "glm" or (laplace.likelihood != "regression" and link not in ("probit", "bridge")):
        return False
    posterior = laplace._posterior
    return not any(posterior._mixed(block, prior_precision) for block in posterior.blocks)


def validation_objective(
    laplace: Any, batches: Iterable, options: dict[str, Any]
) -> Callable[[Tensor], Tensor]:
    """``τ ↦`` the mean validation NLL of the GLM predictive (differentiable; ``τ`` 0-dim or ``[G]``).

    The validation Jacobians are computed once where they fit in :data:`JACOBIAN_CACHE` numbers,
    else again at every call."""
    network, posterior = laplace._network, laplace._posterior
    group_of = torch.empty(laplace.mean.numel(), dtype=torch.long, device=laplace.mean.device)
    for block in posterior.blocks:
        group_of[block.index] = block.groups
    ignore = getattr(laplace.loss_fn, "ignore_index", None)
    noise = 0.0 if laplace.sigma_noise is None else laplace.sigma_noise**2
    link, chunk = options.get("link_approx", "probit"), options.get("batch_size")
    prepared = []
    for x, y in batches:
        x = network.prepare_inputs(x)
        with torch.no_grad():
            mean = network.forward(network.theta, x).detach()
        prepared.append((x, mean.reshape(mean.shape[0], -1), tuple(mean.shape), y.to(mean.device)))
    rows = sum(mean.shape[0] for _, mean, _, _ in prepared)
    kept = rows * prepared[0][1].shape[1] * laplace.mean.numel() <= JACOBIAN_CACHE
    cached = [list(network.jacobians(x, chunk)) for x, *_ in prepared] if kept else None

    def covariance(taus: Tensor) -> Any:
        return posterior.covariance(taus, laplace._curvature_temperature)

    def objective(taus: Tensor) -> Tensor:
        total, count = 0.0, 0
        for number, (x, mean, shape, y) in enumerate(prepared):
            chunks = cached[number] if cached is not None else network.jacobians(x, chunk)
            sigma = torch.cat([_GLMCovariance.apply(taus, j, covariance, group_of) for j in chunks])
            predicted = glm_predictive(mean, sigma, shape, laplace.likelihood, link, 1, None, noise)
            value, terms = negative_log_likelihood(predicted, y, laplace.likelihood, ignore)
            total, count = total + value, count + terms
        return total / count

    return objective


def refine(
    laplace: Any, start: Tensor, batches: Iterable, options: dict[str, Any], steps: int, lr: float
) -> Tensor:
    """``τ`` after ``steps`` Adam steps on ``log τ`` from ``start`` (learning rate ``lr``, cosine
    annealed) minimising :func:`validation_objective`; ``start`` where that does not lower it."""
    objective = validation_objective(laplace, batches, options)
    log_tau = start.log().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([log_tau], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            objective(log_tau.exp()).backward()
            optimizer.step()
            schedule.step()
    refined = log_tau.detach().exp()
    with torch.no_grad():
        better = bool(torch.isfinite(refined).all()) and float(objective(refined)) <= float(objective(start))
    return refined if better else start
