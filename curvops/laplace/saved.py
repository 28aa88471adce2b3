"""A fitted :class:`~curvops.laplace.Laplace` as a ``state_dict`` of tensors, numbers and strings
(``torch.save`` / ``torch.load(weights_only=True)``-safe), and back without the data.

What it holds: the curvature ``K`` of the summed negative log-likelihood (its operator's own
``state_dict``, :mod:`curvops.linalg.state`), ``θ*`` and the parameters' names, the prior
precision, the temperature, a Gaussian's ``σ`` (with the squared errors and the ``σ₀`` the
curvature was built with), ``L_sum(θ*)``, ``N``, the likelihood and the output shape. The
model's other parameters and buffers are the model's own, as when fitted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..linalg import from_state_dict
from .network import Network
from .noise import GaussianNoise
from .posterior import Posterior

FORMAT = "curvops.laplace/1"
KEYS = (
    "format", "curvature", "mean", "param_names", "prior_precision", "temperature", "sigma_noise",
    "noise", "loss", "num_terms", "likelihood", "output_shape", "input_example",
)  # fmt: skip


def check_state(state: Any, likelihood: str, names: list[str], sizes: list[int]) -> None:
    """Raise a ``ValueError`` naming the key unless ``state`` is a Laplace ``state_dict`` for this
    loss's ``likelihood`` and these parameters (``names`` and their ``sizes``)."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"Not a Laplace state_dict (format {FORMAT!r}), got {found!r}.")
    missing = [key for key in KEYS if key not in state]
    if missing:
        raise ValueError(f"The Laplace state_dict lacks the keys {missing}.")
    if state["likelihood"] != likelihood:
        raise ValueError(
            f"The state_dict is of a {state['likelihood']!r} likelihood; this loss_fn gives {likelihood!r}."
        )
    if list(state["param_names"]) != names:
        raise ValueError(
            f"The state_dict's parameters are {list(state['param_names'])}; these are {names}. Pass the "
            "same params (names and order) as when it was fitted."
        )
    mean = state["mean"]
    if not isinstance(mean, Tensor) or mean.ndim != 1 or mean.numel() != sum(sizes):
        shape = list(mean.shape) if isinstance(mean, Tensor) else type(mean).__name__
        raise ValueError(
            f"The state_dict's 'mean' has shape {shape}; these parameters have {sum(sizes)} entries."
        )


def theta_of(mean: Tensor, names: list[str], shapes: list[torch.Size]) -> dict[str, Tensor]:
    """``θ*`` per parameter tensor from the flat ``mean``."""
    parts = mean.split([shape.numel() for shape in shapes])
    return {name: part.reshape(shape).clone() for name, part, shape in zip(names, parts, shapes, strict=True)}


class SavedState:
    """:meth:`state_dict`, :meth:`load_state_dict` and :meth:`from_state_dict` of
    :class:`~curvops.laplace.Laplace`."""

    def state_dict(self) -> dict[str, Any]:
        """The fitted posterior as a dictionary of tensors, numbers and strings (see
        :mod:`curvops.laplace.saved`): ``torch.save`` it, ``torch.load(..., weights_only=True)``
        it, and restore with :meth:`from_state_dict` (no data needed) or :meth:`load_state_dict`.

        Example:
            >>> import io
            >>> model = torch.nn.Linear(2, 2).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data, prior_precision=2.0)
            >>> buffer = io.BytesIO()
            >>> torch.save(la.state_dict(), buffer)
            >>> _ = buffer.seek(0)
            >>> state = torch.load(buffer, weights_only=True)
            >>> again = curvops.laplace.Laplace.from_state_dict(model, torch.nn.CrossEntropyLoss(), state)
            >>> torch.allclose(again.log_marginal_likelihood(), la.log_marginal_likelihood())
            True
        """
        noise = None
        if self._noise is not None:
            base = self._noise.base_variance**0.5
            noise = {
                "squared_errors": self._noise.squared_errors,
                "base_sigma": base,
                "ratio": self._noise_ratio,
            }
        return {
            "format": FORMAT,
            "curvature": self._posterior.curvature.state_dict(),
            "mean": self.mean.clone(),
            "param_names": list(self.param_names),
            "prior_precision": self._prior_precision.clone(),
            "temperature": self._temperature,
            "sigma_noise": self.sigma_noise,
            "noise": noise,
            "loss": self.loss.detach().clone(),
            "num_terms": self.num_terms,
            "likelihood": self.likelihood,
            "output_shape": list(self._network.output_shape),
            "input_example": None
            if self._network.input_example is None
            else list(self._network.input_example),
        }

    @classmethod
    def from_state_dict(
        cls,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        state: dict[str, Any],
        params: Sequence[nn.Parameter] | None = None,
    ) -> SavedState:
        """A posterior restored from :meth:`state_dict` on ``model`` (the same architecture; its
        parameters' values need not be ``θ*``, which the state holds), without the training data:
        the same evidence, samples and predictives to rounding. ``params`` defaults to the
        model's parameters of the state's names (a last-layer posterior's, say).

        Raises ``ValueError`` (naming the key) for a state of another likelihood or other
        parameters.

        Example:
            >>> model = torch.nn.Linear(2, 2).double()
            >>> data = [(torch.randn(8, 2, dtype=torch.float64), torch.randint(0, 2, (8,)))]
            >>> la = curvops.laplace.Laplace(model, torch.nn.CrossEntropyLoss(), data)
            >>> restore = curvops.laplace.Laplace.from_state_dict
            >>> again = restore(model, torch.nn.CrossEntropyLoss(), la.state_dict())
            >>> x = torch.randn(3, 2, dtype=torch.float64)
            >>> torch.allclose(again.predictive(x), la.predictive(x))
            True
        """
        if params is None and isinstance(state, dict) and isinstance(state.get("param_names"), list):
            named = dict(model.named_parameters())  # default: the parameters the state was fitted on
            if all(name in named for name in state["param_names"]):
                params = [named[name] for name in state["param_names"]]
        laplace = cls.__new__(cls)
        laplace._attach(model, loss_fn, [], params, True)
        laplace.load_state_dict(state)
        return laplace

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this posterior by the one :meth:`state_dict` saved (same likelihood, same
        parameters): curvature, ``θ*``, prior precision, temperature, ``σ``, ``L_sum`` and ``N``."""
        shapes = [p.shape for p in self._model.params]
        check_state(state, self.likelihood, list(self.param_names), [shape.numel() for shape in shapes])
        place = {"dtype": self._model.dtype, "device": self._model.device}
        theta = theta_of(state["mean"].to(**place), list(self.param_names), shapes)
        self._theta, self.mean = theta, torch.cat([t.reshape(-1) for t in theta.values()])
        self._prior_precision = self._check_prior_precision(state["prior_precision"].to(**place))
        self._temperature = float(state["temperature"])
        self.sigma_noise = state["sigma_noise"]
        self.loss = state["loss"].to(**place)
        self.num_terms = float(state["num_terms"])
        noise = state["noise"]
        self._noise = None
        self._noise_ratio = 1.0
        if noise is not None:
            errors = noise["squared_errors"].to(**place)
            self._noise = GaussianNoise(
                errors, self.num_terms, noise["base_sigma"] if noise["base_sigma"] != 0.5**0.5 else None
            )
            self._noise_ratio = float(noise["ratio"])
        example = state["input_example"]
        self._network = Network(
            self._model, theta, tuple(state["output_shape"]), None if example is None else tuple(example)
        )
        operator = from_state_dict(state["curvature"], device=self._model.device, dtype=self._model.dtype)
        self._posterior = Posterior(operator, 1.0, theta, self.loss)
        self.curvature = self._posterior.curvature
