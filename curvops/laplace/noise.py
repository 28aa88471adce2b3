"""The noise ``σ`` of a Gaussian likelihood ``N(f, σ² I)`` for ``MSELoss``, as a variable: the
summed negative log-likelihood and the curvature's scale at any ``σ`` (both differentiable in it).

``MSELoss`` gives the squared errors ``E = Σ (f - y)²`` and the curvature ``K_MSE`` of ``E``; the
Gaussian's are ``L_sum(σ) = E / (2σ²) + (N/2) log(2πσ²)`` and ``K(σ) = K_MSE / (2σ²)``. Without a
``σ`` the likelihood is ``N(f, ½ I)`` (``L_sum = E``, ``K = K_MSE``): the base variance ``σ₀² = ½``.
``K(σ) = K(σ₀) · σ₀²/σ²``, so a posterior built at ``σ₀`` serves every ``σ`` with its curvature
divided by the ratio ``σ²/σ₀²`` (a temperature on ``K`` alone).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class GaussianNoise:
    """``σ`` against the ``σ₀`` the curvature was built with.

    Args:
        squared_errors: ``E = Σ (f - y)²`` at ``θ*`` (a 0-dim tensor).
        num_terms: ``N``, the number of squared errors.
        base_variance: the ``σ₀²`` the curvature was built with (``½`` without a ``σ``).

    Example:
        >>> noise = GaussianNoise(torch.tensor(4.0, dtype=torch.float64), 8, 0.5)
        >>> float(noise.ratio(torch.tensor(1.0)))  # σ² / σ₀² = 1 / ½
        2.0
        >>> math.isclose(float(noise.loss(torch.tensor(1.0))), 2.0 + 4 * math.log(2 * math.pi))
        True
    """

    def __init__(self, squared_errors: Tensor, num_terms: float, base_variance: float) -> None:
        self.squared_errors = squared_errors
        self.num_terms = num_terms
        self.base_variance = base_variance

    def ratio(self, sigma: float | Tensor) -> float | Tensor:
        """``σ² / σ₀²``: ``K(σ) = K(σ₀) / ratio``."""
        return sigma**2 / self.base_variance

    def loss(self, sigma: float | Tensor) -> Tensor:
        """``L_sum(σ) = E / (2σ²) + (N/2) log(2πσ²)``."""
        variance = torch.as_tensor(sigma, dtype=self.squared_errors.dtype) ** 2
        return self.squared_errors / (2 * variance) + 0.5 * self.num_terms * torch.log(2 * math.pi * variance)

    def maximum_likelihood(self) -> float:
        """``σ`` that minimises ``L_sum``: ``sqrt(E / N)`` (a start for learning it)."""
        return max(math.sqrt(float(self.squared_errors) / max(self.num_terms, 1.0)), 1e-6)
