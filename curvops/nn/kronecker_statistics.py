"""Per-layer Kronecker statistics from one pass over the data, with module hooks.

For a layer ``y = W a (+ b)`` applied at positions ``s`` (tokens, pixels; one position
for a plain ``Linear``) of datum ``n``, the GGN/Fisher block is approximated by ``G ⊗ A``
(Martens & Grosse 2015; convolutions Grosse & Martens 2016; weight sharing Eschenhagen et
al. 2023):

- ``kfac_approx="expand"`` treats positions as data:
  ``A = (1/(N S)) Σ_{n,s} a_ns a_ns^T`` and ``G = (1/Z) Σ_{n,s} Σ_c g_nsc g_nsc^T``;
- ``"reduce"`` sums the output gradients and averages the inputs over positions:
  ``A = (1/N) Σ_n â_n â_n^T`` with ``â_n = (1/S) Σ_s a_ns``, ``G = (1/Z) Σ_n Σ_c ĝ_nc ĝ_nc^T``
  with ``ĝ_nc = Σ_s g_nsc``.

``Z`` normalises as the loss does (see :mod:`curvops.nn.losses`). The columns ``c`` are the
output-space vectors backpropagated to the layer outputs, by ``fisher_type``:

- ``"type-2"``: the columns of ``S_n`` with ``S_n S_n^T = ∇²_f ℓ_n``: ``√2 e_j`` for every output
  element of ``MSELoss``, ``√(σ(1-σ)) e_j`` for ``BCEWithLogitsLoss``, and for
  ``CrossEntropyLoss`` ``√p_c (e_c - p)`` for every class ``c``, at every position at once
  (exact when positions do not interact; the usual per-position factorisation otherwise);
- ``"mc"``: ``∇_f ℓ(f_n, ŷ_nm)`` for ``mc_samples`` labels ``ŷ`` drawn from the model (and
  ``G`` divided by ``mc_samples``), the same draws as :class:`~curvops.FisherMC`;
- ``"empirical"``: ``∇_f ℓ(f_n, y_n)`` at the true labels;
- ``"forward-only"``: no backward pass, ``G = I``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .losses import LossAdapter
from .model import ModelData

KRONECKER_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")
KFAC_APPROXIMATIONS = ("expand", "reduce")


@dataclass
class KroneckerLayer:
    """One supported layer whose weight and/or bias is among the chosen parameters.

    ``input_factor`` is ``A`` (``[n_in, n_in]``, or ``[num_embeddings]`` for an embedding's
    diagonal factor; with ``joint`` bias the input carries a trailing constant 1) and
    ``output_factor`` is ``G`` (``[n_out, n_out]``), once the statistics are collected.
    """

    name: str
    module: nn.Module
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    joint: bool
    input_factor: Tensor | None = None
    output_factor: Tensor | None = None
    input_count: float = field(default=0.0, repr=False)


def check_layer(name: str, module: nn.Module, kfac_approx: str) -> None:
    """Raise for configurations of a supported layer type that KFAC here does not handle."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            raise ValueError(
                f"KFAC supports convolutions with groups=1; {name!r} has groups={module.groups}."
            )
        if module.padding_mode != "zeros":
            raise ValueError(
                f"KFAC supports zero padding; {name!r} has padding_mode={module.padding_mode!r}."
            )
        if (
            isinstance(module.padding, str)
            and module.padding == "same"
            and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size, strict=True))
        ):
            raise ValueError(f"KFAC cannot unfold {name!r}: padding='same' with asymmetric padding.")
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            raise ValueError(
                f"KFAC does not support {name!r}: max_norm renormalises weights in the forward pass."
            )
        if kfac_approx == "reduce":
            raise ValueError(
                f"{name!r} is an nn.Embedding, whose KFAC-reduce input factor is not diagonal; "
                "use kfac_approx='expand'."
            )


def _conv_padding(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module.padding, str):
        return tuple(0 if module.padding == "valid" else d * (k - 1) // 2
                     for d, k in zip(module.dilation, module.kernel_size, strict=True))  # fmt: skip
    return tuple(module.padding)


def layer_inputs(module: nn.Module, inputs: Tensor, joint: bool) -> Tensor:
    """The layer's input vectors ``a`` at every position, ``[N, S, n_in]`` (``+1`` if joint).

    ``Linear``: the input's middle axes are positions. ``Conv1d``/``Conv2d``: the unfolded
    patches (``n_in = C_in · kernel size``), one per output location.
    """
    if isinstance(module, nn.Linear):
        features = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    else:
        two_d = isinstance(module, nn.Conv2d)
        images = inputs if two_d else inputs.unsqueeze(2)  # Conv1d as a 2-D convolution of height 1
        lead = () if two_d else (1,)
        patches = nn.functional.unfold(
            images,
            lead + tuple(module.kernel_size),
            dilation=lead + tuple(module.dilation),
            padding=(() if two_d else (0,)) + _conv_padding(module),
            stride=lead + tuple(module.stride),
        )
        features = patches.transpose(1, 2)
    if joint:
        features = torch.cat([features, features.new_ones(*features.shape[:-1], 1)], dim=-1)
    return features


def layer_output_gradients(module: nn.Module, gradients: Tensor) -> Tensor:
    """Gradients w.r.t. the layer output, ``[K, N, *out]``, as ``[K, N, S, n_out]``."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        gradients = gradients.flatten(3).transpose(2, 3)
    return gradients.reshape(gradients.shape[0], gradients.shape[1], -1, gradients.shape[-1])


def second_moment(rows: Tensor) -> Tensor:
    """``Σ x x^T`` over the vectors ``x = rows[..., :]`` (all leading axes summed).

    Contiguous rows take one matrix product; rows that are a transposed view (unfolded
    convolution patches, convolution output gradients) take a batched product over their
    leading axes, which avoids copying them into row-major order.
    """
    if rows.is_contiguous():
        flat = rows.reshape(-1, rows.shape[-1])
        return flat.T @ flat
    batched = rows.reshape(-1, *rows.shape[-2:])
    return torch.bmm(batched.transpose(1, 2), batched).sum(0)


class KroneckerStatistics:
    """Collects ``A`` and ``G`` for every layer in one pass over the data.

    Args:
        model: the model and data (:class:`~curvops.nn.model.ModelData`).
        loss: the loss (:class:`~curvops.nn.losses.LossAdapter`).
        layers: the layers to collect for.
        fisher_type: ``"type-2"``, ``"mc"``, ``"empirical"`` or ``"forward-only"``.
        kfac_approx: ``"expand"`` or ``"reduce"``.
        mc_samples: labels drawn per datum for ``"mc"``.
        seed: seed of the label draws (batch ``b`` uses ``(seed, b)``, as ``FisherMC``).
    """

    def __init__(
        self,
        model: ModelData,
        loss: LossAdapter,
        layers: list[KroneckerLayer],
        fisher_type: str,
        kfac_approx: str,
        mc_samples: int = 1,
        seed: int = 0,
    ) -> None:
        self.model, self.loss, self.layers = model, loss, layers
        self.fisher_type, self.kfac_approx = fisher_type, kfac_approx
        self.mc_samples, self.seed = mc_samples, seed

    def collect(self) -> None:
        """One pass over the data; fills the layers' ``input_factor`` and ``output_factor``."""
        total_count = 0.0
        for layer in self.layers:
            layer.input_factor = layer.output_factor = None
            layer.input_count = 0.0
        for index, inputs, targets in self.model.batches("KFAC statistics"):
            count = self.loss.count(targets)
            total_count += count
            if count:
                self._batch(index, inputs, targets, count)
        normalizer = total_count if self.loss.reduction == "mean" else 1.0
        if total_count == 0:
            raise ValueError("The data has no loss terms (every target is ignored).")
        for layer in self.layers:
            layer.input_factor = layer.input_factor / layer.input_count
            if self.fisher_type == "forward-only":
                size = layer.module.weight.shape[1 if isinstance(layer.module, nn.Embedding) else 0]
                layer.output_factor = torch.eye(size, dtype=self.model.dtype, device=self.model.device)
            else:
                scale = normalizer * (self.mc_samples if self.fisher_type == "mc" else 1)
                layer.output_factor = layer.output_factor / scale

    def _batch(self, index: int, inputs, targets: Tensor, count: float) -> None:
        captured: dict[int, list[tuple[Tensor, Tensor]]] = {id(layer.module): [] for layer in self.layers}

        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            captured[id(module)].append((args[0].detach(), output))

        handles = [layer.module.register_forward_hook(hook) for layer in self.layers]
        try:
            with torch.enable_grad():
                output = self.model.model(inputs)
        finally:
            for handle in handles:
                handle.remove()
        self.model.check_output(index, output.detach())
        for layer in self.layers:
            calls = len(captured[id(layer.module)])
            if calls != 1:
                raise ValueError(
                    f"Module {layer.name!r} ran {calls} times in one forward pass (weight tying or "
                    "reuse); KFAC needs one call per layer. Leave its parameters out of params."
                )
        for layer in self.layers:
            self._accumulate_inputs(layer, captured[id(layer.module)][0][0])
        if self.fisher_type == "forward-only":
            return
        columns = self._output_columns(index, output.detach(), targets, count)
        layer_outputs = [captured[id(layer.module)][0][1] for layer in self.layers]
        if len(columns) == 1:  # one column: a plain backward pass, no vmap
            single = torch.autograd.grad(
                output, layer_outputs, grad_outputs=columns[0], materialize_grads=True
            )
            gradients = [gradient.unsqueeze(0) for gradient in single]
        else:
            gradients = torch.autograd.grad(
                output, layer_outputs, grad_outputs=columns, is_grads_batched=True, materialize_grads=True
            )
        for layer, gradient in zip(self.layers, gradients, strict=True):
            self._accumulate_outputs(layer, layer_output_gradients(layer.module, gradient))

    def _accumulate_inputs(self, layer: KroneckerLayer, inputs: Tensor) -> None:
        if isinstance(layer.module, nn.Embedding):
            indices = inputs.flatten()
            weights = torch.ones_like(indices, dtype=self.model.dtype)
            if layer.module.padding_idx is not None:
                weights = weights * (indices != layer.module.padding_idx)
            counts = torch.zeros(
                layer.module.num_embeddings, dtype=self.model.dtype, device=self.model.device
            )
            contribution, number = counts.index_add_(0, indices, weights), indices.numel()
        else:
            features = layer_inputs(layer.module, inputs.to(self.model.dtype), layer.joint)
            if self.kfac_approx == "reduce":
                features = features.mean(dim=1, keepdim=True)
            contribution, number = second_moment(features), features[..., 0].numel()
        layer.input_factor = contribution if layer.input_factor is None else layer.input_factor + contribution
        layer.input_count += number

    def _accumulate_outputs(self, layer: KroneckerLayer, gradients: Tensor) -> None:
        if self.kfac_approx == "reduce":
            gradients = gradients.sum(dim=2, keepdim=True)
        contribution = second_moment(gradients)
        layer.output_factor = (
            contribution if layer.output_factor is None else layer.output_factor + contribution
        )

    def _output_columns(self, index: int, output: Tensor, targets: Tensor, count: float) -> Tensor:
        """The ``[K, *output.shape]`` output-space vectors to backpropagate (see the module doc)."""
        scale = count if self.loss.reduction == "mean" else 1.0
        gradient = torch.func.grad(lambda o, t: scale * self.loss(o, t))
        if self.fisher_type == "empirical":
            return gradient(output, targets).unsqueeze(0)
        if self.fisher_type == "mc":
            generator = torch.Generator(device=output.device).manual_seed(self.seed * 1_000_003 + index)
            sampled = self.loss.sample(output, targets, self.mc_samples, generator)
            return torch.func.vmap(gradient, in_dims=(None, 0))(output, sampled)
        return loss_hessian_factor(self.loss, output, targets)


def loss_hessian_factor(loss: LossAdapter, output: Tensor, targets: Tensor) -> Tensor:
    """Columns ``S`` with ``Σ_c S_c S_c^T = ∇²_f ℓ`` per datum and position, ``[K, *output.shape]``."""
    loss_fn = loss.loss_fn
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        probabilities = torch.softmax(output, dim=1)
        classes = output.shape[1]
        eye = torch.eye(classes, dtype=output.dtype, device=output.device)
        eye = eye.reshape(classes, 1, classes, *([1] * (output.ndim - 2)))
        per_class = probabilities.movedim(1, 0).unsqueeze(2)  # [C, N, 1, ...]: p_c at every position
        columns = per_class.sqrt() * (eye - probabilities.unsqueeze(0))
        if not targets.is_floating_point():
            columns = columns * (targets != loss_fn.ignore_index).unsqueeze(1).to(output.dtype)
        return columns
    curvature = (
        2.0 * torch.ones_like(output)
        if isinstance(loss_fn, nn.MSELoss)
        else (torch.sigmoid(output) * (1 - torch.sigmoid(output)))
    )
    per_datum = math.prod(output.shape[1:])
    eye = torch.eye(per_datum, dtype=output.dtype, device=output.device).reshape(
        per_datum, 1, *output.shape[1:]
    )
    return eye * curvature.sqrt()
