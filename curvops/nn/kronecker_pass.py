"""Kronecker statistics from passes over a data set, with module hooks.

Every pass runs the model with forward hooks on the layers' modules (what each keeps of a call:
:meth:`~curvops.nn.layers.rule.LayerRule.capture`, each part's input and output), backpropagates
the Fisher type's output-space columns to the layer outputs in one batched backward pass, and
hands each layer's inputs and output gradients to its rule. The per-batch functions here are
shared with :class:`~curvops.optim.KFACOptimizer`, which sees the batches of a training loop.

Over :mod:`curvops.distributed` shards every rank sums its own batches, and each pass reduces
once at its end: the layers' sums (:meth:`~curvops.distributed.Shards.sum_statistics`, or
EKFAC's :meth:`~curvops.distributed.Shards.sum_corrections`) and the count of loss terms, so
the factors are those of the union, ``(Σ_ranks Σ_batches s) / (Σ_ranks Z)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import Shards
from ..linalg import computation_dtype
from .approximations import Basis
from .batches import is_empty
from .forward_checks import fixed_forward
from .layers import find_layers
from .layers.padding import kept_positions, masked
from .layers.rule import KroneckerLayer, rotate
from .losses import LossAdapter
from .model import ModelData
from .options import KroneckerOptions
from .statistics import Corrections, LayerStatistics

CORRECTION_CACHE_BYTES = 2**28
"""The most bytes of layer inputs and output gradients a statistics pass keeps for EKFAC's (and
TEKFAC's) corrections: what fits is corrected without a second pass over the data (no second
forward and backward pass); larger data passes again."""


def _bytes(value: Any) -> int:
    """The bytes of a tensor, or of the tensors of a list (a shared module's calls), or 0 (``None``)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    return sum(_bytes(v) for v in value) if isinstance(value, (list, tuple)) else 0


def joined_calls(layer: KroneckerLayer, calls: list[tuple[Tensor, Tensor]]) -> tuple[Any, list[Tensor]]:
    """A layer's ``(input, output)`` of every call in one forward pass as its rule's one input
    (:meth:`~curvops.nn.layers.rule.LayerRule.joined_input`) and the list of outputs.

    A module called several times (``nn.Sequential(lin, act, lin)``, a block applied twice) shares
    its weight over its calls as over positions: the calls' positions are joined, so ``expand``
    and ``reduce`` see every position of every call (:mod:`curvops.nn.layers.rule`), and each
    datum's weight gradient is ``Σ_calls Σ_s g a^T``. Raises ``ValueError`` (naming the module)
    if it did not run, or if its calls saw different numbers of data.
    """
    if not calls:
        raise ValueError(
            f"Module {layer.name!r} did not run in the forward pass, though its parameters are in params: "
            "its weight is used without calling the module (by another module), "
            "or the module is unused. KFAC needs the module called; leave its parameters out of params."
        )
    sizes = [output.shape[0] if output.ndim else 0 for _, output in calls]
    if len(set(sizes)) > 1:
        raise ValueError(
            f"Module {layer.name!r} ran {len(calls)} times in one forward pass on batches of sizes {sizes}: "
            "KFAC sums a shared module's calls datum by datum, so every call must see the batch's N data "
            "(first axis). Leave its parameters out of params, or call it on inputs of the same batch size."
        )
    joined = layer.rule.joined_input(layer.name, layer.module, [x for x, _ in calls])
    return joined, [output for _, output in calls]


def changed_call_error(name: str, parts: Any) -> ValueError:
    """The error for a module called otherwise than at its first call, whose parts follow the call.

    Example:
        >>> error = changed_call_error("attn", {"in_proj", "out_proj"})
        >>> str(error).startswith("'attn' is called differently")
        True
    """
    return ValueError(
        f"{name!r} is called differently from its first call (now with the parts {sorted(parts)}: "
        "self- against cross-attention), and its blocks follow the first call. Call it the same way "
        "in every forward pass, or register curvops.nn.layers.AttentionRule(in_projection='separate')."
    )


def output_gradients(
    layers: list[KroneckerLayer], output: Tensor, layer_outputs: list[list[Tensor]], columns: Tensor
) -> list[Tensor]:
    """Backpropagate the ``[K, *output.shape]`` columns to the layer outputs (every call's, one list
    per layer), as ``[K, N, S, n_out]`` per layer: the positions of its calls joined in call order.

    The graph is kept (``retain_graph``), so the caller's own backward pass can still run.
    """
    flat = [out for outputs in layer_outputs for out in outputs]
    if len(columns) == 1:  # one column: a plain backward pass, no vmap
        single = torch.autograd.grad(
            output, flat, grad_outputs=columns[0], materialize_grads=True, retain_graph=True
        )
        gradients = [gradient.unsqueeze(0) for gradient in single]
    else:
        gradients = torch.autograd.grad(
            output,
            flat,
            grad_outputs=columns,
            is_grads_batched=True,
            materialize_grads=True,
            retain_graph=True,
        )
    joined, start = [], 0
    for layer, outputs in zip(layers, layer_outputs, strict=True):
        calls = gradients[start : start + len(outputs)]
        start += len(outputs)
        per_call = [layer.rule.output_gradients(layer.module, g) for g in calls]
        joined.append(per_call[0] if len(per_call) == 1 else torch.cat(per_call, dim=2))
    return joined


def batch_statistics(
    layer: KroneckerLayer,
    inputs: Tensor,
    gradients: Tensor | None,
    options: KroneckerOptions,
    dtype: torch.dtype,
    weight: float = 1.0,
    valid: Tensor | None = None,
    total: LayerStatistics | None = None,
) -> LayerStatistics:
    """One batch's sums of a layer (:meth:`~curvops.nn.layers.rule.LayerRule.statistics`), each of
    its terms times ``weight`` (``A`` becomes the weighted mean of its inputs' ``a a^T``), in ``dtype``,
    over the positions of loss terms (``valid``, the batch's mask of them:
    :meth:`~curvops.nn.losses.LossAdapter.valid_terms`); added into ``total``'s tensors in place
    and returned as the new total where one is given."""
    gradients = None if gradients is None else gradients.to(dtype)
    if gradients is not None and weight != 1.0:
        gradients = gradients * math.sqrt(weight)  # every gradient statistic is quadratic in g
    trace_restricted = options.approximation.trace_restricted
    return layer.rule.statistics(
        layer,
        inputs,
        gradients,
        weight,
        options.kfac_approx,
        trace_restricted,
        dtype,
        valid=valid,
        total=total,
    )


def batch_corrections(
    layer: KroneckerLayer,
    inputs: Tensor,
    gradients: Tensor,
    basis: Basis,
    correction: str,
    valid: Tensor | None = None,
) -> Corrections:
    """One batch's sums ``Σ_{n,c} ((Q_out ⊗ Q_in)^T vec(∇_W ℓ_nc))²`` (and a separate bias's) in
    ``basis`` (:meth:`~curvops.nn.approximations.KroneckerApproximation.eigenbasis`), over the
    positions of loss terms (``valid``, as for :func:`batch_statistics`)."""
    q_out, q_in, q_bias = basis
    gradients = gradients.to(q_out.dtype)
    weight = bias = rotated = None
    if layer.weight is not None:
        rotated = rotate(gradients, q_out)
        weight = layer.rule.correction(layer, inputs, rotated, q_in, correction, valid=valid)
    if layer.separate_bias:
        trailing = 2 if layer.groups > 1 else 1
        kept = kept_positions(valid, *gradients.shape[1:3])
        if rotated is not None and q_bias is q_out:  # KFAC's bias shares G: Σ_s (g_s Q) = (Σ_s g_s) Q
            summed = masked(rotated, kept, trailing).sum(dim=2)
        else:
            summed = rotate(masked(gradients, kept, trailing).sum(dim=2), q_bias)
        bias = summed.square().sum(dim=(0, 1))
    return Corrections(weight, bias)


class KroneckerPass:
    """Passes over a data set that collect every layer's statistics, and EKFAC's corrections.

    Args:
        model: the model and data (:class:`~curvops.nn.model.ModelData`).
        loss: the loss (:class:`~curvops.nn.losses.LossAdapter`).
        layers: the layers to collect for.
        options: the checked options (Fisher type, ``kfac_approx``, samples, seed, ...).
        shards: the ranks whose data shards make the data set (:class:`~curvops.distributed.Shards`;
            by default this process alone): sums and counts are reduced over them once per pass,
            and ``"mc"`` labels drawn with this rank's seed (:meth:`~curvops.distributed.Shards.seed`).
    """

    def __init__(
        self,
        model: ModelData,
        loss: LossAdapter,
        layers: list[KroneckerLayer],
        options: KroneckerOptions,
        shards: Shards | None = None,
    ) -> None:
        self.model, self.loss, self.layers, self.options = model, loss, layers, options
        self.shards = Shards() if shards is None else shards
        self.dtype = computation_dtype(model.dtype)
        self._calls: dict[int, frozenset] = {}  # the parts of modules whose parts follow the call
        self._first_batch = True
        self._kept: list[tuple] | None = None  # the statistics pass's batches, for the corrections
        self._kept_count = 0.0

    def statistics(self) -> list[LayerStatistics]:
        """One pass: every layer's normalised statistics (TKFAC's terms if the approximation needs
        them), of the union of the shards. The layers of a module whose parts depend on the call
        (``nn.MultiheadAttention``: self- or cross-attention) follow its call in the first batch
        (a rank without batches takes the other ranks'): :attr:`layers` after the pass."""
        totals: dict[int, LayerStatistics] = {}
        kept: list[tuple] | None = [] if self.options.approximation.corrected else None
        kept_bytes = 0

        def consume(i: int, layer: KroneckerLayer, inputs: Tensor, gradients: Tensor | None, valid) -> None:
            nonlocal kept, kept_bytes
            totals[i] = batch_statistics(
                layer, inputs, gradients, self.options, self.dtype, valid=valid, total=totals.get(i)
            )
            if kept is not None:
                kept_bytes += _bytes(inputs) + _bytes(gradients)
                kept.append((i, layer, inputs, gradients, valid))
                if kept_bytes > CORRECTION_CACHE_BYTES:  # too large: the corrections pass again
                    kept = None

        count = self.shards.together(
            lambda: self._pass("KFAC statistics", consume), self.model.device, "KFAC statistics"
        )
        self._kept, self._kept_count = kept, count
        self._agree_on_calls()
        sums = self.shards.sum_statistics(
            [totals.get(i, LayerStatistics(layer)) for i, layer in enumerate(self.layers)]
        )
        scale = self._scale(count)
        return [self.options.fisher.finished(s.normalised(scale)) for s in sums]

    def corrections(self, bases: list[Basis | None]) -> list[Corrections]:
        """EKFAC's eigenvalues ``s = E[(Q_out^T ∇_W ℓ_n Q_in)²]`` in each layer's eigenbasis
        (none for a layer whose basis is ``None``: an exact block).

        One more pass over the data, unless the statistics pass kept its layer inputs and output
        gradients (at most :data:`CORRECTION_CACHE_BYTES`). ``∇_W ℓ_n = Σ_s g_ns a_ns^T`` is each datum's (and
        output-space column's) gradient, summed over positions whatever ``kfac_approx`` is,
        so ``s`` is exactly the diagonal of the true block in the basis ``Q_out ⊗ Q_in``.
        ``correction`` (an option) picks per-example gradients or position Gramians
        (:func:`~curvops.nn.layers.per_datum.correction_strategy`).
        """
        sums = [Corrections() for _ in self.layers]

        def consume(i: int, layer: KroneckerLayer, inputs: Tensor, gradients: Tensor | None, valid) -> None:
            if gradients is not None and bases[i] is not None:  # a batch without loss terms adds nothing
                sums[i] = sums[i] + batch_corrections(
                    layer, inputs, gradients, bases[i], self.options.correction, valid
                )

        any_order = not self.options.fisher.sampled  # the labels must be those of the first pass
        description = "EKFAC eigenvalue correction"
        kept, self._kept = self._kept, None

        def correcting_pass() -> float:
            if kept is None:
                return self._pass(description, consume, any_order)
            for entry in kept:  # the statistics pass's batches: no second pass over the data
                consume(*entry)
            return self._kept_count

        count = self.shards.together(correcting_pass, self.model.device, description)
        summed = self.shards.sum_corrections(sums, [layer.name for layer in self.layers])
        scale = self._scale(count)
        return [total / scale for total in summed]

    def _scale(self, count: float) -> float:
        """What a pass's sums are divided by, from this rank's ``count`` of loss terms: the Fisher
        type's scale of the loss's :meth:`~curvops.nn.losses.LossAdapter.batch_scale` of the count
        over all ranks. Raises ``ValueError`` if no rank has a loss term."""
        (total,) = self.shards.sum_numbers([count], self.model.device)
        if total == 0:
            raise ValueError("The data has no loss terms (every target is ignored).")
        return self.options.fisher.scale(self.loss.batch_scale(total), self.options.mc_samples)

    def _agree_on_calls(self) -> None:
        """Make every rank's layers of the modules whose parts follow their first call those of
        the ranks that called them: a rank without batches takes them, and ranks that called a
        module differently raise ``ValueError`` naming it (nothing to agree on alone)."""
        if not self.shards.active or not any(layer.rule.parts_depend_on_call for layer in self.layers):
            return
        names = {id(module): name for name, module in self.model.model.named_modules()}
        mine = {names[key]: sorted(parts) for key, parts in self._calls.items()}
        gathered = self.shards.gather((not self._first_batch, mine))
        seen = {rank: calls for rank, (ran, calls) in enumerate(gathered) if ran}
        for name in sorted({name for calls in seen.values() for name in calls}):
            parts = {rank: calls.get(name, "as before any call") for rank, calls in seen.items()}
            if len({str(p) for p in parts.values()}) > 1:
                raise ValueError(
                    f"{name!r} is called differently on different ranks (parts per rank: {parts}: self- "
                    "against cross-attention), and its blocks follow the first call. Call it the same way "
                    "on every rank's data, or register "
                    "curvops.nn.layers.AttentionRule(in_projection='separate')."
                )
        if seen and self._first_batch:
            modules = dict(self.model.model.named_modules())
            first = next(iter(seen.values()))
            self._calls = {id(modules[name]): frozenset(parts) for name, parts in first.items()}
            self._remake_layers()

    def _remake_layers(self) -> None:
        """:attr:`layers` for the parts of the modules' calls so far (:attr:`_calls`)."""
        model, options = self.model, self.options
        self.layers, _ = find_layers(
            model.model, model.params, options.bias, options.kfac_approx, self._calls
        )

    def _pass(self, description: str, consume: Callable, any_order: bool = True) -> float:
        """One pass over the data; ``consume(i, layer, inputs, gradients, valid)`` per layer and batch
        (``valid``: the batch's mask of loss terms, :meth:`~curvops.nn.losses.LossAdapter.valid_terms`).

        Each batch's count of loss terms comes from its own targets; a batch without any hands
        ``consume`` no gradients (``None``), and where every target is ignored its inputs enter
        ``A`` nowhere (see :mod:`curvops.nn.layers.rule`). ``any_order``: the pass's sums do not depend on
        the order of the batches (not so for ``"mc"`` labels, drawn per batch index, once a pass
        must match an earlier one). Returns this rank's count of loss terms.
        """
        total = 0.0
        for index, inputs, targets in self.model.batches(description, any_order=any_order):
            if is_empty(inputs):  # no rows: nothing to add
                continue
            count = self.loss.count(targets)
            total += count
            valid = self.loss.valid_terms(targets)
            for i, (layer, layer_input, gradients) in enumerate(self._batch(index, inputs, targets, count)):
                consume(i, layer, layer_input, gradients, valid)
        return total

    def _follow_call(self, name: str, module: nn.Module, parts: frozenset) -> None:
        """Remake the layers if ``module``'s call gives other parts than its layers' (only in the
        first batch: the layers follow the first call)."""
        if all(layer.part in parts for layer in self.layers if layer.module is module):
            return
        if not self._first_batch:
            raise changed_call_error(name, parts)
        self._calls[id(module)] = parts
        self._remake_layers()

    def _batch(self, index: int, inputs, targets: Tensor, count: float) -> list[tuple]:
        """``(layer, its input, its output gradients [K, N, S, n_out] or None)`` for one batch."""
        captured: dict[tuple, list[tuple[Tensor, Tensor]]] = {}
        modules = {id(layer.module): layer for layer in self.layers}  # one hook per module

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            layer = modules[id(module)]
            output, parts = layer.rule.capture(layer.module_name, module, args, kwargs, output)
            self._follow_call(layer.module_name, module, frozenset(parts))
            for part, (layer_input, layer_output) in parts.items():
                captured.setdefault((id(module), part), []).append((layer_input.detach(), layer_output))
            return output

        handles = [layer.module.register_forward_hook(hook, with_kwargs=True) for layer in modules.values()]
        try:
            with torch.enable_grad(), fixed_forward():
                output = self.model.call(inputs)
        finally:
            for handle in handles:
                handle.remove()
        self.model.check_output(index, output.detach())
        self._first_batch = False
        calls = [joined_calls(layer, captured.get(layer.key, [])) for layer in self.layers]
        layer_inputs = [layer_input for layer_input, _ in calls]
        self.loss.check_target(output, targets, index)
        fisher = self.options.fisher
        if not fisher.backward or not count:
            return [(layer, x, None) for layer, x in zip(self.layers, layer_inputs, strict=True)]
        seed = self.shards.seed(self.options.seed)
        columns = fisher.columns(
            self.loss, output.detach(), targets, count, self.options.mc_samples, seed, index
        )
        layer_outputs = [outputs for _, outputs in calls]
        gradients = output_gradients(self.layers, output, layer_outputs, columns)
        return list(zip(self.layers, layer_inputs, gradients, strict=True))
