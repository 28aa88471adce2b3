"""Posterior predictives: the linearised network (GLM) with the probit, Laplace-bridge or a
Monte-Carlo link, and Monte-Carlo over sampled weights."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..linalg import CurvatureOperator
from ..linalg.checks import check_choice, check_generator, check_positive_int
from ..nn.batches import data_count
from .network import Network

PREDICTIVE_METHODS = ("glm", "mc")
LINK_APPROXIMATIONS = ("probit", "bridge", "mc")


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


def laplace_bridge(mean: Tensor, variance: Tensor) -> Tensor:
    """The Laplace bridge (Hobbhahn, Kristiadi & Hennig, 2022): the class probabilities of logits
    ``N(μ, Σ)`` over ``K`` classes as the mean of the Dirichlet ``Dir(α)`` the bridge maps them to,

    ``α_k = (1 - 2/K + e^{μ_k} Σ_l e^{-μ_l} / K²) / Σ_kk``,  ``p_k = α_k / Σ_l α_l``,

    computed in log space (``log α_k = logaddexp(log(1 - 2/K), μ_k + logsumexp(-μ) - 2 log K)
    - log Σ_kk``, then a softmax), so large logits and tiny variances stay finite. ``mean``
    ``[B, K]``, ``variance`` ``[B, K]`` (the diagonal of ``Σ``); returns ``[B, K]``.

    Example:
        >>> mean, variance = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.5, 1.0, 2.0]])
        >>> alpha = (1 - 2 / 3 + mean.exp() * (-mean).exp().sum() / 9) / variance
        >>> torch.allclose(laplace_bridge(mean, variance), alpha / alpha.sum())
        True
    """
    classes = mean.shape[-1]
    tiny = torch.finfo(variance.dtype).tiny
    shifted = mean + torch.logsumexp(-mean, dim=-1, keepdim=True) - 2 * math.log(classes)
    constant = math.log(1 - 2 / classes) if classes > 2 else -math.inf
    log_alpha = torch.logaddexp(torch.full_like(shifted, constant), shifted) - variance.clamp(min=tiny).log()
    return torch.softmax(log_alpha, dim=-1)


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
    ``link(μ / sqrt(1 + (π/8) diag Σ))``, the Laplace ``bridge`` (:func:`laplace_bridge`, softmax
    outputs only), or the mean of ``link(μ_b + L_b ε)`` over ``n_samples`` draws,
    ``L_b L_b^T = Σ_b``.
    """
    variance = covariance.diagonal(dim1=1, dim2=2)
    if likelihood == "regression":
        return mean.reshape(shape), variance.reshape(shape) + noise
    if link_approx == "bridge":
        if likelihood != "classification":
            raise ValueError(
                "link_approx='bridge' maps softmax logits to a Dirichlet; it needs CrossEntropyLoss. "
                "Use 'probit' or 'mc' for BCEWithLogitsLoss."
            )
        return laplace_bridge(mean, variance).reshape(shape)
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


class Predictives:
    """The predictive methods of :class:`~curvops.laplace.Laplace` (its ``_network``,
    :attr:`~curvops.laplace.Laplace.posterior_covariance`, ``likelihood``, ``sigma_noise`` and
    :meth:`~curvops.laplace.Laplace.sample`)."""

    def glm_distribution(self, x: Tensor, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """The linearised network's Gaussian over the outputs: ``f(x_b) ~ N(f*(x_b), J_b P^-1 J_b^T)``.

        Per chunk of ``batch_size`` test points: the per-datum Jacobians ``J_b`` (``[C, D]``
        each, by ``vmap`` of reverse mode over the data), ``P^-1`` applied to their ``B·C``
        rows at once, and ``Σ_b = J_b (P^-1 J_b^T)``. Never the Jacobian of all test points
        at once: memory ``O(B C D)`` per chunk (default ``B`` keeps it near 2^22 entries).

        Args:
            x: test inputs ``[B, ...]`` shaped like the training inputs.
            batch_size: test points per chunk.

        Returns:
            The pair ``(mean, covariance)`` of ``f*(x)`` flattened to ``[B, C]`` and the
            ``[B, C, C]`` covariances.

        Example:
            >>> model = torch.nn.Linear(2, 3).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 3, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data)
            >>> mean, cov = la.glm_distribution(torch.randn(4, 2, dtype=torch.float64))
            >>> mean.shape, cov.shape
            (torch.Size([4, 3]), torch.Size([4, 3, 3]))
        """
        x = self._network.prepare_inputs(x)
        mean = self._network.forward(self._theta, x).detach().reshape(data_count(x), -1)
        return mean, glm_covariances(self._network, self.posterior_covariance, x, batch_size)

    def predictive(
        self,
        x: Tensor,
        method: str = "glm",
        link_approx: str = "probit",
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The posterior predictive at test inputs ``x``.

        Classification (``CrossEntropyLoss``): class probabilities ``[B, C]``. With
        ``method="glm"`` the logits are ``N(μ_b, Σ_b)`` (:meth:`glm_distribution`) and

        - ``link_approx="probit"``: ``softmax(μ_b / sqrt(1 + (π/8) diag Σ_b))``;
        - ``link_approx="bridge"``: the Laplace bridge's Dirichlet mean, ``α_k / Σ_l α_l`` with
          ``α_k = (1 - 2/C + e^{μ_k} Σ_l e^{-μ_l} / C²) / Σ_b,kk`` (:func:`laplace_bridge`;
          softmax outputs only);
        - ``link_approx="mc"``: the mean of ``softmax(μ_b + L_b ε)`` over ``n_samples`` draws,
          ``L_b L_b^T = Σ_b``.

        With ``method="mc"`` the mean of ``softmax(f(x, θ_s))`` over ``n_samples`` posterior
        samples ``θ_s`` (:meth:`sample`). ``BCEWithLogitsLoss`` likewise with the elementwise
        ``sigmoid`` (probit: ``sigmoid(μ / sqrt(1 + (π/8) σ²))``), probabilities of the output's
        shape.

        Regression (``MSELoss``): ``(mean, variance)``, each of the output's shape: with
        ``"glm"`` ``f*(x)`` and ``diag Σ_b`` (``link_approx`` is not used), with ``"mc"`` the
        mean and variance of ``f(x, θ_s)`` over the samples; ``σ²`` added to the variance when
        ``sigma_noise`` was given.

        Args:
            x: test inputs ``[B, ...]`` shaped like the training inputs.
            method: ``"glm"`` or ``"mc"``.
            link_approx: ``"probit"``, ``"bridge"`` (softmax only) or ``"mc"`` (GLM classification).
            n_samples: Monte-Carlo draws (logits for the ``"mc"`` link, weights for ``"mc"``).
            generator: the random source of the draws.
            batch_size: test points per Jacobian chunk (see :meth:`glm_distribution`).

        Example:
            >>> model = torch.nn.Linear(2, 3).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 3, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data)
            >>> probabilities = la.predictive(torch.randn(4, 2, dtype=torch.float64))
            >>> probabilities.shape, torch.allclose(probabilities.sum(1), torch.ones(4, dtype=torch.float64))
            (torch.Size([4, 3]), True)
        """
        check_predictive_arguments(method, link_approx, n_samples, generator, batch_size)
        x = self._network.prepare_inputs(x)
        output_shape = self._network.output_shape
        if self.likelihood == "classification" and len(output_shape) != 1:
            raise ValueError(
                "predictive needs CrossEntropyLoss outputs of shape [B, C] (classes on axis 1), got "
                f"[B, {', '.join(map(str, output_shape))}]."
            )
        noise = 0.0 if self.sigma_noise is None else self.sigma_noise**2
        if method == "mc":
            outputs = self._network.sampled_outputs(self.sample(n_samples, generator), x)  # [S, B, ...]
            return sampled_predictive(outputs, self.likelihood, noise)
        mean, covariance = self.glm_distribution(x, batch_size)
        shape = (data_count(x), *output_shape)
        return glm_predictive(
            mean, covariance, shape, self.likelihood, link_approx, n_samples, generator, noise
        )
