"""Natural-gradient training with KFAC, EKFAC or TKFAC as a ``torch.optim.Optimizer``.

The optimizer is a thin client of the curvature operators: it keeps running averages of
the Kronecker statistics (:class:`~curvops.nn.statistics.LayerStatistics` values, from the
batches that the hooks of :mod:`curvops.optim.capture` catch), has the approximation object
(:mod:`curvops.nn.approximations`) build the same blocks as :func:`~curvops.KFAC`,
:func:`~curvops.EKFAC` and :func:`~curvops.TKFAC` from them and damp them. No Kronecker
algebra is written here.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import Shards, decompose_blocks
from ..linalg import CurvatureOperator, computation_dtype
from ..linalg.checks import check_bool, check_nonnegative, check_positive, check_positive_int
from ..nn.approximations import Basis
from ..nn.assembly import Layout, assemble
from ..nn.kronecker_pass import changed_call_error
from ..nn.layers import KroneckerLayer, calls_from_names, find_layers
from ..nn.options import KroneckerOptions
from ..nn.parameters import as_parameter_list
from ..nn.statistics import Corrections, LayerStatistics
from ..nn.tied import check_ties, merged_ties
from .capture import BatchCapture, CapturedBatch
from .kfac_state import check_momentum, check_running_state, load_curvature_state
from .kfac_steps import (
    agree,
    eigenbases,
    step_corrections,
    step_statistics,
    step_weights,
    unwrapped,
)
from .schedule import Schedule, check_fraction, check_schedule, evaluate

CURVATURES = ("kfac", "ekfac", "tkfac", "tekfac")


class KFACOptimizer(torch.optim.Optimizer):
    """Natural-gradient descent preconditioned by KFAC, EKFAC, TKFAC or TEKFAC (Martens & Grosse
    2015; George et al. 2018; Gao et al. 2021).

    Use it in an ordinary training loop, computing the loss with the same ``loss_fn``
    module: ``loss = loss_fn(model(x), y); loss.backward(); opt.step()``. Hooks catch each
    layer's inputs and, during ``backward``, backpropagate the Fisher type's output-space
    columns to the layer outputs (labels sampled from the model for ``"mc"``); ``.grad``
    stays the gradient of the true-label loss. The model may take keyword arguments and return
    a mapping (``loss_fn(model(**inputs)["logits"], labels)``). A layer called several times is
    shared over its calls, a tied weight gets KFAC's nearest Kronecker block (``"kfac"`` only),
    as in :func:`~curvops.KFAC`; an ``nn.MultiheadAttention``'s layers follow its first captured
    call (:attr:`layers` may change then, once, before any statistics).

    Per step ``t`` (counting from 0):

    - every ``T_stats`` steps, the step's statistics (``A``, ``G``; TKFAC's ``δ``, ``Φ``,
      ``Ψ``) enter exponential moving averages ``S ← β S + (1 - β) S_step`` (``β =
      ema_decay``; the first step initialises them). EKFAC also averages its corrected
      eigenvalues ``s`` of the step in the current eigenbasis.
    - every ``T_inv`` steps (a multiple of ``T_stats``), the preconditioner is rebuilt from
      the averages with the step's damping ``λ``: KFAC ``(G ⊗ A + λI)^-1`` (exact, or
      π-damped with ``factored=True``); EKFAC recomputes its eigenbasis ``Q_G ⊗ Q_A`` and
      restarts ``s`` from KFAC's eigenvalues ``γ α^T`` (its inverse ``(s + λ)^-1`` is rebuilt
      at every statistics step; TEKFAC likewise in TKFAC's eigenbasis); TKFAC
      ``(δ Ψ ⊗ Φ + λI)^-1``, or with ``factored=True`` Gao et
      al.'s damped factors ``(√δ Ψ + √λ I)^-1 ⊗ (√δ Φ + √λ I)^-1``. A separate bias block is
      ``(G + λI)^-1``. A normalization layer's running exact block ``B`` (the same for every
      curvature, :mod:`curvops.nn.layers.norm`) gives ``(B + λI)^-1``, exact whatever
      ``factored`` says (it has no factors). Every damped inverse is the approximation's own
      (:meth:`~curvops.nn.approximations.KroneckerApproximation.damped_inverse`).
    - the step: ``d = ∇ + w θ`` (``w = weight_decay``), ``p = P d`` with the
      preconditioner ``P`` on the parameters of layers with a rule and ``p = d`` on every other
      parameter (an attention's ``bias_k``/``bias_v``, a module without a rule, ...:
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

    A step whose loss or gradient is not finite is skipped with a ``RuntimeWarning`` (parameters,
    momentum and running statistics unchanged); so are unusable statistics (non-finite, or
    TKFAC's ``δ = 0``: the step then uses the previous preconditioner). ``state_dict`` holds the
    running statistics and the preconditioner, so training resumes bit for bit.

    Distributed training: ``model`` may be a ``DistributedDataParallel`` wrapper (or its module).
    Every rank's batch is a shard; each statistics step sums the statistics over the ranks once,
    each ``w_k`` normalised by the loss terms of all ranks. Each factor is decomposed on one rank
    (:mod:`curvops.optim.kfac_steps`). Every rank then takes the same step, that of one process on
    the global batch for a mean loss over equal shards (``no_sync`` accumulation included).

    The hooks never tie the model to the optimizer: ``copy.deepcopy(model)`` and
    ``torch.save(model)`` work at any point of the loop, and the copy (an EMA model, a
    checkpoint) carries inert hooks: it captures nothing and trains like any model (attach a
    new optimizer to it, e.g. with this one's ``state_dict``).

    Args:
        model: the network; hooks go on its layers with a rule (as for :func:`~curvops.KFAC`,
            grouped convolutions, attention and normalization layers included; a batch norm in
            train mode normalises with the batch's statistics, as it does).
        loss_fn: the ``nn.Module`` loss the training loop calls: ``nn.CrossEntropyLoss``,
            ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` (any module for ``"forward-only"``).
        params: the parameters to train (default: the model's trainable ones), one group: a
            list, or a dict of them (its values, in order); frozen ones (``requires_grad=False``)
            stay as they are and are not preconditioned.
        curvature: ``"kfac"``, ``"ekfac"``, ``"tkfac"`` or ``"tekfac"`` (EKFAC's corrected
            eigenvalues in TKFAC's eigenbasis, as ``TKFAC(eigenvalue_correction=True)``).
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
            with ``(seed, t)`` (micro-batch ``m`` of an accumulated step: ``(seed, t + m·2²⁰)``;
            every rank but rank 0 of a group its own seed, :meth:`~curvops.distributed.Shards.seed`).
        kl_clip: ``κ > 0``, or ``None`` for no clipping.
        factored: the factored damping instead of the exact damped inverse, for every curvature:
            KFAC's π-damping, TKFAC's per-factor damping of Gao et al.; EKFAC (whose damped
            inverse is exact and cheap) refuses it.
        kfac_approx, bias, correction, seed: as for :func:`~curvops.KFAC` / :func:`~curvops.EKFAC`.
        group: the process group whose ranks hold shards of each step's batch (``None``: a
            ``DistributedDataParallel`` model's group, else the default group when
            torch.distributed is initialized); ``"local"`` keeps this process's data alone.

    Attributes:
        curvature_params: the preconditioned parameters (those of layers with a rule), in order.
        layers: per Kronecker layer, its running statistics, an immutable
            :class:`~curvops.nn.statistics.LayerStatistics` (replaced at every statistics step;
            :attr:`~curvops.nn.statistics.LayerStatistics.empty` before the first).
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
        group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        model, model_group = unwrapped(model)
        self._shards = Shards.of(model_group if group is None else group)
        self.options = KroneckerOptions.checked(
            curvature, fisher_type, kfac_approx, bias, mc_samples, seed, correction, CURVATURES, "curvature"
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
        if kl_clip is not None:
            check_positive(kl_clip, "kl_clip")
        check_nonnegative(weight_decay, "weight_decay")
        self.approximation = self.options.approximation
        self.approximation.check_factored(check_bool(factored, "factored"))
        self._lr, self._damping = check_schedule(lr, "lr"), check_schedule(damping, "damping")
        params = (
            [p for p in model.parameters() if p.requires_grad]
            if params is None
            else as_parameter_list(params)
        )
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
        trainable = [p for p in params if p.requires_grad]  # a frozen one is not trained, as in torch.optim
        self._find_layers = functools.partial(find_layers, model, trainable, bias, kfac_approx)
        self._calls: dict[int, frozenset] = {}  # the parts of modules whose parts depend on the call
        layers, _ = self._find_layers()
        check_ties(layers, self.approximation)
        if not layers:
            raise ValueError(
                "None of the parameters belongs to a layer with a Kronecker rule (nn.Linear, nn.Conv1d, "
                "nn.Conv2d, nn.Conv3d (grouped or not), nn.Embedding, nn.MultiheadAttention, a normalization "
                "layer, or one registered with curvops.nn.layers.register_layer_rule); "
                "use a first-order optimizer."
            )
        covered = {id(p) for layer in layers for p in (layer.weight, layer.bias) if p is not None}
        self.curvature_params = [p for p in params if id(p) in covered]
        self._layout = Layout(self.curvature_params)
        first = self.curvature_params[0]
        self._device, self._dtype = first.device, computation_dtype(first.dtype)
        self.layers = [LayerStatistics(layer) for layer in layers]
        self._capture = BatchCapture(
            model,
            loss_fn,
            self.options.loss(loss_fn, f"KFACOptimizer({fisher_type!r})"),
            layers,
            self.options.fisher,
            mc_samples,
            active=lambda: self.steps % self.T_stats == 0,
            draw=lambda: (self._shards.seed(seed), self.steps),
            relayer=self._relayer,
        )
        self.steps = 0
        self.bases: dict[str, Basis] = {}
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
        return self._assemble(self._blocks())

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
        batches = self._capture.batches
        agreed = agree(self._shards, self._capture, [p.grad for p in group["params"] if p.grad is not None])
        self._capture.clear(pending=True)
        if agreed.skip:
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
            if not agreed.batches:
                raise RuntimeError(
                    "KFACOptimizer saw no forward and backward pass through its loss_fn since the last "
                    "step or zero_grad: compute the loss with the loss_fn module passed to the optimizer "
                    "and call backward() on it."
                )
            self._update(batches, step_weights(batches, agreed.totals, self._capture.loss), damping)
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
            "statistics": {s.layer.name: s.tensors() for s in self.layers},
            "bases": {name: list(basis) for name, basis in self.bases.items()},
            "scales": {name: list(scale) for name, scale in self.scales.items()},
            "preconditioner": None if self.preconditioner is None else self.preconditioner.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises :class:`~curvops.errors.StateDictError`, before
        changing anything, when it belongs to other layers, shapes or curvature (naming the key)."""
        state = dict(state_dict)
        layers = [s.layer for s in self.layers]
        stored, calls = state.get("curvature"), self._calls
        if isinstance(stored, dict) and isinstance(stored.get("statistics"), dict):  # the stored calls' parts
            calls = {**calls, **calls_from_names(layers, stored["statistics"])}
            layers, _ = self._find_layers(calls)
        extra = check_running_state(state.pop("curvature", None), self.approximation, layers)
        check_momentum(state, self.param_groups[0]["params"])
        loaded = load_curvature_state(extra, layers, self._layout.size, self._device, self._dtype)
        state["state"] = copy.deepcopy(state.get("state", {}))  # momentum buffers of its own: no aliasing
        super().load_state_dict(state)
        self.layers, self.bases, self.scales, self.preconditioner = loaded
        self.steps, self._calls = int(extra["steps"]), calls
        self._capture.use(layers)

    # ------------------------------------------------------------------ internals
    def _relayer(self, module: nn.Module, parts: frozenset) -> list[KroneckerLayer]:
        """The layers once ``module`` is called with ``parts`` (an attention module's first call);
        raises if statistics were made with its other parts."""
        if self.steps:
            raise changed_call_error(
                next(s.layer.module_name for s in self.layers if s.layer.module is module), parts
            )
        self._calls[id(module)] = parts
        layers, _ = self._find_layers(self._calls)
        self.layers = [LayerStatistics(layer) for layer in layers]
        return layers

    def _require_statistics(self) -> None:
        if self.layers[0].empty:
            raise RuntimeError("No curvature statistics yet: take a training step first.")

    def _blocks(self) -> list[list[CurvatureOperator]]:
        """Each layer's blocks from the running state."""
        approximation = self.approximation
        if approximation.corrected:
            return [
                approximation.corrected_blocks(
                    s.layer, self.bases[s.layer.name], Corrections(*self.scales[s.layer.name])
                )
                if approximation.corrects(s.layer)
                else approximation.kronecker_blocks(s)
                for s in self.layers
            ]
        return merged_ties(
            [s.layer for s in self.layers], [approximation.kronecker_blocks(s) for s in self.layers]
        )

    def _assemble(self, blocks: list[list[CurvatureOperator]]) -> CurvatureOperator:
        entries = [
            entry
            for s, layer_blocks in zip(self.layers, blocks, strict=True)
            for entry in self._layout.place(s.layer, layer_blocks, self._device)
        ]
        return assemble(entries, self.curvature_params[0].dtype)

    def _update(self, batches: list[CapturedBatch], weights: list[float], damping: float) -> None:
        """Fold the step's micro-batches (``weights``: their ``w_k``) into the running statistics
        and rebuild what depends on them."""
        if not self._average(batches, weights):
            return
        rebuild = self.steps % self.T_inv == 0 or self.preconditioner is None
        if self.approximation.corrected:
            if rebuild:
                for name, (basis, scales) in eigenbases(
                    self.approximation, self.layers, self._shards
                ).items():
                    self.bases[name], self.scales[name] = basis, scales
            self._correct(batches, weights)
            rebuild = True
        if rebuild:
            blocks = self._blocks()
            decompose_blocks(
                [b for layer_blocks in blocks for b in layer_blocks if b is not None], self._shards
            )
            damped = [
                [
                    None
                    if block is None
                    else self.approximation.damped_inverse(block, damping, self.factored)
                    for block in layer_blocks
                ]
                for layer_blocks in blocks
            ]
            self.preconditioner = self._assemble(damped)

    def _average(self, batches: list[CapturedBatch], weights: list[float]) -> bool:
        """``S ← β S + (1 - β) S_step`` for every statistic; ``False`` (and a warning) when the
        step's statistics are unusable, which leaves the averages untouched."""
        step = step_statistics(self.layers, batches, weights, self.options, self._dtype, self._shards)
        if step is None:
            warnings.warn(
                f"KFACOptimizer step {self.steps}: non-finite curvature statistics (or TKFAC's δ = 0); "
                "they are left out of the running averages.",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        self.layers = [old.average(new, self.ema_decay) for old, new in zip(self.layers, step, strict=True)]
        return True

    def _correct(self, batches: list[CapturedBatch], weights: list[float]) -> None:
        """EKFAC: the step's eigenvalues in the current basis, ``Σ_k w_k s_k``, enter the running ``s``."""
        corrections = step_corrections(self.layers, self.bases, batches, weights, self.options, self._shards)
        for name, step in corrections.items():
            running = self.scales[name]
            for i, new in enumerate((step.weight, step.bias)):
                if new is not None:
                    running[i] = torch.lerp(new, running[i], self.ema_decay)

    def _apply(self, group: dict[str, Any], lr: float) -> None:
        """``p = P d`` on the Kronecker parameters, ``p = d`` elsewhere; KL clipping; momentum."""
        directions = {
            id(p): p.grad + group["weight_decay"] * p if group["weight_decay"] else p.grad
            for p in group["params"]
            if p.grad is not None
        }
        steps = dict(directions)
        flat = torch.cat(
            [
                directions[id(p)].reshape(-1) if id(p) in directions else p.new_zeros(p.numel())
                for p in self.curvature_params
            ]
        )
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
