"""The public class :class:`Laplace`: the parts of this package put together."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import Shards
from ..linalg import CurvatureOperator
from ..linalg.checks import check_choice, check_generator, check_positive, check_positive_int
from ..nn.batches import data_count
from ..nn.losses import LossAdapter
from ..nn.model import ModelData
from ..nn.options import check_curvature
from .curvature import (
    CURVATURES,
    build_curvature,
    curvature_scale,
    likelihood_of,
    likelihood_scale,
    read_data,
    summed_negative_log_likelihood,
)
from .network import Network
from .posterior import Posterior, check_prior_precision, warn_unless_minimum
from .predictive import check_predictive_arguments, glm_covariances, glm_predictive, sampled_predictive
from .tuning import PRIOR_METHODS, check_grid, grid_search, maximize_marglik


class Laplace:
    """The Laplace approximation ``N(θ*, P^-1)``, ``P = K/T + τ I``, of a trained network.

    ``θ*`` are the parameters' values now (they are copied: training on afterwards does not
    change this object). ``K`` is the curvature of the summed negative log-likelihood
    ``L_sum = Σ_n ℓ_n`` over ``data``: a curvops operator of ``loss_fn`` has the loss's own
    reduction, so for ``reduction="mean"`` it is multiplied by ``N``, the number of loss
    terms the mean divides by (every element for ``MSELoss``/``BCEWithLogitsLoss``, every
    non-ignored target for ``CrossEntropyLoss``; see :mod:`curvops.nn.losses`). The
    log-likelihood is ``-L_sum(θ*)`` in terms of the loss as given: for ``CrossEntropyLoss``
    and ``BCEWithLogitsLoss`` that is exact; ``MSELoss`` sums ``(f - y)²``, the negative
    log-likelihood of ``N(f, ½ I)`` without its constant ``(N/2) log π`` (which does not
    depend on ``τ``). Pass ``sigma_noise=σ`` with ``MSELoss`` for the Gaussian ``N(f, σ² I)``
    instead: ``L_sum = Σ (f - y)² / (2σ²) + (N/2) log(2πσ²)``, ``K = K_MSE / (2σ²)``, and
    regression predictives add ``σ²``.

    Validation: a prior precision or temperature that is not a finite number ``> 0``, the
    wrong number of per-parameter precisions, an unknown curvature name and a curvature
    operator of the wrong size raise ``ValueError``. A :class:`UserWarning` says that ``θ*``
    is not at a minimum of the loss plus any L2 penalty (weight decay) ``(c/2) ‖θ‖²``,
    ``c >= 0``: when for every ``c`` the damped Newton step ``s_c = P^-1 (∇L_sum(θ*)/T + c θ*)``
    (``P`` with the initial ``τ``) is longer in the posterior's metric than a typical
    posterior sample's distance from the mean, ``min_c s_c^T P s_c > D``; i.e. the minimum of
    the quadratic model lies more than ``√D`` posterior standard deviations from ``θ*``.
    Train longer (the approximation expands the loss around a minimum).

    Over shards (:mod:`curvops.distributed`): with a process group, ``data`` is this rank's
    shard of the training data (it may be empty). ``K`` is the union's (the builders get
    ``group``), and ``L_sum(θ*)``, ``∇L_sum(θ*)`` and ``N`` are summed over the ranks, so the
    posterior, the evidence, the tuned ``τ``, samples from one generator seed and the
    predictives are those of one process on all the data, on every rank. A prebuilt
    ``curvature`` must be the union's itself (built with the same ``group``). The predictives
    are computed on each rank's own test inputs, without collectives.

    Args:
        model: the trained network; in eval mode if it has dropout or batch norm.
        loss_fn: ``nn.CrossEntropyLoss`` (classification, softmax), ``nn.BCEWithLogitsLoss``
            (independent binary outputs, sigmoid) or ``nn.MSELoss`` (regression), with
            reduction ``"mean"`` or ``"sum"``, without class weights or label smoothing.
        data: a re-iterable of ``(X, y)`` training batches, or one pair ``(X, y)`` with a tensor ``X``.
        curvature: ``"kfac"``, ``"ekfac"``, ``"tkfac"``, ``"tekfac"`` (the type-2 Fisher's
            Kronecker-factored approximations, one block per parameter tensor: see
            :func:`~curvops.KFAC`, :func:`~curvops.EKFAC`, :func:`~curvops.TKFAC`),
            ``"diagonal"`` (the GGN's exact diagonal, from per-datum Jacobians) or ``"full"``
            (the dense GGN: ``D²`` memory), or a prebuilt :class:`~curvops.CurvatureOperator`
            of ``loss_fn`` over ``data`` (its reduction is read from ``loss_fn`` as above); a
            matrix-free model operator (:class:`~curvops.GGN`, ...) is made dense once.
        prior_precision: ``τ > 0``: one number, or one per parameter tensor of ``params`` (in
            that order; a layer's weight and bias are two), a sequence or 1-D tensor.
        temperature: ``T > 0``; ``T < 1`` sharpens the posterior ("cold posterior").
        params: the parameters the posterior is over (default: the model's trainable ones);
            the others stay at their values (a change of one of them, or of a buffer, raises
            :class:`~curvops.errors.StaleParametersError` at the next prediction).
        sigma_noise: ``σ > 0`` of a Gaussian likelihood, with ``MSELoss`` only (see above).
        curvature_options: keyword arguments for the Kronecker builders (``fisher_type``,
            default ``"type-2"``; ``bias``, ``kfac_approx``, ``unsupported``, ...).
        group: the process group whose ranks hold shards of ``data`` (``None``: the default group
            when ``torch.distributed`` is initialized); ``"local"`` keeps this process's data alone.

    Attributes:
        mean: ``θ*``, ``[D]``.
        curvature: ``K``, the operator of the summed negative log-likelihood (``[D, D]``).
        loss: ``L_sum(θ*)``, a 0-dim tensor.
        num_terms: ``N``, the number of loss terms in the data (of every shard).
        param_names: the names of the parameter tensors, in the order of ``θ``.
        likelihood: ``"classification"`` (softmax), ``"binary"`` (sigmoid) or ``"regression"``.

    Example:
        >>> layers = [torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)]
        >>> model = torch.nn.Sequential(*layers).double()
        >>> x = torch.randn(16, 2, dtype=torch.float64)
        >>> data = [(x, (x[:, 0] > 0).long())]
        >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data, prior_precision=0.5)
        >>> la.mean.shape, la.curvature.shape, la.num_terms
        (torch.Size([17]), (17, 17), 16.0)
        >>> la.posterior_precision.block("2.bias").shape
        (2, 2)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        data: Iterable,
        curvature: str | CurvatureOperator = "kfac",
        prior_precision: float | Sequence[float] | Tensor = 1.0,
        temperature: float = 1.0,
        params: Sequence[nn.Parameter] | None = None,
        sigma_noise: float | None = None,
        curvature_options: dict[str, Any] | None = None,
        group: Any = None,
    ) -> None:
        check_curvature(curvature, CURVATURES)
        shards = Shards.of(group)
        self._loss_adapter = LossAdapter(loss_fn, likelihood=True, what="Laplace")
        self._loss_adapter.check_sampling("Laplace")
        self.loss_fn = loss_fn
        self.likelihood = likelihood_of(loss_fn)
        self.sigma_noise = self._check_sigma_noise(sigma_noise)
        self.model = model
        self._model = ModelData(model, data, params, allow_empty=shards.active)
        self.param_names = list(self._model.names)
        self._theta = {name: p.detach().clone() for name, p in self._model.param_dict().items()}
        self.mean = torch.cat([t.reshape(-1) for t in self._theta.values()])
        self._prior_precision = self._check_prior_precision(prior_precision)
        self._temperature = check_positive(temperature, "temperature")

        fit = read_data(self._model, self._loss_adapter, self._theta, shards)
        self.num_terms = fit.num_terms
        self.loss = summed_negative_log_likelihood(fit, sigma_noise)
        self._network = Network(self._model, self._theta, fit.output_shape, fit.input_example)
        op = build_curvature(curvature, self._model, self._loss_adapter, curvature_options, group)
        scale = curvature_scale(curvature, self._loss_adapter, self.num_terms, sigma_noise)
        self._posterior = Posterior(op, scale, self._theta, self.loss)
        self.curvature = self._posterior.curvature
        gradient = fit.gradient * likelihood_scale(sigma_noise) / self._temperature
        warn_unless_minimum(self.posterior_covariance, gradient, self.mean)

    def __repr__(self) -> str:
        tau = self._prior_precision
        prior = (
            f"{tau.item():.4g}" if tau.ndim == 0 else "[" + ", ".join(f"{t:.4g}" for t in tau.tolist()) + "]"
        )
        return (
            f"Laplace(likelihood={self.likelihood!r}, D={self.mean.numel()}, "
            f"curvature={type(self.curvature).__name__}, prior_precision={prior}, "
            f"temperature={self._temperature:g})"
        )

    def _check_sigma_noise(self, sigma_noise: float | None) -> float | None:
        """``σ`` of a Gaussian likelihood: ``None``, or a number ``> 0`` with ``MSELoss``."""
        if sigma_noise is None:
            return None
        if self.likelihood != "regression":
            raise ValueError("sigma_noise is the noise of a Gaussian likelihood; it needs nn.MSELoss.")
        return check_positive(sigma_noise, "sigma_noise")

    def _check_prior_precision(self, value: Any) -> Tensor:
        """``τ`` as a 0-dim tensor or one value per parameter tensor ``[G]``; checked."""
        place = {"dtype": self.mean.dtype, "device": self.mean.device}
        return check_prior_precision(value, self.param_names, place)

    # ----------------------------------------------------------------- properties
    @property
    def prior_precision(self) -> Tensor:
        """The prior precision ``τ``, a 0-dim tensor or ``[G]`` (one per parameter tensor); settable.

        Setting it checks the value as the constructor does.

        Example:
            >>> model = torch.nn.Linear(2, 2).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data)
            >>> la.prior_precision = [1.0, 2.0]  # weight, bias
            >>> la.prior_precision.tolist()
            [1.0, 2.0]
        """
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | Sequence[float] | Tensor) -> None:
        self._prior_precision = self._check_prior_precision(value)

    @property
    def temperature(self) -> float:
        """The temperature ``T > 0``; settable (checked).

        Example:
            >>> model = torch.nn.Linear(2, 2).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data, temperature=0.5)
            >>> la.temperature
            0.5
        """
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = check_positive(value, "temperature")

    @property
    def posterior_precision(self) -> CurvatureOperator:
        """``P = K/T + τ I`` as a structured operator (``[D, D]``), damped block by block.

        A block with one ``τ`` is ``K_b/T + τ I`` (a :class:`~curvops.Sum` with a shift, whose
        ``logdet`` and ``inverse`` are exact through ``K_b``'s structure); a block mixing
        several is dense.

        Example:
            >>> model = torch.nn.Linear(2, 2).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data, prior_precision=2.0)
            >>> p = la.posterior_precision.to_dense()
            >>> torch.allclose(p, la.curvature.to_dense() + 2.0 * torch.eye(6, dtype=torch.float64))
            True
        """
        return self._posterior.precision(self._prior_precision, self._temperature)

    @property
    def posterior_covariance(self) -> CurvatureOperator:
        """The posterior covariance ``P^-1`` as a structured operator (``[D, D]``), exact block by block.

        Example:
            >>> model = torch.nn.Linear(2, 2).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data)
            >>> eye = torch.eye(6, dtype=torch.float64)
            >>> torch.allclose(la.posterior_covariance @ la.posterior_precision.to_dense(), eye)
            True
        """
        return self._posterior.covariance(self._prior_precision, self._temperature)

    # ----------------------------------------------------------------- evidence
    def log_marginal_likelihood(
        self, prior_precision: float | Sequence[float] | Tensor | None = None
    ) -> Tensor:
        """Laplace's log evidence: ``log p(D) ≈ -L_sum(θ*)/T - ½ (logdet P - Σ_l D_l log τ_l)
        - ½ Σ_l τ_l ‖θ*_l‖²``.

        The sums run over the parameter tensors ``l`` (``D_l`` entries each); for a scalar
        ``τ`` they are ``D log τ`` and ``τ ‖θ*‖²``. ``logdet P = Σ_b Σ_i log(λ_bi / T + τ_b)``
        over the eigenvalues ``λ_bi`` of each block of ``K`` (computed once and cached), or a
        Cholesky factorisation for a block that mixes several ``τ``. The constant
        ``-(D/2) log 2π`` of the Gaussian integral cancels against the prior's normaliser and
        does not appear.

        Args:
            prior_precision: ``τ`` to evaluate at (default: :attr:`prior_precision`); a number
                or one per parameter tensor.

        Returns:
            A 0-dim tensor.

        Example:
            >>> model = torch.nn.Linear(2, 2).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data, curvature="full")
            >>> p = la.posterior_precision.to_dense()
            >>> theta = la.mean
            >>> expected = -la.loss - 0.5 * torch.logdet(p) - 0.5 * theta @ theta  # τ = 1
            >>> torch.allclose(la.log_marginal_likelihood(), expected)
            True
        """
        prior_precision = (
            self._prior_precision if prior_precision is None else self._check_prior_precision(prior_precision)
        )
        with torch.no_grad():
            return self._posterior.log_marginal_likelihood(prior_precision, self._temperature)

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        prior_precision: float | Sequence[float] | Tensor | None = None,
        steps: int = 300,
        lr: float = 0.1,
        grid: Tensor | None = None,
    ) -> Tensor:
        """Choose ``τ`` by the log marginal likelihood; set :attr:`prior_precision` and return it.

        - ``"marglik"``: Adam on ``log τ`` (``steps`` steps, learning rate ``lr`` annealed to
          zero on a cosine schedule) maximising :meth:`log_marginal_likelihood`. Every step
          costs ``O(D)``: ``logdet P = Σ_i log(λ_i / T + τ_l)`` reuses the eigenvalues of ``K``'s
          blocks, computed once (a block that mixes several ``τ`` is refactorised per step).
          The shape of ``τ`` — one number, or one per parameter tensor — is that of the start,
          ``prior_precision`` (default: the current :attr:`prior_precision`).
        - ``"grid"``: the value of ``grid`` (default ``torch.logspace(-4, 4, 100)``) with the
          largest log marginal likelihood. For a per-parameter ``τ`` every parameter tensor gets
          the same grid value.

        Args:
            method: ``"marglik"`` or ``"grid"``.
            prior_precision: the start (marglik) or the shape (grid) of ``τ``.
            steps: Adam steps.
            lr: Adam's initial learning rate on ``log τ``.
            grid: 1-D positive candidate values of ``τ``.

        Returns:
            The new ``τ``, 0-dim or ``[G]``.

        Example:
            >>> model = torch.nn.Linear(2, 2).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data)
            >>> before = la.log_marginal_likelihood()
            >>> tau = la.optimize_prior_precision()
            >>> bool(la.log_marginal_likelihood() >= before), bool(tau > 0)
            (True, True)
        """
        check_choice(method, PRIOR_METHODS, "prior precision method")
        check_positive_int(steps, "steps")
        check_positive(lr, "lr")
        grid = check_grid(grid, {"dtype": self.mean.dtype, "device": self.mean.device})
        start = (
            self._prior_precision if prior_precision is None else self._check_prior_precision(prior_precision)
        )
        if method == "grid":
            self._prior_precision = grid_search(self._posterior, start, self._temperature, grid)
        else:
            tau = maximize_marglik(self._posterior, start, self._temperature, steps, lr)
            self._prior_precision = self._check_prior_precision(tau)
        return self._prior_precision

    # ----------------------------------------------------------------- sampling
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws ``θ* + P^-1/2 z``, ``z ~ N(0, I)``, from the posterior: ``[n, D]``.

        ``P^-1/2`` is exact block by block (``(K_b/T + τ_b I)^-1/2`` through the block's
        eigendecomposition).

        Args:
            n: the number of samples.
            generator: the random source of ``z``.

        Example:
            >>> model = torch.nn.Linear(2, 2).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data)
            >>> la.sample(5, generator=torch.Generator().manual_seed(0)).shape
            torch.Size([5, 6])
        """
        check_positive_int(n, "n")
        check_generator(generator)
        root = self._posterior.power(-0.5, self._prior_precision, self._temperature)
        noise = torch.randn(
            n, self.mean.numel(), generator=generator, dtype=self.mean.dtype, device=self.mean.device
        )
        return (self.mean.unsqueeze(1) + root @ noise.T).T

    # ----------------------------------------------------------------- predictives
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
            link_approx: ``"probit"`` or ``"mc"`` (GLM classification).
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
