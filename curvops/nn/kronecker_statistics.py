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

from ..linalg.composite import computation_dtype
from .losses import LossAdapter
from .model import ModelData, fixed_forward, is_empty

KRONECKER_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")
KFAC_APPROXIMATIONS = ("expand", "reduce")


@dataclass
class KroneckerLayer:
    """One supported layer whose weight and/or bias is among the chosen parameters.

    ``input_factor`` is ``A`` (``[n_in, n_in]``, or ``[num_embeddings]`` for an embedding's
    diagonal factor; with ``joint`` bias the input carries a trailing constant 1) and
    ``output_factor`` is ``G`` (``[n_out, n_out]``), once the statistics are collected. With
    ``trace_restricted`` statistics, TKFAC's ``trace`` ``δ``, ``trace_input_factor`` ``Φ`` and
    ``trace_output_factor`` ``Ψ`` (``tr Φ = tr Ψ = 1``) are filled too, and ``bias_trace``,
    the trace of a separate bias's true block.
    """

    name: str
    module: nn.Module
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    joint: bool
    input_factor: Tensor | None = None
    output_factor: Tensor | None = None
    trace: Tensor | None = None
    bias_trace: Tensor | None = None
    trace_input_factor: Tensor | None = None
    trace_output_factor: Tensor | None = None
    input_count: float = field(default=0.0, repr=False)

    @property
    def embedding(self) -> bool:
        """Whether the layer is an ``nn.Embedding`` (diagonal input factor, ``A ⊗ G`` layout)."""
        return isinstance(self.module, nn.Embedding)


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


CORRECTIONS = ("auto", "per-example", "gramian")
CORRECTION_CHUNK = 2**26
"""Numbers per intermediate of an eigenvalue correction: data are processed in chunks below it."""


def _add(total: Tensor | None, part: Tensor) -> Tensor:
    return part if total is None else total + part


def correction_strategy(
    correction: str, columns: int, data: int, positions: int, outputs: int, inputs: int
) -> str:
    """``"per-example"`` or ``"gramian"``: ``"auto"`` picks the one with less memory.

    Per-example rotated gradients take ``K·N·n_out·n_in`` numbers for ``K`` columns and ``N``
    data; the Gramians ``N·S²·(n_out + n_in)`` for ``S`` positions.

    Example:
        >>> correction_strategy("auto", 1, 512, 1, 1024, 1024)  # no weight sharing: tiny Gramians
        'gramian'
        >>> correction_strategy("auto", 1, 8, 64, 256, 256)  # 64 tokens per datum
        'per-example'
    """
    if correction != "auto":
        return correction
    per_example = columns * data * outputs * inputs
    gramian = data * positions * positions * (outputs + inputs)
    return "per-example" if per_example <= gramian else "gramian"


def _trace(factor: Tensor) -> Tensor:
    return factor.sum() if factor.ndim == 1 else factor.trace()


def _gradient_norms(gradients: Tensor, features: Tensor) -> Tensor:
    """``Σ_{k,n} ‖Σ_s g_kns a_ns^T‖_F²``: the squared norms of every datum's (and column's)
    weight gradient, from ``[K, N, S, n_out]`` output gradients and ``[N, S, n_in]`` inputs.

    TKFAC's ``δ`` is their mean, so its block's trace is the true block's, with or without
    weight sharing. The gradients are formed explicitly or through position Gramians,
    ``Σ_{s,t} (g_kns · g_knt)(a_ns · a_nt)``, whichever takes less memory
    (:func:`correction_strategy`), in chunks of data.
    """
    columns, data, positions, outputs = gradients.shape
    strategy = correction_strategy("auto", columns, data, positions, outputs, features.shape[-1])
    per_datum = columns * outputs * features.shape[-1] if strategy == "per-example" else positions * positions
    chunk = max(1, CORRECTION_CHUNK // per_datum)
    total = gradients.new_zeros(())
    for start in range(0, data, chunk):
        g, a = gradients[:, start : start + chunk], features[start : start + chunk]
        if strategy == "per-example":
            total = total + torch.einsum("knso,nsi->knoi", g, a).square().sum()
        else:
            output_gram = torch.einsum("knso,knto->nst", g, g)
            total = total + (output_gram * torch.einsum("nsi,nti->nst", a, a)).sum()
    return total


def _embedding_gradient_norms(gradients: Tensor, same_row: Tensor) -> Tensor:
    """``Σ_{k,n} Σ_{s,t} (g_kns · g_knt) [index_ns = index_nt]`` for one-hot inputs
    (``same_row [N, S, S]``, zero at padding positions)."""
    return (torch.einsum("knso,knto->nst", gradients, gradients) * same_row).sum()


class KroneckerSums:
    """The Kronecker statistics of one or more batches: sums per layer, then their normalisation.

    :meth:`add` takes one batch of a layer's inputs and output gradients, :meth:`finish`
    divides by the normaliser; :meth:`correction` gives one batch's EKFAC eigenvalue sums.
    No data passes happen here: :class:`KroneckerStatistics` drives it over a data set, and
    :class:`~curvops.optim.KFACOptimizer` over the batches of a training loop.

    Args:
        layers: the layers whose factors (fields of :class:`KroneckerLayer`) are filled.
        fisher_type: ``"type-2"``, ``"mc"``, ``"empirical"`` or ``"forward-only"``.
        kfac_approx: ``"expand"`` or ``"reduce"``.
        mc_samples: labels drawn per datum for ``"mc"`` (``G`` is divided by it).
        dtype, device: of the model; the factors are accumulated in
            :func:`~curvops.linalg.computation_dtype` (float32 for bfloat16 / float16 models).
    """

    def __init__(
        self,
        layers: list[KroneckerLayer],
        fisher_type: str,
        kfac_approx: str,
        mc_samples: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layers, self.fisher_type, self.kfac_approx = layers, fisher_type, kfac_approx
        self.mc_samples, self.dtype, self.device = mc_samples, computation_dtype(dtype), device
        self.trace_restricted = False

    def scale(self, normalizer: float) -> float:
        """What the summed output-gradient statistics are divided by: ``Z`` (times the samples)."""
        return normalizer * (self.mc_samples if self.fisher_type == "mc" else 1)

    def reset(self, trace_restricted: bool = False) -> None:
        """Empty every layer's sums; ``trace_restricted`` also collects TKFAC's ``δ``, ``Φ``, ``Ψ``."""
        self.trace_restricted = trace_restricted
        for layer in self.layers:
            layer.input_factor = layer.output_factor = None
            layer.trace = layer.bias_trace = layer.trace_input_factor = layer.trace_output_factor = None
            layer.input_count = 0.0

    def finish(self, normalizer: float) -> None:
        """Normalise the sums into ``A``, ``G`` (and ``δ``, ``Φ``, ``Ψ``); ``normalizer`` is ``Z``."""
        scale = self.scale(normalizer)
        for layer in self.layers:
            layer.input_factor = layer.input_factor / layer.input_count
            if self.fisher_type == "forward-only":
                size = layer.module.weight.shape[1 if layer.embedding else 0]
                layer.output_factor = torch.eye(size, dtype=self.dtype, device=self.device)
                continue
            layer.output_factor = layer.output_factor / scale
            if self.trace_restricted:
                if not bool(layer.trace > 0):
                    raise ValueError(
                        f"Layer {layer.name!r} has δ = {float(layer.trace)} (its block's trace): TKFAC "
                        "needs δ > 0 (no curvature at δ = 0; nan: the statistics overflow)."
                    )
                layer.trace = layer.trace / scale
                layer.bias_trace = None if layer.bias_trace is None else layer.bias_trace / scale
                layer.trace_input_factor = layer.trace_input_factor / _trace(layer.trace_input_factor)
                layer.trace_output_factor = layer.trace_output_factor / _trace(layer.trace_output_factor)

    def add(
        self, layer: KroneckerLayer, inputs: Tensor, gradients: Tensor | None, weight: float = 1.0
    ) -> None:
        """Add one batch to ``A`` and ``G`` (and TKFAC's sums), each of its terms times ``weight``
        (``A`` becomes the weighted mean of its inputs' ``a a^T``)."""
        gradients = None if gradients is None else gradients.to(self.dtype)
        if gradients is not None and weight != 1.0:
            gradients = gradients * math.sqrt(weight)  # every gradient statistic is quadratic in g
        if layer.embedding:
            self._add_embedding(layer, inputs, gradients, weight)
            return
        features = layer_inputs(layer.module, inputs.to(self.dtype), layer.joint)
        if self.trace_restricted and gradients is not None:
            layer.trace = _add(layer.trace, _gradient_norms(gradients, features))
            if layer.bias is not None and not layer.joint:
                layer.bias_trace = _add(layer.bias_trace, gradients.sum(dim=2).square().sum())
        if self.kfac_approx == "reduce":
            features = features.mean(dim=1, keepdim=True)
            gradients = None if gradients is None else gradients.sum(dim=2, keepdim=True)
        layer.input_factor = _add(layer.input_factor, weight * second_moment(features))
        layer.input_count += weight * features[..., 0].numel()
        if gradients is None:
            return
        layer.output_factor = _add(layer.output_factor, second_moment(gradients))
        if self.trace_restricted:
            input_norms, output_norms = features.square().sum(-1), gradients.square().sum(-1)
            weighted_inputs = features * output_norms.sum(0).sqrt().unsqueeze(-1)
            layer.trace_input_factor = _add(layer.trace_input_factor, second_moment(weighted_inputs))
            weighted_outputs = gradients * input_norms.sqrt().unsqueeze(-1)
            layer.trace_output_factor = _add(layer.trace_output_factor, second_moment(weighted_outputs))

    def _add_embedding(
        self, layer: KroneckerLayer, inputs: Tensor, gradients: Tensor | None, weight: float
    ) -> None:
        """One-hot inputs: ``A`` (and ``Φ``) are diagonal, ``‖a‖² = 1`` (0 at ``padding_idx``)."""
        indices = inputs.flatten()
        present = torch.ones_like(indices, dtype=self.dtype)
        if layer.module.padding_idx is not None:
            present = present * (indices != layer.module.padding_idx)
        zeros = torch.zeros(layer.module.num_embeddings, dtype=self.dtype, device=self.device)
        layer.input_factor = _add(layer.input_factor, weight * zeros.index_add(0, indices, present))
        layer.input_count += weight * indices.numel()
        if gradients is None:
            return
        layer.output_factor = _add(layer.output_factor, second_moment(gradients))
        if self.trace_restricted:
            positions = inputs.reshape(gradients.shape[1], -1)
            kept = present.reshape(positions.shape)
            same_row = (
                (positions.unsqueeze(2) == positions.unsqueeze(1)) * kept.unsqueeze(2) * kept.unsqueeze(1)
            )
            layer.trace = _add(
                layer.trace, _embedding_gradient_norms(gradients, same_row.to(gradients.dtype))
            )
            output_norms = gradients.square().sum(-1).reshape(gradients.shape[0], -1)  # [K, N·S]
            weights = output_norms.sum(0) * present
            layer.trace_input_factor = _add(layer.trace_input_factor, zeros.index_add(0, indices, weights))
            weighted_outputs = gradients * present.reshape(gradients.shape[1:-1]).unsqueeze(-1)
            layer.trace_output_factor = _add(layer.trace_output_factor, second_moment(weighted_outputs))

    def correction(
        self,
        layer: KroneckerLayer,
        inputs: Tensor,
        gradients: Tensor,
        basis: tuple[Tensor, Tensor | None, Tensor],
        correction: str = "auto",
    ) -> tuple[Tensor | None, Tensor | None]:
        """One batch's sums ``Σ_{n,c} ((Q_out ⊗ Q_in)^T vec(∇_W ℓ_nc))²`` (and a separate bias's).

        ``basis`` is ``(Q_out, Q_in, Q_bias)`` as in :meth:`KroneckerStatistics.corrections`;
        divide the sums over all batches by :meth:`scale` for EKFAC's eigenvalues.
        """
        q_out, q_in, q_bias = basis
        gradients = gradients.to(self.dtype)
        weight = bias = None
        if layer.weight is not None:
            rotated = gradients @ q_out
            weight = (
                self._embedding_correction(layer, inputs, rotated)
                if layer.embedding
                else self._dense_correction(layer, inputs, rotated, q_in, correction)
            )
        if layer.bias is not None and not layer.joint:
            bias = (gradients.sum(dim=2) @ q_bias).square().sum(dim=(0, 1))
        return weight, bias

    def _dense_correction(
        self, layer: KroneckerLayer, inputs: Tensor, rotated: Tensor, q_in: Tensor, correction: str
    ) -> Tensor:
        features = layer_inputs(layer.module, inputs.to(self.dtype), layer.joint) @ q_in
        columns, data, positions, outputs = rotated.shape
        inputs_size = features.shape[-1]
        strategy = correction_strategy(correction, columns, data, positions, outputs, inputs_size)
        per_datum = (
            columns * outputs * inputs_size
            if strategy == "per-example"
            else (positions * positions * (outputs + inputs_size))
        )
        total = None
        for start in range(0, data, max(1, CORRECTION_CHUNK // per_datum)):  # bounded memory
            stop = start + max(1, CORRECTION_CHUNK // per_datum)
            g, a = rotated[:, start:stop], features[start:stop]
            if strategy == "per-example":
                part = torch.einsum("knso,nsi->knoi", g, a).square().sum(dim=(0, 1))
            else:
                output_gram = torch.einsum("knso,knto->nsto", g, g)
                part = torch.einsum("nsto,nsti->oi", output_gram, torch.einsum("nsi,nti->nsti", a, a))
            total = _add(total, part)
        return total

    def _embedding_correction(self, layer: KroneckerLayer, inputs: Tensor, rotated: Tensor) -> Tensor:
        """Rows of each datum's gradient are sums over its positions holding the same index."""
        indices = inputs.reshape(rotated.shape[1], -1)
        columns, data, positions, outputs = rotated.shape
        num = layer.module.num_embeddings
        if layer.module.padding_idx is not None:
            rotated = rotated * (indices != layer.module.padding_idx).unsqueeze(-1).to(rotated.dtype)
        keys = (torch.arange(data, device=indices.device).unsqueeze(1) * num + indices).flatten()
        unique, inverse = torch.unique(keys, return_inverse=True)
        rows = rotated.new_zeros(columns, unique.numel(), outputs)
        rows.index_add_(1, inverse, rotated.reshape(columns, data * positions, outputs))
        result = rotated.new_zeros(num, outputs)
        return result.index_add_(0, unique % num, rows.square().sum(dim=0))


class KroneckerStatistics:
    """Collects ``A`` and ``G`` (and, if asked, TKFAC's ``δ``, ``Φ``, ``Ψ``) for every layer in one
    pass over the data, and EKFAC's eigenvalue corrections in a second one.

    Every pass runs the model with hooks on the layers, backpropagates the output-space
    columns of ``fisher_type`` to the layer outputs (one batched backward pass) and hands each
    layer's inputs and output gradients to :class:`KroneckerSums`.

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
        self.model, self.loss, self.layers, self.seed = model, loss, layers, seed
        self.sums = KroneckerSums(layers, fisher_type, kfac_approx, mc_samples, model.dtype, model.device)

    def collect(self, trace_restricted: bool = False) -> None:
        """One pass; fills the layers' ``input_factor``, ``output_factor`` and, with
        ``trace_restricted``, TKFAC's ``trace``, ``trace_input_factor`` and ``trace_output_factor``."""
        self.sums.reset(trace_restricted)
        self.sums.finish(self._pass("KFAC statistics", self.sums.add))

    def corrections(
        self, bases: list[tuple[Tensor, Tensor | None, Tensor]], correction: str = "auto"
    ) -> list[tuple[Tensor | None, Tensor | None]]:
        """EKFAC's eigenvalues ``s = E[(Q_out^T ∇_W ℓ_n Q_in)²]`` in each layer's eigenbasis.

        One more pass over the data. ``∇_W ℓ_n = Σ_s g_ns a_ns^T`` is each datum's (and
        output-space column's) gradient, summed over positions whatever ``kfac_approx`` is,
        so ``s`` is exactly the diagonal of the true block in the basis ``Q_out ⊗ Q_in``.

        Args:
            bases: per layer ``(Q_out, Q_in, Q_bias)``: the weight's basis ``Q_out ⊗ Q_in``
                (``Q_in`` is ``None`` for an embedding: the identity) and a separate bias's.
            correction: ``"per-example"`` (rotate each datum's gradient), ``"gramian"``
                (contract rotated input and output Gramians over positions) or ``"auto"``
                (:func:`correction_strategy`, per layer and batch).

        Returns:
            Per layer ``(s_weight, s_bias)``: ``s_weight`` ``[n_out, n_in]`` (``[num_embeddings,
            n_out]`` for an embedding; ``None`` without the weight), ``s_bias`` ``[n_out]`` for a
            separate bias (else ``None``).
        """
        position = {id(layer): i for i, layer in enumerate(self.layers)}
        sums: list[list[Tensor | None]] = [[None, None] for _ in self.layers]

        def consume(layer: KroneckerLayer, inputs: Tensor, gradients: Tensor | None) -> None:
            if gradients is None:  # a batch without loss terms adds nothing to the corrections
                return
            i = position[id(layer)]
            parts = self.sums.correction(layer, inputs, gradients, bases[i], correction)
            sums[i] = [
                None if part is None else _add(total, part)
                for total, part in zip(sums[i], parts, strict=True)
            ]

        any_order = self.sums.fisher_type != "mc"  # the labels must be those of the first pass
        scale = self.sums.scale(self._pass("EKFAC eigenvalue correction", consume, any_order))
        return [tuple(None if t is None else t / scale for t in pair) for pair in sums]

    def _pass(self, description: str, consume, any_order: bool = True) -> float:
        """One pass over the data; ``consume(layer, inputs, gradients)`` per layer and batch.

        Each batch's count of loss terms comes from its own targets; a batch without any (every
        target ignored) still adds its inputs to ``A``, as its rows do within a larger batch, and
        hands ``consume`` no gradients (``None``). ``any_order``: the pass's
        sums do not depend on the order of the batches (not so for ``"mc"`` labels, drawn per batch
        index, once a pass must match an earlier one). Returns the normaliser ``Z`` (the number of
        loss terms for a mean, 1 for a sum).
        """
        total = 0.0
        for index, inputs, targets in self.model.batches(description, any_order=any_order):
            if is_empty(inputs):  # no rows: nothing to add
                continue
            count = self.loss.count(targets)
            total += count
            for layer, layer_input, gradients in self._batch(index, inputs, targets, count):
                consume(layer, layer_input, gradients)
        if total == 0:
            raise ValueError("The data has no loss terms (every target is ignored).")
        return self.loss.batch_scale(total)

    def _batch(self, index: int, inputs, targets: Tensor, count: float) -> list[tuple]:
        """``(layer, its input, its output gradients [K, N, S, n_out] or None)`` for one batch."""
        captured: dict[int, list[tuple[Tensor, Tensor]]] = {id(layer.module): [] for layer in self.layers}

        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if not output.requires_grad:  # all parameters up to here frozen: a leaf to differentiate at
                output = output.detach().requires_grad_(True)
            captured[id(module)].append((args[0].detach(), output))
            return output

        handles = [layer.module.register_forward_hook(hook) for layer in self.layers]
        try:
            with torch.enable_grad(), fixed_forward():
                output = self.model.model(inputs)
        finally:
            for handle in handles:
                handle.remove()
        self.model.check_output(index, output.detach())
        for layer in self.layers:
            check_single_call(layer, len(captured[id(layer.module)]))
        layer_inputs_ = [captured[id(layer.module)][0][0] for layer in self.layers]
        self.loss.check_target(output, targets, index)
        if self.sums.fisher_type == "forward-only" or not count:
            return [(layer, x, None) for layer, x in zip(self.layers, layer_inputs_, strict=True)]
        columns = output_columns(
            self.loss, self.sums.fisher_type, output.detach(), targets, count,
            self.sums.mc_samples, self.seed, index,
        )  # fmt: skip
        layer_outputs = [captured[id(layer.module)][0][1] for layer in self.layers]
        gradients = output_gradients(self.layers, output, layer_outputs, columns)
        return list(zip(self.layers, layer_inputs_, gradients, strict=True))


def check_single_call(layer: KroneckerLayer, calls: int) -> None:
    """Raise unless the layer's module ran exactly once in the forward pass."""
    if calls == 0:
        raise ValueError(
            f"Module {layer.name!r} did not run in the forward pass, though its parameters are in params: "
            "its weight is used without calling the module (as nn.MultiheadAttention does with out_proj), "
            "or the module is unused. KFAC needs one call per layer; leave its parameters out of params."
        )
    if calls != 1:
        raise ValueError(
            f"Module {layer.name!r} ran {calls} times in one forward pass (weight tying or "
            "reuse); KFAC needs one call per layer. Leave its parameters out of params."
        )


def output_gradients(
    layers: list[KroneckerLayer], output: Tensor, layer_outputs: list[Tensor], columns: Tensor
) -> list[Tensor]:
    """Backpropagate the ``[K, *output.shape]`` columns to the layer outputs, as ``[K, N, S, n_out]``.

    The graph is kept (``retain_graph``), so the caller's own backward pass can still run.
    """
    if len(columns) == 1:  # one column: a plain backward pass, no vmap
        single = torch.autograd.grad(
            output, layer_outputs, grad_outputs=columns[0], materialize_grads=True, retain_graph=True
        )
        gradients = [gradient.unsqueeze(0) for gradient in single]
    else:
        gradients = torch.autograd.grad(
            output, layer_outputs, grad_outputs=columns, is_grads_batched=True,
            materialize_grads=True, retain_graph=True,
        )  # fmt: skip
    return [layer_output_gradients(layer.module, g) for layer, g in zip(layers, gradients, strict=True)]


def output_columns(
    loss: LossAdapter,
    fisher_type: str,
    output: Tensor,
    targets: Tensor,
    count: float,
    mc_samples: int = 1,
    seed: int = 0,
    index: int = 0,
) -> Tensor:
    """The ``[K, *output.shape]`` output-space vectors to backpropagate (see the module doc).

    ``"mc"`` draws its labels with ``(seed, index)`` (:meth:`LossAdapter.sample_batch`).
    """
    if fisher_type == "empirical":
        return loss.datum_gradients(output, targets, count).unsqueeze(0)
    if fisher_type == "mc":
        sampled = loss.sample_batch(output, targets, mc_samples, seed, index)
        return torch.func.vmap(lambda t: loss.datum_gradients(output, t, count))(sampled)
    return loss_hessian_factor(loss, output, targets)


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
