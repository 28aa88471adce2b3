"""Kronecker statistics of the batches of an ordinary training loop, caught with hooks.

The optimizer cannot run passes over a data set of its own: it sees the user's forward
pass and ``loss.backward()``. Forward hooks on the layers keep their inputs and outputs; a
forward hook on the loss module keeps the model output and the targets, and puts a hook on
the output's gradient. When the user's backward pass reaches the output (the graph below
it is still intact), that hook backpropagates the output-space columns of the Fisher type
(sampled labels for ``"mc"``, the loss-Hessian factor for ``"type-2"``, the true labels for
``"empirical"``) to the layer outputs with ``torch.autograd.grad``: the parameters' ``.grad``
stays the true-label gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..nn.kronecker_statistics import KroneckerLayer, check_single_call, output_columns, output_gradients
from ..nn.losses import LossAdapter


@dataclass
class CapturedBatch:
    """One batch's layer inputs, output gradients ``[K, N, S, n_out]`` (``None`` for
    ``"forward-only"``) and normaliser ``Z`` (the loss terms of a mean, 1 for a sum)."""

    inputs: list[Tensor]
    gradients: list[Tensor | None]
    normalizer: float


class BatchCapture:
    """Hooks that turn each training batch into a :class:`CapturedBatch`.

    Args:
        model: the network (its forward pre-hook starts a new capture).
        loss_fn: the ``nn.Module`` loss the training loop calls on the model output.
        loss: its :class:`~curvops.nn.losses.LossAdapter`.
        layers: the layers to capture.
        fisher_type: as for :func:`~curvops.KFAC`.
        mc_samples: labels drawn per datum for ``"mc"``.
        active: called with no arguments; whether the current forward pass is to be captured.
        draw: called with no arguments; the ``(seed, index)`` of the ``"mc"`` label draws.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        loss: LossAdapter,
        layers: list[KroneckerLayer],
        fisher_type: str,
        mc_samples: int,
        active: Callable[[], bool],
        draw: Callable[[], tuple[int, int]],
    ) -> None:
        self.loss, self.layers, self.fisher_type, self.mc_samples = loss, layers, fisher_type, mc_samples
        self.active, self.draw = active, draw
        self.batch: CapturedBatch | None = None
        self.nonfinite_loss = False
        self._busy = False  # inside our own backward pass, which calls the loss and reaches the output
        self._pending: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self._handles = [model.register_forward_pre_hook(self._start)]
        self._handles += [layer.module.register_forward_hook(self._on_layer) for layer in layers]
        self._handles.append(loss_fn.register_forward_hook(self._on_loss))

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()

    def _capturing(self) -> bool:
        return not self._busy and torch.is_grad_enabled() and self.active()

    def _start(self, module: nn.Module, args: tuple) -> None:
        self._pending = {}

    def _on_layer(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self._capturing():
            self._pending.setdefault(id(module), []).append((args[0].detach(), output))

    def _on_loss(self, module: nn.Module, args: tuple, value: Tensor) -> None:
        pending, self._pending = self._pending, {}
        if not pending or not self._capturing() or not value.requires_grad:
            return  # not a loss of this model's captured forward pass
        if not bool(torch.isfinite(value.detach()).all()):
            self.nonfinite_loss = True
            return
        output, targets = args[0], args[1]
        self.loss.check_target(output, targets, index=self.draw()[1])  # batch = training step
        for layer in self.layers:
            check_single_call(layer, len(pending.get(id(layer.module), [])))
        inputs = [pending[id(layer.module)][0][0] for layer in self.layers]
        count = self.loss.count(targets)
        if not count:
            return
        normalizer = self.loss.batch_scale(count)
        if self.fisher_type == "forward-only":
            self.batch = CapturedBatch(inputs, [None] * len(inputs), normalizer)
            return
        layer_outputs = [pending[id(layer.module)][0][1] for layer in self.layers]
        seed, index = self.draw()

        def on_output_gradient(_: Tensor) -> None:
            if self._busy:
                return
            self._busy = True
            try:
                detached = output.detach()
                columns = output_columns(
                    self.loss, self.fisher_type, detached, targets, count, self.mc_samples, seed, index
                )
                gradients = output_gradients(self.layers, output, layer_outputs, columns)
                self.batch = CapturedBatch(inputs, [g.detach() for g in gradients], normalizer)
            finally:
                self._busy = False

        output.register_hook(on_output_gradient)
