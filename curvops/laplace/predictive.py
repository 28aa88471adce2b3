"""Posterior predictives: the linearised network (GLM) with the probit or a Monte-Carlo link, and
Monte-Carlo over sampled weights."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..linalg import CurvatureOperator
from ..linalg.checks import check_choice, check_generator, check_positive_int
from .network import Network

PREDICTIVE_METHODS = ("glm", "mc")
LINK_APPROXIMATIONS = ("probit", "mc")


def check_predictive_arguments(
    method: str, link_approx: str, n_samples: int, generator: torch.Generator | None, batch_size: int | None
) -> None:
    """Raise a ``ValueError`` (``TypeError``) naming the argument unless every one is valid."""
    check_choice(method, PREDICTIVE_METHODS, "predictive method")
    check_choice(link_approx, LINK_APPROXIMATIONS, "link approximation (link_approx)")
    check_positive_int(n_samples, "n_samples")
    check_generator(generator)
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")


def glm_covariances(
    network: Network, covariance: CurvatureOperator, x: Tensor, batch_size: int | None
) -> Tensor:
    """The linearised network's output covariances ``Σ_b = J_b P^-1 J_b^T``: ``[B, C, C]``.

    ``covariance`` is ``P^-1``; per chunk of per-datum Jacobians ``J_b`` (``[B, C, D]``) it is
    applied to their ``B·C`` rows at once.
    """
    parts = []
    for jac in network.jacobians(x, batch_size):
        rows, outputs = jac.shape[0], jac.shape[1]
        solved = covariance @ jac.reshape(rows * outputs, -1).T  # [D, B*C]
        cov = torch.einsum("bcd,dbe->bce", jac, solved.reshape(-1, rows, outputs))
        parts.append(0.5 * (cov + cov.transpose(1, 2)))
    return torch.cat(parts)


def link(logits: Tensor, likelihood: str) -> Tensor:
    """``softmax`` over the class axis (the last but the sample axes) for ``"classification"``,
    else the elementwise ``sigmoid``."""
    if likelihood == "classification":
        return torch.softmax(logits, dim=-1)
    return torch.sigmoid(logits)


def glm_predictive(
    mean: Tensor,
    covariance: Tensor,
    shape: tuple[int, ...],
    likelihood: str,
    link_approx: str,
    n_samples: int,
    generator: torch.Generator | None,
    noise: float,
) -> Tensor | tuple[Tensor, Tensor]:
    """The GLM predictive from logits ``N(mean_b, covariance_b)`` (``[B, C]``, ``[B, C, C]``).

    Regression: ``(mean, diag Σ_b + σ²)`` in ``shape``. Classification: ``probit``
    ``link(μ / sqrt(1 + (π/8) diag Σ))``, or the mean of ``link(μ_b + L_b ε)`` over
    ``n_samples`` draws, ``L_b L_b^T = Σ_b``.
    """
    variance = covariance.diagonal(dim1=1, dim2=2)
    if likelihood == "regression":
        return mean.reshape(shape), variance.reshape(shape) + noise
    if link_approx == "probit":
        return link((mean / torch.sqrt(1 + math.pi / 8 * variance)).reshape(shape), likelihood)
    values, vectors = torch.linalg.eigh(covariance)
    roots = vectors * values.clamp(min=0).sqrt().unsqueeze(1)  # [B, C, C], roots @ roots^T = Σ_b
    draws = torch.randn(n_samples, *mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    logits = mean + torch.einsum("bce,sbe->sbc", roots, draws)
    return link(logits.reshape(n_samples, *shape), likelihood).mean(0)


def sampled_predictive(outputs: Tensor, likelihood: str, noise: float) -> Tensor | tuple[Tensor, Tensor]:
    """The Monte-Carlo predictive from outputs at sampled parameters ``[S, B, ...]``.

    Regression: ``(mean, variance + σ²)`` over the samples; otherwise the mean of the link.
    """
    if likelihood == "regression":
        return outputs.mean(0), outputs.var(0, unbiased=False) + noise
    return link(outputs, likelihood).mean(0)
