"""The public class :class:`Laplace`: the parts of this package put together."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import Shards
from ..linalg import CurvatureOperator
from ..linalg.checks import check_choice, check_generator, check_positive, check_positive_int
from ..nn.batches import as_batches
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
from .last_layer import LAST_LAYER, head_model, last_layer_features
from .network import Network
from .nll_gradient import differentiable, refine
from .noise import GaussianNoise
from .posterior import Posterior, check_prior_precision, warn_unless_minimum
from .predictive import Predictives
from .saved import SavedState
from .tuning import (
    PRIOR_METHODS,
    check_grid,
    check_tuning_arguments,
    grid_search,
    maximize,
    validation_negative_log_likelihood,
)


class Laplace(Predictives, SavedState):
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
            ``"last_layer"``: the last layer's (an ``nn.Linear`` producing the output), fitted on
            its input features computed once, without backward passes through the network
            (:mod:`curvops.laplace.last_layer`): the posterior of ``params=[W, b]``, faster.
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
        params: Sequence[nn.Parameter] | str | None = None,
        sigma_noise: float | None = None,
        curvature_options: dict[str, Any] | None = None,
        group: Any = None,
    ) -> None:
        check_curvature(curvature, CURVATURES)
        shards = Shards.of(group)
        last = isinstance(params, str)
        if last and params != LAST_LAYER:
            raise ValueError(f"params must be parameters or {LAST_LAYER!r}, got {params!r}.")
        self._attach(model, loss_fn, data, None if last else params, shards.active)
        fitted, input_shape = self._model, None  # the model the posterior is fitted on
        if last:  # the last layer on its features: no passes through the body but one
            layer, batches, input_shape = last_layer_features(self._model)
            fitted = head_model(layer, batches, shards.active)
            self._model = ModelData(model, data, fitted.params, allow_empty=shards.active)
            self.param_names = list(self._model.names)
        self.sigma_noise = self._check_sigma_noise(sigma_noise)
        self._theta = {name: p.detach().clone() for name, p in self._model.param_dict().items()}
        self.mean = torch.cat([t.reshape(-1) for t in self._theta.values()])
        self._prior_precision = self._check_prior_precision(prior_precision)
        self._temperature = check_positive(temperature, "temperature")

        theta = dict(zip(fitted.names, self._theta.values(), strict=True))
        fit = read_data(fitted, self._loss_adapter, theta, shards)
        self.num_terms = fit.num_terms
        self.loss = summed_negative_log_likelihood(fit, sigma_noise)
        base_variance = 0.5 if sigma_noise is None else sigma_noise**2  # N(f, ½ I) without a σ
        regression = self.likelihood == "regression"
        self._noise = GaussianNoise(fit.loss, fit.num_terms, base_variance) if regression else None
        self._noise_ratio: float = 1.0  # σ²/σ₀² once σ is learned: K is divided by it
        self._network = Network(self._model, self._theta, fit.output_shape, input_shape or fit.input_example)
        op = build_curvature(curvature, fitted, self._loss_adapter, curvature_options, group)
        scale = curvature_scale(curvature, self._loss_adapter, self.num_terms, sigma_noise)
        self._posterior = Posterior(op, scale, self._theta, self.loss)
        self.curvature = self._posterior.curvature
        gradient = fit.gradient * likelihood_scale(sigma_noise) / self._temperature
        warn_unless_minimum(self.posterior_covariance, gradient, self.mean)

    def _attach(self, model: nn.Module, loss_fn: Callable, data: Iterable, params: Any, empty: bool) -> None:
        """The loss (checked), the likelihood it gives, and the model with its chosen parameters."""
        self._loss_adapter = LossAdapter(loss_fn, likelihood=True, what="Laplace")
        self._loss_adapter.check_sampling("Laplace")
        self.loss_fn = loss_fn
        self.likelihood = likelihood_of(loss_fn)
        self.model = model
        self._model = ModelData(model, data, params, allow_empty=empty)
        self.param_names = list(self._model.names)

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
    def _curvature_temperature(self) -> float:
        """What ``K`` as built is divided by: ``T``, times ``σ²/σ₀²`` once ``σ`` is learned."""
        return self._temperature * self._noise_ratio

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
        return self._posterior.precision(self._prior_precision, self._curvature_temperature)

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
        return self._posterior.covariance(self._prior_precision, self._curvature_temperature)

    # ----------------------------------------------------------------- evidence
    def log_marginal_likelihood(
        self,
        prior_precision: float | Sequence[float] | Tensor | None = None,
        sigma_noise: float | None = None,
    ) -> Tensor:
        """Laplace's log evidence: ``log p(D) ≈ -L_sum(θ*)/T - ½ (logdet P - Σ_l D_l log τ_l)
        - ½ Σ_l τ_l ‖θ*_l‖²``.

        The sums run over the parameter tensors ``l`` (``D_l`` entries each); for a scalar
        ``τ`` they are ``D log τ`` and ``τ ‖θ*‖²``. ``logdet P = Σ_b Σ_i log(λ_bi / T + τ_b)``
        over the eigenvalues ``λ_bi`` of each block of ``K`` (computed once and cached), or a
        Cholesky factorisation for a block that mixes several ``τ``. The constant
        ``-(D/2) log 2π`` of the Gaussian integral cancels against the prior's normaliser and
        does not appear. At another ``σ`` of a Gaussian likelihood (``MSELoss``),
        ``L_sum = E/(2σ²) + (N/2) log(2πσ²)`` and ``K = K_MSE/(2σ²)`` (:mod:`curvops.laplace.noise`).

        Args:
            prior_precision: ``τ`` to evaluate at (default: :attr:`prior_precision`); a number
                or one per parameter tensor.
            sigma_noise: ``σ > 0`` to evaluate at (``MSELoss`` only; default: the likelihood's own).

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
        if sigma_noise is not None:
            if self._noise is None:
                raise ValueError("sigma_noise is the noise of a Gaussian likelihood; it needs nn.MSELoss.")
            sigma_noise = check_positive(sigma_noise, "sigma_noise")
        with torch.no_grad():
            return self._evidence(prior_precision, sigma_noise)

    def _evidence(self, prior_precision: Tensor, sigma_noise: float | Tensor | None = None) -> Tensor:
        """The log evidence at ``τ`` and ``σ`` (default: the current ``σ``), differentiable in both."""
        if sigma_noise is None:
            ratio, loss = self._noise_ratio, self.loss
        else:
            ratio, loss = self._noise.ratio(sigma_noise), self._noise.loss(sigma_noise)
        return self._posterior.log_marginal_likelihood(prior_precision, self._temperature, ratio, loss)

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        prior_precision: float | Sequence[float] | Tensor | None = None,
        steps: int = 300,
        lr: float = 0.1,
        grid: Tensor | None = None,
        val_data: Iterable | None = None,
        learn_sigma_noise: bool = False,
        predictive_options: dict[str, Any] | None = None,
    ) -> Tensor:
        """Choose ``τ`` (and a Gaussian's ``σ``); set :attr:`prior_precision` and return it.

        - ``"marglik"``: Adam on ``log τ`` (``steps`` steps, learning rate ``lr`` annealed to
          zero on a cosine schedule) maximising :meth:`log_marginal_likelihood`. Every step
          costs ``O(D)``: ``logdet P = Σ_i log(λ_i / T + τ_l)`` reuses the eigenvalues of ``K``'s
          blocks, computed once (a block that mixes several ``τ`` is refactorised per step).
          The shape of ``τ`` — one number, or one per parameter tensor — is that of the start,
          ``prior_precision`` (default: the current :attr:`prior_precision`). With
          ``learn_sigma_noise=True`` (``MSELoss``) Adam runs on ``log σ`` too, from the current
          ``σ`` (or the maximum-likelihood ``sqrt(E/N)`` where there is none), and sets
          :attr:`sigma_noise`: ``K = K_MSE/(2σ²)`` and ``L_sum`` follow it, and the regression
          predictives add ``σ²``.
        - ``"grid"``: the value of ``grid`` (default ``torch.logspace(-4, 4, 100)``) with the
          largest log marginal likelihood. For a per-parameter ``τ`` every parameter tensor gets
          the same grid value.
        - ``"nll"``: the value of ``grid`` whose :meth:`predictive` gives ``val_data`` the lowest
          mean negative log-likelihood per target (``-log p_y`` of the class probabilities, the
          Bernoulli's for ``BCEWithLogitsLoss``, the Gaussian's ``½ log(2πv) + (y - μ)²/(2v)`` of
          the predictive mean and variance for ``MSELoss``; ``ignore_index`` targets left out),
          as ``laplace-torch``'s grid search; ``predictive_options`` go to :meth:`predictive`
          (``method``, ``link_approx``, ``n_samples``, ``generator``, ``batch_size``). Where the
          predictive is differentiable in ``τ`` (the GLM with the probit or bridge link, or a
          regression's), ``steps`` Adam steps on ``log τ`` then refine the grid's best with the
          exact gradient (:mod:`curvops.laplace.nll_gradient`), kept where they lower the NLL.

        Args:
            method: ``"marglik"``, ``"grid"`` or ``"nll"``.
            prior_precision: the start (marglik) or the shape (grid, nll) of ``τ``.
            steps: Adam steps.
            lr: Adam's initial learning rate on ``log τ``.
            grid: 1-D positive candidate values of ``τ``.
            val_data: ``(X, y)`` validation batches, or one pair (``"nll"`` only).
            learn_sigma_noise: learn ``σ`` with ``τ`` (``"marglik"``, ``MSELoss`` only).
            predictive_options: keyword arguments of :meth:`predictive` (``"nll"`` only).

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
            >>> val = (torch.randn(6, 2, dtype=torch.float64), torch.randint(0, 2, (6,)))
            >>> bool(la.optimize_prior_precision("nll", val_data=val, grid=[0.1, 1.0, 10.0]) > 0)
            True
        """
        check_choice(method, PRIOR_METHODS, "prior precision method")
        check_positive_int(steps, "steps")
        check_positive(lr, "lr")
        check_tuning_arguments(
            method, self._noise is not None, val_data, learn_sigma_noise, predictive_options
        )
        grid = check_grid(grid, {"dtype": self.mean.dtype, "device": self.mean.device})
        start = (
            self._prior_precision if prior_precision is None else self._check_prior_precision(prior_precision)
        )
        if method == "grid":
            tau = grid_search(self._evidence, start, grid)
        elif method == "nll":
            options = predictive_options or {}
            tau = grid_search(lambda t: -self._validation_nll(t, val_data, options), start, grid)
            if differentiable(self, tau, options):
                tau = refine(self, tau, as_batches(val_data), options, steps, lr)
        elif learn_sigma_noise:
            sigma = self.sigma_noise or self._noise.maximum_likelihood()
            tau, sigma = maximize(self._evidence, [start, start.new_tensor(sigma)], steps, lr)
            self._set_sigma_noise(float(sigma))
        else:
            (tau,) = maximize(self._evidence, [start], steps, lr)
        self._prior_precision = self._check_prior_precision(tau)
        return self._prior_precision

    def _set_sigma_noise(self, sigma: float) -> None:
        """The Gaussian likelihood's ``σ`` from now on: ``L_sum``, ``K``'s scale and the predictives'."""
        self.sigma_noise = sigma
        self._noise_ratio = float(self._noise.ratio(sigma))
        self.loss = self._noise.loss(sigma)

    def _validation_nll(self, prior_precision: Tensor, val_data: Iterable, options: dict[str, Any]) -> float:
        """The mean validation negative log-likelihood of :meth:`predictive` at ``τ``."""
        saved, self._prior_precision = self._prior_precision, prior_precision
        try:
            predict = lambda x: self.predictive(x, **options)  # noqa: E731
            ignore = getattr(self.loss_fn, "ignore_index", None)
            return validation_negative_log_likelihood(predict, as_batches(val_data), self.likelihood, ignore)
        finally:
            self._prior_precision = saved

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
        root = self._posterior.power(-0.5, self._prior_precision, self._curvature_temperature)
        noise = torch.randn(
            n, self.mean.numel(), generator=generator, dtype=self.mean.dtype, device=self.mean.device
        )
        return (self.mean.unsqueeze(1) + root @ noise.T).T
