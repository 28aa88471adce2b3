"""Kronecker statistics of the batches of an ordinary training loop, caught with hooks.

The optimizer cannot run passes over a data set of its own: it sees the user's forward
pass (called in any way, ``model(x)`` or ``model(**inputs)``) and ``loss.backward()``. Forward
hooks on the layers keep their inputs and outputs (every call of a layer called several
times); a forward hook on the loss module keeps its first two arguments, the model output
tensor and the targets, and puts a hook on
the loss value's gradient. When the user's backward pass reaches the loss value (the graph
below it is still intact), that hook backpropagates the output-space columns of the Fisher
type (sampled labels for ``"mc"``, the loss-Hessian factor for ``"type-2"``, the true labels
for ``"empirical"``) to the layer outputs with ``torch.autograd.grad``: the parameters'
``.grad`` stays the true-label gradient.

Only backpropagated losses count: a forward pass that is abandoned (an accuracy check, a
non-finite loss the loop skips) leaves no statistics and no flag behind. Every backward pass
since the last :meth:`BatchCapture.clear` adds one micro-batch, weighted as its loss is in
what was backpropagated (gradient accumulation).

The hooks never tie the model to the optimizer: copying or pickling the model or the loss
(``copy.deepcopy``, ``torch.save(model)``) turns them into :class:`InertHook`, so the copy
carries no optimizer state and captures nothing.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.fisher import FisherType
from ..nn.kronecker_pass import changed_call_error, joined_calls, output_gradients
from ..nn.layers import KroneckerLayer
from ..nn.losses import LossAdapter

MICRO_BATCH_STRIDE = 2**20
"""The ``"mc"`` draws of micro-batch ``m`` of step ``t`` use the index ``t + m · MICRO_BATCH_STRIDE``
(distinct within a step: the generators keep 32 bits of their seed)."""


@dataclass
class CapturedBatch:
    """One micro-batch's layer inputs (every call's, joined by the layer's rule), output gradients
    ``[K, N, S, n_out]`` (``None`` for ``"forward-only"``) and the weight ``w = c / Z`` of each of
    its loss terms: ``c`` is the gradient that reached its loss value (``1`` for
    ``loss.backward()``, ``1/K`` for ``(loss / K).backward()``), ``Z`` the loss's normaliser (its
    loss terms for a mean, 1 for a sum); ``valid``, its targets' mask of loss terms (``None``: all;
    padding is left out of the statistics); ``scale``, ``c``; ``position``, its place among the
    losses backpropagated since the last clear (an index of :attr:`BatchCapture.counts`)."""

    inputs: list[Any]
    gradients: list[Tensor | None]
    weight: float
    valid: Tensor | None = None
    scale: float = 1.0
    position: int = 0


class InertHook:
    """What a :class:`CaptureHook` becomes in a copy or an unpickled model: a hook that does nothing."""

    def __call__(self, *args: Any) -> None:
        return None


class CaptureHook:
    """A module hook that calls ``method``; copied or pickled, it is an :class:`InertHook`."""

    def __init__(self, method: Callable[..., None]) -> None:
        self.method = method

    def __call__(self, *args: Any) -> Any:
        return self.method(*args)

    def __reduce__(self) -> tuple[type[InertHook], tuple[()]]:
        return InertHook, ()


class BatchCapture:
    """Hooks that turn each backpropagated training batch into a :class:`CapturedBatch`.

    Args:
        model: the network (its forward pre-hook starts a new capture).
        loss_fn: the ``nn.Module`` loss the training loop calls on the model output.
        loss: its :class:`~curvops.nn.losses.LossAdapter`.
        layers: the layers to capture.
        fisher: the Fisher type (:mod:`curvops.nn.fisher`).
        mc_samples: labels drawn per datum for ``"mc"``.
        active: called with no arguments; whether the current forward pass is to be captured.
        draw: called with no arguments; the ``(seed, step)`` of the ``"mc"`` label draws.
        relayer: called with ``(module, parts)`` when a module whose parts depend on the call
            gives other parts than its layers': the layers to capture from then on.

    Attributes:
        batches: the micro-batches backpropagated since the last :meth:`clear`.
        counts: the loss terms of every finite loss backpropagated since then, in order (those
            without terms, or with ``c = 0``, included: they have no entry in ``batches``).
        nonfinite_loss: whether one of them had a non-finite loss (it is then not in ``batches``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        loss: LossAdapter,
        layers: list[KroneckerLayer],
        fisher: FisherType,
        mc_samples: int,
        active: Callable[[], bool],
        draw: Callable[[], tuple[int, int]],
        relayer: Callable[[nn.Module, frozenset], list[KroneckerLayer]] | None = None,
    ) -> None:
        self.loss, self.fisher, self.mc_samples = loss, fisher, mc_samples
        self.active, self.draw, self.relayer = active, draw, relayer
        self.batches: list[CapturedBatch] = []
        self.counts: list[float] = []
        self.nonfinite_loss, self._losses = False, 0  # _losses: loss values hooked since clear
        self._busy = False  # inside our own backward pass, which calls the loss
        self._weights = {id(p) for layer in layers for p in layer.module.parameters()}
        self._pending: dict[tuple, list[tuple[Tensor, Tensor]]] | None = None  # None: no forward pass
        self._handles = [model.register_forward_pre_hook(CaptureHook(self._start))]
        self.use(layers)
        self._handles += [
            layer.module.register_forward_hook(CaptureHook(self._on_layer), with_kwargs=True)
            for layer in self._modules.values()
        ]
        self._handles.append(loss_fn.register_forward_hook(CaptureHook(self._on_loss)))

    def use(self, layers: list[KroneckerLayer]) -> None:
        """Capture ``layers`` from now on (of the same modules: the hooks stay)."""
        self.layers = layers
        self._modules = {id(layer.module): layer for layer in layers}  # one hook per module

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self.clear(pending=True)

    def clear(self, pending: bool = False) -> None:
        """Forget the captured micro-batches and the non-finite flag; with ``pending``, also the
        layer tensors (and their graphs) of a forward pass whose loss was not computed."""
        self.batches, self.counts, self.nonfinite_loss, self._losses = [], [], False, 0
        if pending:
            self._pending = None

    def _capturing(self) -> bool:
        return not self._busy and torch.is_grad_enabled() and self.active()

    def _start(self, module: nn.Module, args: tuple) -> None:
        if self._capturing():  # a forward pass without grad (evaluation) keeps the pending one
            self._pending = {}

    def _on_layer(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self._capturing():
            return None  # the module's own output
        self._pending = {} if self._pending is None else self._pending
        layer = self._modules[id(module)]
        output, parts = layer.rule.capture(layer.module_name, module, args, kwargs, output)
        if self.relayer is not None and any(
            other.module is module and other.part not in parts for other in self.layers
        ):
            if self.batches or self._losses:  # statistics of its other parts are on their way
                raise changed_call_error(layer.module_name, parts)
            self.use(self.relayer(module, frozenset(parts)))
        for part, (kept, layer_output) in parts.items():
            self._pending.setdefault((id(module), part), []).append((kept.detach(), layer_output))
        return output

    def _on_loss(self, module: nn.Module, args: tuple, value: Tensor) -> None:
        pending, self._pending = self._pending, None
        if pending is None or not self._capturing() or not value.requires_grad:
            return  # not a loss of this model's captured forward pass
        output, targets = args[0], args[1]
        if not self._from_pending_forward(output, pending):
            self._pending = pending  # a loss of something else: the pending forward pass waits for its own
            return
        self.loss.check_target(output, targets, index=self.draw()[1])  # batch = training step
        calls = [joined_calls(layer, pending.get(layer.key, [])) for layer in self.layers]
        inputs = [layer_input for layer_input, _ in calls]
        layer_outputs = [outputs for _, outputs in calls]
        loss_value = value.detach()  # the hook holds no reference to value itself: no cycle

        def on_loss_gradient(gradient: Tensor) -> None:
            if not self._busy:
                self._add(loss_value, gradient, output, targets, inputs, layer_outputs)

        value.register_hook(on_loss_gradient)
        self._losses += 1

    def _from_pending_forward(
        self, output: Tensor, pending: dict[tuple, list[tuple[Tensor, Tensor]]]
    ) -> bool:
        """Whether the loss input ``output`` comes from the pending forward pass (``False``: from
        another model); raises if it comes from an earlier forward pass of this model."""
        nodes = {out.grad_fn for calls in pending.values() for _, out in calls} - {None}
        origin = graph_origin(output, nodes, self._weights) if nodes else "forward"
        if origin == "model":
            raise ValueError(
                "KFACOptimizer: loss_fn was called on the output of an earlier forward pass of the model, "
                "after another forward pass with grad enabled (an accuracy check, or every micro-batch's "
                "forward before the losses): its statistics would pair one batch's loss with another's "
                "layer inputs. Compute each loss right after its forward pass, and run other forward "
                "passes under torch.no_grad()."
            )
        return origin == "forward"

    def _add(
        self,
        value: Tensor,
        gradient: Tensor,
        output: Tensor,
        targets: Tensor,
        inputs: list[Any],
        layer_outputs: list[list[Tensor]],
    ) -> None:
        """The backward pass reached a loss value with gradient ``c``: add its micro-batch."""
        c = float(gradient)
        if not (math.isfinite(c) and bool(torch.isfinite(value).all())):
            self.nonfinite_loss = True
            return
        if c < 0:
            raise ValueError(
                f"KFACOptimizer: the loss of loss_fn was backpropagated with weight {c} < 0 (e.g. "
                "(-loss).backward()); the Fisher of a negated loss is not a curvature. Backpropagate "
                "the loss itself, or a positive multiple of it."
            )
        count, position = self.loss.count(targets), len(self.counts)
        self.counts.append(count)
        if not count or not c:
            return
        batch_weight, valid = c / self.loss.batch_scale(count), self.loss.valid_terms(targets)
        if not self.fisher.backward:
            self.batches.append(CapturedBatch(inputs, [None] * len(inputs), batch_weight, valid, c, position))
            return
        seed, step = self.draw()
        self._busy = True
        try:
            detached = output.detach()
            index = step + len(self.batches) * MICRO_BATCH_STRIDE
            columns = self.fisher.columns(self.loss, detached, targets, count, self.mc_samples, seed, index)
            gradients = output_gradients(self.layers, output, layer_outputs, columns)
        finally:
            self._busy = False
        self.batches.append(
            CapturedBatch(inputs, [g.detach() for g in gradients], batch_weight, valid, c, position)
        )


def graph_origin(output: Tensor, forward_nodes: set[Any], weights: set[int]) -> str:
    """Where ``output`` comes from: ``"forward"`` if its autograd graph reaches one of
    ``forward_nodes`` (the ``grad_fn`` of the pending forward pass's layer outputs), else
    ``"model"`` if it reaches one of ``weights`` (ids of the layers' parameters: an earlier
    forward pass), else ``"other"``. Breadth first, so a loss of the pending forward pass stops
    after the few nodes between the model output and the loss input.

    Example:
        >>> layer = torch.nn.Linear(2, 2)
        >>> hidden = layer(torch.randn(3, 2))
        >>> graph_origin(hidden.tanh(), {hidden.grad_fn}, {id(layer.weight)})
        'forward'
        >>> graph_origin(layer(torch.randn(3, 2)), {hidden.grad_fn}, {id(layer.weight)})
        'model'
    """
    queue, seen, model = deque([output.grad_fn]), set(), False
    while queue:
        node = queue.popleft()
        if node is None or node in seen:
            continue
        if node in forward_nodes:
            return "forward"
        seen.add(node)
        model = model or id(getattr(node, "variable", None)) in weights
        queue.extend(next_node for next_node, _ in node.next_functions)
    return "model" if model else "other"
