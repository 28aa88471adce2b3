"""Zeroth-order optimisation with a curvature estimate: three forward passes per step."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import StateDictError
from ..linalg.checks import check_int, check_nonnegative, check_positive
from .schedule import Schedule, check_fraction, check_schedule, evaluate


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """Gradient and curvature from function values only, for when backpropagation is unaffordable.

    Per step ``t``, with a direction ``z`` of independent Rademacher entries (drawn per
    parameter tensor from a generator seeded with ``(seed, t, tensor index)``) and ``ε =
    epsilon``, the closure is evaluated at ``θ``, ``θ + εz`` and ``θ − εz``:

    - directional derivative ``d = (ℓ₊ − ℓ₋) / 2ε ≈ z^T ∇ℓ`` (exact for a quadratic up to
      rounding), hence the gradient estimate ``d z`` with ``E[d z] = ∇ℓ``;
    - directional curvature ``c = (ℓ₊ + ℓ₋ − 2ℓ₀) / ε² ≈ z^T H z``, hence the diagonal
      curvature estimate ``|c| / D`` per coordinate: the Rayleigh quotient
      ``c / ‖z‖²`` (one direction cannot tell coordinates apart, so the estimate is
      isotropic: exact for ``H = hI``, the mean of ``H``'s diagonal in expectation);
    - ``g ← β₁ g + (1 − β₁) d z``, ``h ← β₂ h + (1 − β₂) |c| / D`` (bias-corrected as in Adam)
      and ``θ ← θ − η ĝ / sqrt(ĥ + eps)`` (plus ``η w θ`` with ``weight_decay = w``).

    Memory: the model's inference plus the optimizer state ``g`` (one tensor per parameter)
    and the scalar ``h``; ``z`` is regenerated from its seed whenever it is needed, never
    stored (only one parameter tensor's worth of it exists at a time). ``θ`` is restored by
    adding ``εz`` back, which may differ from the original in the last bit (keeping a copy of
    ``θ`` instead would double the memory).

    The closure must return the loss at the current parameters as a scalar: a Python number
    or a one-element tensor. It is called first at ``θ``, so a closure that raises or returns
    anything else (a vector of per-datum losses, ``None``) fails before ``θ`` is touched; if it
    raises at ``θ ± εz``, ``θ`` is restored (as above) before the error propagates. A step
    whose losses are not finite is skipped with a ``RuntimeWarning`` (``θ`` restored, state
    unchanged).

    Args:
        params: the parameters.
        lr: ``η``, a number or a schedule ``step -> η``.
        epsilon: the perturbation size ``ε > 0``.
        betas: a pair ``(β₁, β₂)`` of numbers in ``[0, 1)``.
        eps: added to ``ĥ`` under the square root.
        weight_decay: ``w >= 0``.
        seed: seed of the directions (an integer).

    Attributes:
        steps: the number of steps taken.
        curvature: the running ``h`` (before bias correction).
        last_estimates: ``(d, c)`` of the last step, or ``None`` before the first.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
        >>> loss_fn = torch.nn.MSELoss()
        >>> opt = curvops.optim.ZerothOrderOptimizer(model.parameters(), lr=0.05)
        >>> first = loss_fn(model(x), y).item()
        >>> for _ in range(200):
        ...     _ = opt.step(lambda: loss_fn(model(x), y))
        >>> loss_fn(model(x), y).item() < first
        True
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: Schedule = 1e-3,
        epsilon: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        self._lr = check_schedule(lr, "lr")
        check_positive(epsilon, "epsilon")
        check_positive(eps, "eps")
        beta1, beta2 = check_betas(betas)
        check_nonnegative(weight_decay, "weight_decay")
        check_int(seed, "seed")
        defaults = {
            "lr": evaluate(self._lr, 0, "lr"),
            "epsilon": float(epsilon),
            "betas": (beta1, beta2),
            "eps": float(eps),
            "weight_decay": float(weight_decay),
        }
        super().__init__(params, defaults)
        self.seed = seed
        self.steps = 0
        self.curvature = 0.0
        self.last_estimates: tuple[float, float] | None = None

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def direction(self, step: int, index: int) -> Tensor:
        """``z`` of parameter tensor ``index`` at ``step``, regenerated from its seed (``±1`` entries)."""
        p = self._params()[index]
        seed = ((self.seed * 1_000_003 + step) * 10_007 + index) % 2**64  # torch's seed range
        generator = torch.Generator(device=p.device).manual_seed(seed)
        return torch.empty_like(p).bernoulli_(0.5, generator=generator).mul_(2).sub_(1)

    def _perturb(self, scale: float) -> None:
        for index, p in enumerate(self._params()):
            p.add_(self.direction(self.steps, index), alpha=scale)

    def _loss_at(self, closure: Callable[[], Tensor | float], offset: float) -> float:
        """``ℓ(θ + offset · z)``; ``θ`` is back in place afterwards, also when the closure raises."""
        self._perturb(offset)
        try:
            return loss_value(closure())
        finally:
            self._perturb(-offset)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor | float]) -> Tensor | float:  # type: ignore[override]
        """One step; ``closure()`` returns the loss at the current parameters as a scalar (a
        number or a one-element tensor; no backward).

        Returns ``ℓ₀``, the loss at the parameters before the step. The step's estimates
        ``(d, c)`` are kept in :attr:`last_estimates`.
        """
        if closure is None:
            raise ValueError("ZerothOrderOptimizer.step needs a closure that returns the loss.")
        group = self.param_groups[0]
        epsilon = group["epsilon"]
        loss = closure()
        center = loss_value(loss)
        plus = self._loss_at(closure, epsilon)
        minus = self._loss_at(closure, -epsilon)
        if not all(math.isfinite(v) for v in (plus, minus, center)):
            warnings.warn(
                f"ZerothOrderOptimizer step {self.steps}: non-finite loss; the step is skipped.",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        derivative = (plus - minus) / (2 * epsilon)
        curvature = (plus + minus - 2 * center) / epsilon**2
        self.last_estimates = (derivative, curvature)
        params = self._params()
        size = sum(p.numel() for p in params)
        beta1, beta2 = group["betas"]
        self.curvature = beta2 * self.curvature + (1 - beta2) * abs(curvature) / size
        corrected_curvature = self.curvature / (1 - beta2 ** (self.steps + 1))
        group["lr"] = lr = evaluate(self._lr, self.steps, "lr", group["lr"])
        scale = lr / ((1 - beta1 ** (self.steps + 1)) * math.sqrt(corrected_curvature + group["eps"]))
        for index, p in enumerate(params):
            state = self.state[p]
            average = state.get("gradient_average")
            if average is None:
                average = state["gradient_average"] = torch.zeros_like(p)
            average.mul_(beta1).add_(self.direction(self.steps, index), alpha=(1 - beta1) * derivative)
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])
            p.add_(average, alpha=-scale)
        self.steps += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus ``"zeroth_order"``: the step count and ``h``."""
        state = super().state_dict()
        state["zeroth_order"] = {"steps": self.steps, "curvature": self.curvature}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises :class:`~curvops.errors.StateDictError`, before
        changing anything, for a missing or malformed entry (naming the key)."""
        state = dict(state_dict)
        extra = state.pop("zeroth_order", None)
        if not isinstance(extra, dict):
            raise StateDictError("Not a ZerothOrderOptimizer state dict: it has no 'zeroth_order' entry.")
        steps, curvature = extra.get("steps"), extra.get("curvature")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise StateDictError(f"['zeroth_order']['steps'] must be an integer >= 0, got {steps!r}.")
        if isinstance(curvature, bool) or not isinstance(curvature, Real) or not 0 <= curvature < math.inf:
            raise StateDictError(
                f"['zeroth_order']['curvature'] must be a finite number >= 0, got {curvature!r}."
            )
        params = self._params()
        for index, entry in state.get("state", {}).items():
            average = entry.get("gradient_average") if isinstance(entry, dict) else None
            if isinstance(index, int) and 0 <= index < len(params) and average is not None:
                if not isinstance(average, Tensor) or average.shape != params[index].shape:
                    shape = list(average.shape) if isinstance(average, Tensor) else type(average).__name__
                    raise StateDictError(
                        f"['state'][{index}]['gradient_average'] is {shape}; parameter {index} has shape "
                        f"{list(params[index].shape)}."
                    )
        state["state"] = copy.deepcopy(state.get("state", {}))  # buffers of its own: no aliasing
        super().load_state_dict(state)
        self.steps, self.curvature = steps, float(curvature)


def loss_value(loss: object) -> float:
    """The closure's loss as a float: a real number or a one-element tensor, else ``TypeError``.

    Example:
        >>> loss_value(torch.tensor([0.5]))
        0.5
    """
    if isinstance(loss, Tensor) and loss.numel() == 1 and not loss.is_complex():
        return float(loss)
    if isinstance(loss, Real) and not isinstance(loss, bool):
        return float(loss)
    what = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
    raise TypeError(
        "ZerothOrderOptimizer: the closure must return the loss as a scalar (a number or a one-element "
        f"tensor), got {what}; reduce per-datum losses with .mean() or .sum()."
    )


def check_betas(betas: object) -> tuple[float, float]:
    """``(β₁, β₂)``: a pair of numbers in ``[0, 1)``, else a ``ValueError`` that shows the form.

    Example:
        >>> check_betas((0.9, 0.99))
        (0.9, 0.99)
    """
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(
            f"betas must be a pair (beta1, beta2) of numbers in [0, 1), e.g. (0.9, 0.99); got {betas!r}."
        )
    beta1, beta2 = (check_fraction(b, f"betas[{i}]") for i, b in enumerate(betas))
    return beta1, beta2
