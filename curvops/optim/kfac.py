"""Natural-gradient training with KFAC, EKFAC or TKFAC as a ``torch.optim.Optimizer``.

The optimizer is a thin client of the curvature operators: it keeps running averages of
the Kronecker statistics (:class:`~curvops.nn.kronecker_statistics.KroneckerSums`, fed by
the hooks of :mod:`curvops.optim.capture`), builds the same blocks as :func:`~curvops.KFAC`,
:func:`~curvops.EKFAC` and :func:`~curvops.TKFAC` from them, and asks the operator for its
damped inverse. No Kronecker algebra is written here.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import StateDictError
from ..linalg import CurvatureOperator, Dense, Diagonal, Kronecker, from_state_dict
from ..linalg.checks import (
    check_bool,
    check_choice,
    check_int,
    check_nonnegative,
    check_positive,
    check_positive_int,
)
from ..nn.kfac import Layout, assemble, corrected_blocks, eigenbasis, find_layers, kronecker_blocks, place
from ..nn.kronecker_statistics import (
    CORRECTIONS,
    FISHER_TYPES,
    KFAC_APPROXIMATIONS,
    KroneckerLayer,
    KroneckerSums,
)
from ..nn.losses import LossAdapter
from ..nn.model import as_parameter_list
from .capture import BatchCapture, CapturedBatch
from .schedule import Schedule, all_finite, check_fraction, check_schedule, evaluate

CURVATURES = ("kfac", "ekfac", "tkfac")
STATE = "The KFACOptimizer state dict's"
CURVATURE_STATE = ("curvature", "steps", "statistics", "bases", "scales", "preconditioner")
STATISTICS = (
    "input_factor",
    "output_factor",
    "trace",
    "bias_trace",
    "trace_input_factor",
    "trace_output_factor",
)


class KFACOptimizer(torch.optim.Optimizer):
    """Natural-gradient descent preconditioned by KFAC, EKFAC or TKFAC (Martens & Grosse 2015;
    George et al. 2018; Gao et al. 2021).

    Use it in an ordinary training loop, computing the loss with the same ``loss_fn``
    module: ``loss = loss_fn(model(x), y); loss.backward(); opt.step()``. Hooks catch each
    layer's inputs and, during ``backward``, backpropagate the Fisher type's output-space
    columns to the layer outputs (labels sampled from the model for ``"mc"``); ``.grad``
    stays the gradient of the true-label loss.

    Per step ``t`` (counting from 0):

    - every ``T_stats`` steps, the step's statistics (``A``, ``G``; TKFAC's ``δ``, ``Φ``,
      ``Ψ``) enter exponential moving averages ``S ← β S + (1 - β) S_step`` (``β =
      ema_decay``; the first step initialises them). EKFAC also averages its corrected
      eigenvalues ``s`` of the step in the current eigenbasis.
    - every ``T_inv`` steps (a multiple of ``T_stats``), the preconditioner is rebuilt from
      the averages with the step's damping ``λ``: KFAC ``(G ⊗ A + λI)^-1`` (exact, or
      π-damped with ``factored=True``); EKFAC recomputes its eigenbasis ``Q_G ⊗ Q_A`` and
      restarts ``s`` from KFAC's eigenvalues ``γ α^T`` (its inverse ``(s + λ)^-1`` is rebuilt
      at every statistics step); TKFAC uses Gao et al.'s damped factors
      ``(√δ Ψ + √λ I)^-1 ⊗ (√δ Φ + √λ I)^-1``. A separate bias block is ``(G + λI)^-1``.
    - the step: ``d = ∇ + w θ`` (``w = weight_decay``), ``p = P d`` with the
      preconditioner ``P`` on the Kronecker layers' parameters and ``p = d`` on every other
      parameter (LayerNorm, BatchNorm, ``nn.MultiheadAttention`` with its ``out_proj``, ...:
      a plain first-order update); with ``kl_clip = κ``
      the step is scaled by ``ν = min(1, sqrt(κ / (η² Σ p·d)))`` (Ba et al. 2017); then
      ``m ← μ m − η ν p``, ``θ ← θ + m`` (Gao et al.'s momentum form; with a constant ``η``,
      ``torch.optim.SGD``'s).

    Gradient accumulation: ``S_step`` holds every micro-batch backpropagated since the last
    ``step`` or ``zero_grad`` (a forward pass without ``backward`` adds nothing), weighted as
    the gradients are. If ``K`` micro-batches enter what is backpropagated as
    ``Σ_k c_k L_k`` (``L_k = loss_fn(model(X_k), y_k)``, ``c_k`` the gradient reaching ``L_k``:
    ``1`` for ``L_k.backward()``, ``1/K`` for ``(L_k / K).backward()``), each of their loss
    terms has the weight ``w_k = c_k / Z_k`` (``Z_k``: the terms ``L_k`` averages, 1 for a
    sum), and ``G = Σ_k w_k Σ_{n∈k} g g^T`` (per sampled label for ``"mc"``),
    ``A = Σ_k w_k Σ_{n∈k} a a^T / Σ_k w_k N_k S_k`` (TKFAC's sums and EKFAC's ``s`` likewise):
    the KFAC of the objective ``Σ_k c_k L_k`` whose gradient ``.grad`` holds. With
    ``c_k = Z_k / Σ_j Z_j`` (for equal micro-batches ``1/K``) that objective is the mean loss
    of the union batch, and the statistics are exactly :func:`~curvops.KFAC`'s on the
    concatenated batch.

    A step whose loss or gradient is not finite is skipped with a ``RuntimeWarning``
    (parameters, momentum and running statistics unchanged); so are unusable statistics
    (non-finite, or TKFAC's ``δ = 0``: the step then uses the previous preconditioner).
    ``state_dict`` holds the running statistics and the preconditioner, so training resumes
    bit for bit.

    The hooks never tie the model to the optimizer: ``copy.deepcopy(model)`` and
    ``torch.save(model)`` work at any point of the loop, and the copy (an EMA model, a
    checkpoint) carries inert hooks: it captures nothing and trains like any model (attach a
    new optimizer to it, e.g. with this one's ``state_dict``).

    Args:
        model: the network; hooks go on its Kronecker layers (``nn.Linear``, ``nn.Conv1d``,
            ``nn.Conv2d``, ``nn.Embedding``, as for :func:`~curvops.KFAC`).
        loss_fn: the ``nn.Module`` loss the training loop calls: ``nn.CrossEntropyLoss``,
            ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` (any module for ``"forward-only"``).
        params: the parameters to train (default: the model's trainable ones), one group: a
            list, or a dict of them (its values, in order); frozen ones (``requires_grad=False``)
            stay as they are and are not preconditioned.
        curvature: ``"kfac"``, ``"ekfac"`` or ``"tkfac"``.
        lr: ``η``, a number or a schedule ``step -> η`` (a number in ``param_groups`` also
            follows ``torch.optim.lr_scheduler``).
        momentum: ``μ`` in ``[0, 1)``.
        weight_decay: ``w >= 0`` (L2, added to the gradient before preconditioning).
        damping: ``λ > 0`` (``0`` raises ``SingularOperatorError`` on singular factors), a
            number or a schedule ``step -> λ``.
        ema_decay: ``β`` in ``[0, 1)``.
        T_stats: steps between statistics updates.
        T_inv: steps between preconditioner rebuilds, a multiple of ``T_stats``.
        fisher_type: ``"mc"``, ``"type-2"``, ``"empirical"`` (or ``"forward-only"``, KFAC only).
        mc_samples: labels drawn per datum for ``"mc"``; the draws of step ``t`` are seeded
            with ``(seed, t)`` (micro-batch ``m`` of an accumulated step: ``(seed, t + m·2²⁰)``).
        kl_clip: ``κ > 0``, or ``None`` for no clipping.
        factored: KFAC's π-damped inverse instead of the exact damped one.
        kfac_approx, bias, correction, seed: as for :func:`~curvops.KFAC` / :func:`~curvops.EKFAC`.

    Attributes:
        curvature_params: the preconditioned parameters (those of Kronecker layers), in order.
        layers: per Kronecker layer, its running statistics
            (:class:`~curvops.nn.kronecker_statistics.KroneckerLayer`).
        preconditioner: the current damped inverse, an operator on ``curvature_params``
            (``None`` before the first step).
        steps: the number of steps taken.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> loss_fn = torch.nn.CrossEntropyLoss()
        >>> opt = curvops.optim.KFACOptimizer(model, loss_fn, lr=0.1, damping=0.1)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> losses = []
        >>> for _ in range(10):
        ...     opt.zero_grad()
        ...     loss = loss_fn(model(x), y)
        ...     loss.backward()
        ...     opt.step()
        ...     losses.append(loss.item())
        >>> losses[-1] < losses[0]
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        params: Iterable[nn.Parameter] | None = None,
        curvature: str = "kfac",
        lr: Schedule = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: Schedule = 1e-3,
        ema_decay: float = 0.95,
        T_stats: int = 1,
        T_inv: int = 10,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kl_clip: float | None = None,
        factored: bool = False,
        kfac_approx: str = "expand",
        bias: str = "separate",
        correction: str = "auto",
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        check_choice(curvature, CURVATURES, "curvature")
        check_choice(fisher_type, FISHER_TYPES, "fisher_type")
        check_choice(kfac_approx, KFAC_APPROXIMATIONS, "kfac_approx")
        check_choice(bias, ("separate", "joint"), "bias")
        check_choice(correction, CORRECTIONS, "correction")
        if curvature != "kfac" and fisher_type == "forward-only":
            raise ValueError(
                f"{curvature.upper()} needs output gradients; fisher_type='forward-only' has none."
            )
        if not isinstance(loss_fn, nn.Module):
            raise TypeError(
                "loss_fn must be the nn.Module loss the training loop calls (e.g. nn.CrossEntropyLoss()): "
                f"the optimizer hooks it; got {type(loss_fn).__name__}."
            )
        check_fraction(momentum, "momentum")
        check_fraction(ema_decay, "ema_decay")
        check_positive_int(T_stats, "T_stats")
        check_positive_int(T_inv, "T_inv")
        if T_inv % T_stats:
            raise ValueError(f"T_inv ({T_inv}) must be a multiple of T_stats ({T_stats}).")
        check_positive_int(mc_samples, "mc_samples")
        if kl_clip is not None:
            check_positive(kl_clip, "kl_clip")
        check_nonnegative(weight_decay, "weight_decay")
        check_bool(factored, "factored")
        check_int(seed, "seed")
        self._lr, self._damping = check_schedule(lr, "lr"), check_schedule(damping, "damping")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            params = as_parameter_list(params)
        if any(isinstance(p, dict) for p in params):
            raise TypeError("KFACOptimizer takes one group of parameters, not a list of param-group dicts.")
        defaults = {
            "lr": evaluate(self._lr, 0, "lr"),
            "momentum": float(momentum),
            "weight_decay": float(weight_decay),
            "damping": evaluate(self._damping, 0, "damping"),
        }
        super().__init__(params, defaults)
        self.curvature, self.fisher_type, self.factored = curvature, fisher_type, factored
        self.ema_decay, self.T_stats, self.T_inv, self.kl_clip = float(ema_decay), T_stats, T_inv, kl_clip
        self.correction = correction
        trainable = [p for p in params if p.requires_grad]  # a frozen one is not trained, as in torch.optim
        self.layers, _ = find_layers(model, trainable, bias, kfac_approx)
        if not self.layers:
            raise ValueError(
                "None of the parameters belongs to a layer with a Kronecker rule (nn.Linear, nn.Conv1d, "
                "nn.Conv2d, nn.Embedding); use a first-order optimizer."
            )
        covered = {id(p) for layer in self.layers for p in (layer.weight, layer.bias) if p is not None}
        self.curvature_params = [p for p in params if id(p) in covered]
        self._layout = Layout(self.curvature_params)
        loss = LossAdapter(
            loss_fn, likelihood=fisher_type != "forward-only", what=f"KFACOptimizer({fisher_type!r})"
        )
        if fisher_type in ("type-2", "mc"):
            loss.check_sampling(f"KFACOptimizer({fisher_type!r})")
        first = self.curvature_params[0]
        self._batch_layers = [
            KroneckerLayer(la.name, la.module, la.weight, la.bias, la.joint) for la in self.layers
        ]
        self._sums = KroneckerSums(
            self._batch_layers, fisher_type, kfac_approx, mc_samples, first.dtype, first.device
        )
        self._capture = BatchCapture(
            model, loss_fn, loss, self._batch_layers, fisher_type, mc_samples,
            active=lambda: self.steps % self.T_stats == 0, draw=lambda: (seed, self.steps),
        )  # fmt: skip
        self.steps = 0
        self.bases: dict[str, tuple[Tensor, Tensor | None, Tensor]] = {}
        self.scales: dict[str, list[Tensor | None]] = {}
        self.preconditioner: CurvatureOperator | None = None

    # ------------------------------------------------------------------ public
    def curvature_operator(self) -> CurvatureOperator:
        """The current (undamped) curvature approximation of the Kronecker layers' parameters
        from the running statistics: the operator :func:`~curvops.KFAC` (``EKFAC``, ``TKFAC``)
        would build, ``D x D`` over :attr:`curvature_params` in their order.

        Raises ``RuntimeError`` before the first statistics update.
        """
        self._require_statistics()
        if self.curvature == "ekfac":
            blocks = [corrected_blocks(la, self.bases[la.name], self.scales[la.name]) for la in self.layers]
        else:
            blocks = [kronecker_blocks(la, self.curvature) for la in self.layers]
        return self._assemble(blocks)

    def remove_hooks(self) -> None:
        """Remove the hooks on the model and the loss (the optimizer can no longer step)."""
        self._capture.remove()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; the statistics of the backward passes since the
        last step are dropped with the gradients they belong to."""
        super().zero_grad(set_to_none)
        self._capture.clear()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update from the gradients in ``.grad`` (see the class docstring).

        Args:
            closure: optional; re-evaluates the model and returns the loss (run with grad enabled).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        batches, nonfinite_loss = self._capture.batches, self._capture.nonfinite_loss
        self._capture.clear(pending=True)
        if nonfinite_loss or not all_finite([p.grad for p in group["params"] if p.grad is not None]):
            warnings.warn(
                f"KFACOptimizer step {self.steps}: non-finite loss or gradient; the step is skipped "
                "(parameters and running statistics unchanged).",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        group["lr"] = lr = evaluate(self._lr, self.steps, "lr", group["lr"])
        group["damping"] = damping = evaluate(self._damping, self.steps, "damping", group["damping"])
        if self.steps % self.T_stats == 0:
            if not batches:
                raise RuntimeError(
                    "KFACOptimizer saw no forward and backward pass through its loss_fn since the last "
                    "step or zero_grad: compute the loss with the loss_fn module passed to the optimizer "
                    "and call backward() on it."
                )
            self._update(batches, damping)
        if self.preconditioner is None:
            warnings.warn(
                f"KFACOptimizer step {self.steps}: no curvature statistics yet; the step is skipped.",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        self._apply(group, lr)
        self.steps += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state (momentum buffers, hyperparameters) plus ``"curvature"``:
        the step count, running statistics, EKFAC's bases and eigenvalues and the
        preconditioner's own :meth:`~curvops.CurvatureOperator.state_dict`."""
        state = super().state_dict()
        state["curvature"] = {
            "curvature": self.curvature,
            "steps": self.steps,
            "statistics": {la.name: self._statistics(la) for la in self.layers},
            "bases": {name: list(basis) for name, basis in self.bases.items()},
            "scales": {name: list(scale) for name, scale in self.scales.items()},
            "preconditioner": None if self.preconditioner is None else self.preconditioner.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises :class:`~curvops.errors.StateDictError`, before
        changing anything, when it belongs to other layers, shapes or curvature (naming the key)."""
        state = dict(state_dict)
        extra = state.pop("curvature", None)
        if not isinstance(extra, dict):
            raise StateDictError("Not a KFACOptimizer state dict: it has no 'curvature' entry.")
        missing = [key for key in CURVATURE_STATE if key not in extra]
        if missing:
            raise StateDictError(f"{STATE} 'curvature' entry has no {missing} keys.")
        for kind in ("statistics", "bases", "scales"):
            if not isinstance(extra[kind], dict):
                raise StateDictError(f"{STATE} ['curvature'][{kind!r}] must be a dict, got {extra[kind]!r}.")
        if extra["curvature"] != self.curvature:
            raise StateDictError(
                f"The state dict holds {str(extra.get('curvature')).upper()} statistics; this optimizer "
                f"uses {self.curvature.upper()}."
            )
        names = {la.name for la in self.layers}
        stored = set(extra["statistics"])
        if stored != names:
            raise StateDictError(
                f"The state dict's layers {sorted(stored)} differ from the optimizer's {sorted(names)}."
            )
        steps = extra["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise StateDictError(f"{STATE} ['curvature']['steps'] must be an integer >= 0, got {steps!r}.")
        self._check_running_state(extra)
        self._check_momentum(state)
        preconditioner = None
        if extra["preconditioner"] is not None:
            preconditioner = from_state_dict(extra["preconditioner"], device=self._sums.device)
            if preconditioner.shape != (self._layout.size, self._layout.size):
                raise StateDictError(
                    f"The stored preconditioner is {tuple(preconditioner.shape)}; the optimizer's "
                    f"parameters need {(self._layout.size, self._layout.size)}."
                )
        state["state"] = copy.deepcopy(state.get("state", {}))  # momentum buffers of its own: no aliasing
        super().load_state_dict(state)
        place_ = {"device": self._sums.device, "dtype": self._sums.dtype}
        for la in self.layers:
            for name, value in extra["statistics"][la.name].items():
                setattr(la, name, value.to(**place_))
        self.bases = {
            n: tuple(None if q is None else q.to(**place_) for q in b) for n, b in extra["bases"].items()
        }
        self.scales = {
            n: [None if s is None else s.to(**place_) for s in v] for n, v in extra["scales"].items()
        }
        self.preconditioner = preconditioner
        self.steps = int(extra["steps"])

    # ------------------------------------------------------------------ internals
    def _check_running_state(self, extra: dict[str, Any]) -> None:
        """Raise unless every stored statistic, basis and eigenvalue tensor has the shape this
        optimizer's layers give it."""
        for kind in ("bases", "scales"):
            if set(extra[kind]) - {la.name for la in self.layers}:
                raise StateDictError(
                    f"{STATE} ['curvature'][{kind!r}] names layers {sorted(extra[kind])}; the optimizer has "
                    f"{[la.name for la in self.layers]}."
                )
        for layer in self.layers:
            self._check_layer_state(layer, extra)

    def _check_layer_state(self, layer: KroneckerLayer, extra: dict[str, Any]) -> None:
        expected = _running_shapes(layer, self.curvature)
        statistics, key = extra["statistics"][layer.name], f"['statistics'][{layer.name!r}]"
        if not isinstance(statistics, dict):
            raise StateDictError(f"{STATE} ['curvature']{key} must be a dict of tensors, got {statistics!r}.")
        if set(statistics) not in (set(), set(expected["statistics"])):
            raise StateDictError(
                f"{STATE} ['curvature']{key} holds {sorted(statistics)}; {self.curvature.upper()} needs "
                f"{sorted(expected['statistics'])}."
            )
        for name, value in statistics.items():
            _check_tensor(f"{key}[{name!r}]", value, expected["statistics"][name])
        for kind in ("bases", "scales"):
            if layer.name in extra[kind]:
                stored, shapes, key = extra[kind][layer.name], expected[kind], f"[{kind!r}][{layer.name!r}]"
                if not isinstance(stored, (list, tuple)) or len(stored) != len(shapes):
                    raise StateDictError(
                        f"{STATE} ['curvature']{key} must be a list of {len(shapes)} entries, got {stored!r}."
                    )
                for i, (value, shape) in enumerate(zip(stored, shapes, strict=True)):
                    _check_tensor(f"{key}[{i}]", value, shape)

    def _check_momentum(self, state: dict[str, Any]) -> None:
        """Raise unless every stored momentum buffer has its parameter's shape."""
        params = self.param_groups[0]["params"]
        for index, entry in state.get("state", {}).items():
            buffer = entry.get("momentum_buffer") if isinstance(entry, dict) else None
            if buffer is not None and isinstance(index, int) and 0 <= index < len(params):
                key = f"['state'][{index}]['momentum_buffer']"
                if not isinstance(buffer, Tensor) or buffer.shape != params[index].shape:
                    raise StateDictError(
                        f"{STATE} {key} is {_describe(buffer)}; parameter {index} "
                        f"has shape {list(params[index].shape)}."
                    )

    def _statistics(self, layer: KroneckerLayer) -> dict[str, Tensor]:
        return {name: getattr(layer, name) for name in STATISTICS if getattr(layer, name) is not None}

    def _require_statistics(self) -> None:
        if self.layers[0].input_factor is None:
            raise RuntimeError("No curvature statistics yet: take a training step first.")

    def _assemble(self, blocks: list[list[CurvatureOperator]]) -> CurvatureOperator:
        device = self._sums.device
        entries = [
            e for la, b in zip(self.layers, blocks, strict=True) for e in place(la, b, self._layout, device)
        ]
        return assemble(
            sorted(entries, key=lambda entry: int(entry[2].min())), self.curvature_params[0].dtype
        )

    def _update(self, batches: list[CapturedBatch], damping: float) -> None:
        """Fold the step's micro-batches into the running statistics and rebuild what depends on them."""
        if not self._average(batches):
            return
        rebuild = self.steps % self.T_inv == 0 or self.preconditioner is None
        if self.curvature == "ekfac":
            if rebuild:
                self._new_eigenbases()
            self._correct(batches)
            rebuild = True
        if rebuild:
            self._rebuild(damping)

    def _average(self, batches: list[CapturedBatch]) -> bool:
        """``S ← β S + (1 - β) S_step`` for every statistic; ``False`` (and a warning) when the
        step's statistics are unusable, which leaves the averages untouched."""
        self._sums.reset(trace_restricted=self.curvature == "tkfac")
        layers = self._batch_layers
        for batch in batches:
            for layer, inputs, gradients in zip(layers, batch.inputs, batch.gradients, strict=True):
                self._sums.add(layer, inputs, gradients, batch.weight)
        usable = self._usable_statistics()
        if usable:
            self._sums.finish(1.0)  # the weights w_k = c_k / Z_k hold the normalisation
            usable = self._usable_statistics()
        if not usable:
            warnings.warn(
                f"KFACOptimizer step {self.steps}: non-finite curvature statistics (or TKFAC's δ = 0); "
                "they are left out of the running averages.",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        fresh = [self._statistics(layer) for layer in self._batch_layers]
        for layer, values in zip(self.layers, fresh, strict=True):
            for name, value in values.items():
                old = getattr(layer, name)
                setattr(layer, name, value if old is None else torch.lerp(value, old, self.ema_decay))
        return True

    def _usable_statistics(self) -> bool:
        """Whether the step's statistics are finite and every TKFAC ``δ`` is positive."""
        values = [value for layer in self._batch_layers for value in self._statistics(layer).values()]
        traces = [layer.trace for layer in self._batch_layers if layer.trace is not None]
        return all_finite(values) and (not traces or bool((torch.stack(traces) > 0).all()))

    def _new_eigenbases(self) -> None:
        """EKFAC: the eigenbasis of the running ``G ⊗ A``, with ``s`` restarted from ``γ α^T``."""
        for layer in self.layers:
            basis, (gamma, alpha, bias) = eigenbasis(layer, "ekfac")
            weight = torch.outer(alpha, gamma) if layer.embedding else torch.outer(gamma, alpha)
            self.bases[layer.name] = basis
            self.scales[layer.name] = [
                weight if layer.weight is not None else None,
                bias if layer.bias is not None and not layer.joint else None,
            ]

    def _correct(self, batches: list[CapturedBatch]) -> None:
        """EKFAC: the step's eigenvalues in the current basis, ``Σ_k w_k s_k``, enter the running ``s``."""
        scale = self._sums.scale(1.0)
        for index, layer in enumerate(self._batch_layers):
            basis = self.bases[layer.name]
            weighted = [
                [None if part is None else batch.weight * part for part in self._sums.correction(
                    layer, batch.inputs[index], batch.gradients[index], basis, self.correction)]
                for batch in batches
            ]  # fmt: skip
            running = self.scales[layer.name]
            for i, parts in enumerate(zip(*weighted, strict=True)):
                if parts[0] is not None:
                    running[i] = torch.lerp(sum(parts) / scale, running[i], self.ema_decay)

    def _rebuild(self, damping: float) -> None:
        if self.curvature == "tkfac":
            self.preconditioner = self._assemble([self._tkfac_inverse(la, damping) for la in self.layers])
        else:
            self.preconditioner = self.curvature_operator().inverse(damping, factored=self.factored)

    def _tkfac_inverse(self, layer: KroneckerLayer, damping: float) -> list[CurvatureOperator]:
        """Gao et al.'s damped inverse ``(√δ Ψ + √λ I)^-1 ⊗ (√δ Φ + √λ I)^-1`` (and a separate
        bias's ``(G + λI)^-1``, ``G`` scaled to the bias block's trace)."""
        blocks = []
        if layer.weight is not None:
            root, scale = math.sqrt(damping), layer.trace.sqrt()
            phi = _damped_inverse(scale * layer.trace_input_factor, root)
            psi = _damped_inverse(scale * layer.trace_output_factor, root)
            blocks.append(Kronecker(*((phi, psi) if layer.embedding else (psi, phi))))
        if layer.bias is not None and not layer.joint:
            g = layer.output_factor
            blocks.append(Dense(g * (layer.bias_trace / g.trace())).inverse(damping))
        return blocks

    def _apply(self, group: dict[str, Any], lr: float) -> None:
        """``p = P d`` on the Kronecker parameters, ``p = d`` elsewhere; KL clipping; momentum."""
        directions = {
            id(p): p.grad + group["weight_decay"] * p if group["weight_decay"] else p.grad
            for p in group["params"]
            if p.grad is not None
        }
        steps = dict(directions)
        flat = torch.cat([directions[id(p)].reshape(-1) if id(p) in directions else p.new_zeros(p.numel())
                          for p in self.curvature_params])  # fmt: skip
        preconditioned = self.preconditioner @ flat
        offset = 0
        for p in self.curvature_params:
            if id(p) in steps:
                steps[id(p)] = preconditioned[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        nu = 1.0
        if self.kl_clip is not None:
            quadratic = lr**2 * float(sum((steps[k] * directions[k]).sum() for k in directions))
            nu = min(1.0, math.sqrt(self.kl_clip / quadratic)) if quadratic > 0 else 1.0
        momentum = group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            update = steps[id(p)] * (-lr * nu)
            if momentum:
                state = self.state[p]
                buffer = state.get("momentum_buffer")
                update = update if buffer is None else buffer.mul_(momentum).add_(update)
                state["momentum_buffer"] = update
            p.add_(update)


def _running_shapes(layer: KroneckerLayer, curvature: str) -> dict[str, Any]:
    """The shapes of a layer's running state: ``"statistics"`` by name (those of
    :attr:`KFACOptimizer.layers`), and EKFAC's ``"bases"`` ``(Q_out, Q_in, Q_bias)`` and
    ``"scales"`` ``(s_weight, s_bias)`` (``None`` where the layer has no such entry)."""
    weight = layer.module.weight
    if layer.embedding:
        n_in, n_out = weight.shape
    else:
        n_in, n_out = weight[0].numel() + layer.joint, weight.shape[0]
    input_shape = (n_in,) if layer.embedding else (n_in, n_in)
    output_shape = (n_out, n_out)
    statistics = {"input_factor": input_shape, "output_factor": output_shape}
    if curvature == "tkfac":
        statistics.update(trace=(), trace_input_factor=input_shape, trace_output_factor=output_shape)
        if layer.bias is not None and not layer.joint:
            statistics["bias_trace"] = ()
    separate_bias = (n_out,) if layer.bias is not None and not layer.joint else None
    weight_scale = None if layer.weight is None else ((n_in, n_out) if layer.embedding else (n_out, n_in))
    return {
        "statistics": statistics,
        "bases": (output_shape, None if layer.embedding else input_shape, output_shape),
        "scales": (weight_scale, separate_bias),
    }


def _describe(value: Any) -> str:
    return f"a tensor of shape {list(value.shape)}" if isinstance(value, Tensor) else repr(value)


def _check_tensor(key: str, value: Any, shape: tuple[int, ...] | None) -> None:
    """Raise :class:`StateDictError` naming ``['curvature']`` ``key`` unless ``value`` is a tensor of
    ``shape`` (or ``None`` where the shape is ``None``)."""
    if shape is None and value is None:
        return
    if shape is None or not isinstance(value, Tensor) or tuple(value.shape) != tuple(shape):
        wanted = "None" if shape is None else f"a tensor of shape {list(shape)}"
        raise StateDictError(
            f"{STATE} ['curvature']{key} is {_describe(value)}; this optimizer needs {wanted}."
        )


def _damped_inverse(factor: Tensor, damping: float) -> Tensor:
    """``(F + λI)^-1`` of one Kronecker factor as a tensor (1-D for a diagonal factor), from
    the operator's exact damped inverse."""
    if factor.ndim == 1:
        return Diagonal(factor).inverse(damping).diagonal()
    inverse = Dense(factor).inverse(damping).to_dense()
    return 0.5 * (inverse + inverse.T)
