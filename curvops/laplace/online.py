"""Hyperparameters learned during training by the Laplace evidence (Immer et al., 2021, "Scalable
marginal likelihood estimation for model selection in deep learning").

Between updates the network trains on the negative log joint ``L_sum(θ) + ½ Σ_l τ_l ‖θ_l‖²`` (a
Gaussian's ``L_sum = E/(2σ²) + ...``), which a loss of reduction ``"mean"`` over ``N`` terms turns
into ``loss + penalty`` with ``penalty = Σ_l c τ_l ‖θ_l‖² / N`` (``c = ½``; ``c = σ²`` for a
Gaussian, ``½`` without a ``σ``: the likelihood ``N(f, ½ I)``; no ``/N`` for ``reduction="sum"``):
the same minimiser, the loss's scale. Every few epochs :meth:`OnlineMarglik.update` builds the
Laplace approximation at the current ``θ`` and takes Adam steps on ``log τ`` (and ``log σ``)
maximising its evidence from the current values; the new ``τ`` (``σ``) shape the penalty.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..linalg.checks import check_bool, check_positive
from ..nn.batches import as_batches
from ..nn.losses import LossAdapter
from ..nn.parameters import chosen_parameters
from .approximation import Laplace
from .curvature import likelihood_of
from .posterior import check_prior_precision


class OnlineMarglik:
    """The prior precision ``τ`` (one number or one per parameter tensor) and a Gaussian's ``σ``,
    learned while the network trains: :meth:`penalty` for the training loss, :meth:`update` every
    few epochs.

    Args:
        model: the network being trained.
        loss_fn: its training loss (as :class:`Laplace` takes it), reduction ``"mean"`` or ``"sum"``.
        data: the training batches (re-iterable), for the evidence.
        curvature: the Laplace curvature (``"kfac"`` by default; see :class:`Laplace`).
        prior_precision: the first ``τ``: a number, or one per parameter tensor of ``params``.
        sigma_noise: the first ``σ`` of a Gaussian likelihood (``MSELoss``; ``None``: ``N(f, ½ I)``
            until learned).
        learn_sigma_noise: learn ``σ`` too (``MSELoss`` only; from the maximum-likelihood
            ``sqrt(E/N)`` when ``sigma_noise`` is ``None``).
        params: the parameters the prior is over (default: the trainable ones).
        curvature_options: keyword arguments for the Kronecker builders (see :class:`Laplace`).

    Attributes:
        prior_precision: the current ``τ``.
        sigma_noise: the current ``σ`` (``None`` for a classification loss, or until learned).
        laplace: the last update's :class:`Laplace` (``None`` before the first).
        history: ``(τ, σ, log evidence)`` after each update.

    Example:
        >>> layers = [torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)]
        >>> model = torch.nn.Sequential(*layers).double()
        >>> x = torch.randn(32, 2, dtype=torch.float64)
        >>> data, loss_fn = [(x, (x[:, 0] > 0).long())], torch.nn.CrossEntropyLoss()
        >>> online = curvops.laplace.OnlineMarglik(model, loss_fn, data)
        >>> optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        >>> for epoch in range(30):
        ...     for xb, yb in data:
        ...         optimizer.zero_grad()
        ...         (loss_fn(model(xb), yb) + online.penalty()).backward()
        ...         optimizer.step()
        ...     if epoch % 10 == 9:
        ...         tau = online.update(steps=50)
        >>> len(online.history), bool(tau > 0)
        (3, True)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        data: Iterable,
        curvature: str = "kfac",
        prior_precision: float | Sequence[float] | Tensor = 1.0,
        sigma_noise: float | None = None,
        learn_sigma_noise: bool = False,
        params: Sequence[nn.Parameter] | None = None,
        curvature_options: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.loss_fn, self.data = model, loss_fn, as_batches(data)
        self.learn_sigma_noise = check_bool(learn_sigma_noise, "learn_sigma_noise")
        adapter = LossAdapter(loss_fn, likelihood=True, what="OnlineMarglik")
        if learn_sigma_noise and likelihood_of(loss_fn) != "regression":
            raise ValueError("learn_sigma_noise learns a Gaussian likelihood's σ; it needs nn.MSELoss.")
        self.params, names = chosen_parameters(model, params)
        self._options = {
            "curvature": curvature,
            "params": self.params,
            "curvature_options": curvature_options,
        }
        place = {"dtype": self.params[0].dtype, "device": self.params[0].device}
        self.prior_precision = check_prior_precision(prior_precision, list(names), place)
        if sigma_noise is not None and likelihood_of(loss_fn) != "regression":
            raise ValueError("sigma_noise is the noise of a Gaussian likelihood; it needs nn.MSELoss.")
        self.sigma_noise = None if sigma_noise is None else check_positive(sigma_noise, "sigma_noise")
        self.laplace: Laplace | None = None
        self.history: list[tuple[Tensor, float | None, float]] = []
        self._gaussian = likelihood_of(loss_fn) == "regression"
        terms = sum(adapter.count(y) for _, y in self.data)
        self._divisor = terms if adapter.reduction == "mean" else 1.0

    def penalty(self) -> Tensor:
        """``Σ_l c τ_l ‖θ_l‖² / N`` for the training loss (see :mod:`curvops.laplace.online`),
        differentiable in the parameters."""
        taus = self.prior_precision
        taus = taus.expand(len(self.params)) if taus.ndim == 0 else taus
        scale = (0.5 if self.sigma_noise is None else self.sigma_noise**2) if self._gaussian else 0.5
        squares = torch.stack([p.square().sum() for p in self.params])
        return scale * (taus.detach() * squares).sum() / self._divisor

    def update(self, steps: int = 100, lr: float = 0.1) -> Tensor:
        """A Laplace approximation at the current parameters and ``steps`` Adam steps (learning rate
        ``lr``) on ``log τ`` (and ``log σ``) from the current values maximising its evidence; sets
        and returns the new ``τ`` (``θ`` is no minimum yet during training: that warning is not
        raised here)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The parameters are not at a minimum")
            laplace = Laplace(
                self.model, self.loss_fn, self.data, prior_precision=self.prior_precision,
                sigma_noise=self.sigma_noise, **self._options,
            )  # fmt: skip
        tau = laplace.optimize_prior_precision(steps=steps, lr=lr, learn_sigma_noise=self.learn_sigma_noise)
        self.prior_precision, self.sigma_noise, self.laplace = tau, laplace.sigma_noise, laplace
        self.history.append((tau, self.sigma_noise, float(laplace.log_marginal_likelihood())))
        return tau
