"""What a layer rule is: how the Kronecker approximations see one kind of layer.

A layer computes ``y_ns = W a_ns (+ b)`` at positions ``s`` (tokens, pixels; one position for
a plain ``Linear``) of datum ``n``. Its block of the Fisher / GGN is approximated by ``G ⊗ A``
(Martens & Grosse 2015; convolutions Grosse & Martens 2016; weight sharing Eschenhagen et
al. 2023):

- ``kfac_approx="expand"`` treats positions as data:
  ``A = (1/(N S)) Σ_{n,s} a_ns a_ns^T`` and ``G = (1/Z) Σ_{n,s} Σ_c g_nsc g_nsc^T``;
- ``"reduce"`` sums the output gradients and averages the inputs over positions:
  ``A = (1/N) Σ_n â_n â_n^T`` with ``â_n = (1/S) Σ_s a_ns``, ``G = (1/Z) Σ_n Σ_c ĝ_nc ĝ_nc^T``
  with ``ĝ_nc = Σ_s g_nsc``.

A module called several times in one forward pass (``nn.Sequential(lin, act, lin)``, a block
applied twice, one ``Linear`` over several inputs) shares its weight over its calls as over
positions: the positions ``s`` above run over every position of every call (``S`` is their
total, each call with the batch's ``N`` data), so ``expand`` treats all of them as data and
``reduce`` sums the output gradients over calls and positions and averages the inputs over
them; EKFAC's corrections and TKFAC's ``δ`` use each datum's true gradient
``Σ_calls Σ_s g a^T`` (:meth:`LayerRule.joined_input`).

``Z`` normalises as the loss does (:mod:`curvops.nn.losses`); the columns ``c`` are the
output-space vectors of the Fisher type (:mod:`curvops.nn.fisher`). TKFAC's trace terms and
EKFAC's eigenvalue corrections come from the same captured tensors.

Targets equal to ``ignore_index`` are no loss terms: a layer's positions that belong to none
are left out of every sum (:mod:`curvops.nn.layers.padding` says which).

A rule (:class:`LayerRule`) says what the layer's forward hook captures, how its parameters
lie in the flat vector (``W`` row-major ``[n_out, n_in]``, or ``[n_in, n_out]`` for a
``transposed`` rule such as an embedding's, whose block is then ``A ⊗ G``), and how a
batch's sums come from the captured tensors. :class:`DenseInputRule` does the sums for every
layer whose inputs are vectors ``a_ns``: a new layer of that kind only says how its inputs
become ``[N, S, n_in]`` and its output gradients ``[K, N, S, n_out]``.

A layer of ``g > 1`` groups (a grouped convolution) is ``g`` independent layers sharing one
module: group ``j``'s outputs (weight rows ``j n_out .. (j+1) n_out``) see only its inputs.
Its inputs are ``[N, S, g, n_in]``, its output gradients ``[K, N, S, g, n_out]`` (``n_in``,
``n_out`` per group), and every statistic carries a leading group axis (``A``: ``[g, n_in,
n_in]``, ``δ``: ``[g]``): its block is block-diagonal over the groups, ``G_j ⊗ A_j`` each.

One module may give several Kronecker layers, its *parts* (``nn.MultiheadAttention``: its input
projection and ``out_proj``): :meth:`LayerRule.layers` makes them, :meth:`LayerRule.capture` turns
one call of the module into each part's ``(input, output)``, and a part's weight and bias may be
a range of rows of a parameter (:attr:`KroneckerLayer.weight_rows`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ..batches import data_rows
from ..statistics import LayerStatistics
from .padding import kept_positions, masked
from .per_datum import chunks, correction_strategy, gradient_norms, input_rotated

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class KroneckerLayer:
    """One layer whose weight and/or bias is among the chosen parameters: its identity.

    Attributes:
        name: the module's name in the model.
        module: the module.
        rule: its :class:`LayerRule`.
        weight, bias: the chosen parameters (``None`` where not chosen or absent).
        joint: weight and bias share one block ``G ⊗ A`` (the input carries a trailing 1).
        part: which part of the module it is (``None``: the whole module); ``name`` is then
            ``"<module name>.<part>"``.
        shape: ``(n_out, n_in)`` of the part (``None``: the rule's :meth:`LayerRule.sizes`).
        weight_rows, bias_rows: the ``[start, stop)`` rows of ``weight`` and ``bias`` the part
            covers (``None``: all of them).
    """

    name: str
    module: nn.Module
    rule: LayerRule
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    joint: bool
    part: str | None = None
    shape: tuple[int, int] | None = None
    weight_rows: tuple[int, int] | None = None
    bias_rows: tuple[int, int] | None = None

    @property
    def key(self) -> tuple[int, str | None]:
        """What the pass files the part's captures under: ``(id(module), part)``."""
        return id(self.module), self.part

    @property
    def module_name(self) -> str:
        """The module's name in the model (``name`` without the part)."""
        if self.part is None:
            return self.name
        return self.name[: -len(self.part) - 1] if self.name != self.part else ""

    @property
    def separate_bias(self) -> bool:
        """Whether the bias is chosen and has a block ``G`` of its own."""
        return self.bias is not None and not self.joint

    @property
    def sizes(self) -> tuple[int, int]:
        """``(n_out, n_in)`` of the factors ``G`` and ``A`` (``n_in`` counts a joint bias's 1; per
        group for a grouped layer)."""
        n_out, n_in = self.shape or self.rule.sizes(self.module)
        return n_out, n_in + self.joint

    @property
    def groups(self) -> int:
        """The number of groups ``g`` (``1`` but for a grouped convolution): ``g`` blocks, one per group."""
        return self.rule.groups(self.module)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of ``A``: ``[n_in]`` for a diagonal input factor, else ``[n_in, n_in]``."""
        n_in = self.sizes[1]
        return (n_in,) if self.rule.diagonal_input else (n_in, n_in)

    def kronecker_order(self, output: T, input: T) -> tuple[T, T]:
        """Output- and input-side things (factors, eigenbases, sizes) in the order of the weight's
        flattening: ``(G, A)``, or ``(A, G)`` if transposed; applied to that order, it gives
        ``(output, input)`` back."""
        return (input, output) if self.rule.transposed else (output, input)


class LayerRule(ABC):
    """The Kronecker rule of one kind of layer (see the module docstring).

    Subclass :class:`DenseInputRule` for layers with vector inputs; override the methods
    here for other kinds (the embedding's one-hot inputs). Register a rule with
    :func:`~curvops.nn.layers.register_layer_rule`.

    Attributes:
        transposed: the weight is stored ``[n_in, n_out]`` (its block is ``A ⊗ G``).
        diagonal_input: ``A`` is diagonal, stored as a 1-D ``[n_in]`` tensor.
        exact: the statistics are the exact block of the layer's parameters (``exact_block``,
            :class:`~curvops.nn.layers.norm.NormRule`), not Kronecker factors.
        owns_submodules: the parameters of the module's submodules are the rule's (named by their
            path, ``"out_proj.weight"``), and the submodules get no rule of their own.
        parts_depend_on_call: which parts the module has depends on how it is called (the parts
            :meth:`capture` gives); the passes and the optimizer make its layers for its first call.
    """

    transposed: ClassVar[bool] = False
    diagonal_input: ClassVar[bool] = False
    exact: ClassVar[bool] = False
    owns_submodules: ClassVar[bool] = False
    parts_depend_on_call: ClassVar[bool] = False

    def check(self, name: str, module: nn.Module, kfac_approx: str) -> None:  # noqa: B027 (optional)
        """Raise ``ValueError`` (naming the module) for configurations the rule does not handle."""

    def groups(self, module: nn.Module) -> int:
        """The number of independent groups of the layer's weight rows (``1``: one block)."""
        return 1

    def sizes(self, module: nn.Module) -> tuple[int, int]:
        """``(n_out, n_in)`` of the weight seen as a matrix (without a joint bias), per group."""
        weight = module.weight
        n_out, n_in = weight.shape[0] // self.groups(module), weight[0].numel()
        return (n_in, n_out) if self.transposed else (n_out, n_in)

    def captured_input(self, args: tuple) -> Tensor:
        """What the forward hook keeps of the module's positional arguments: its input."""
        return args[0]

    def joined_input(self, name: str, module: nn.Module, inputs: list[Tensor]) -> Any:
        """The captured inputs of the module's calls in one forward pass (in call order, each with
        the batch's ``N`` data) as the one ``inputs`` that :meth:`statistics` and :meth:`correction`
        read: the positions of every call together, as one call's (weight sharing over calls, as
        over positions). By default one call's input; several calls are refused (naming the
        module) unless a rule joins them.
        """
        if len(inputs) != 1:
            raise ValueError(
                f"Module {name!r} ran {len(inputs)} times in one forward pass, and its layer rule "
                f"{type(self).__name__} does not join several calls (weight sharing): define its "
                "joined_input, or leave its parameters out of params."
            )
        return inputs[0]

    def parameter_names(self, module: nn.Module) -> tuple[str, ...]:
        """The names (in ``module.named_parameters()``) of the parameters the rule gives blocks."""
        return ("weight", "bias")

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why the module's parameters outside :meth:`parameter_names` have no block (for errors)."""
        return None

    def layers(
        self, name: str, module: nn.Module, chosen: set[int], bias: str, parts: frozenset | None = None
    ) -> list[KroneckerLayer]:
        """The module's Kronecker layers holding chosen parameters (ids in ``chosen``): one, of its
        weight and bias (joint if ``bias == "joint"`` and both are chosen). ``parts``: those a
        call of the module gave (:meth:`capture`), ``None`` before any call."""
        weight = module.weight if id(module.weight) in chosen else None
        module_bias = getattr(module, "bias", None)
        bias_param = module_bias if module_bias is not None and id(module_bias) in chosen else None
        joint = bias == "joint" and weight is not None and bias_param is not None
        return [KroneckerLayer(name, module, self, weight, bias_param, joint)]

    def capture(
        self, name: str, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> tuple[Any, dict[str | None, tuple[Tensor, Tensor]]]:
        """One call of the module, seen by a forward hook: the output the forward pass goes on with,
        and each part's ``(input, output)`` (here the whole module's, part ``None``)."""
        output = differentiable(output)
        return output, {None: (self.captured_input(args), output)}

    def output_gradients(self, module: nn.Module, gradients: Tensor) -> Tensor:
        """Gradients w.r.t. the module output, ``[K, N, *out]``, as ``[K, N, S, n_out]``."""
        return gradients.reshape(gradients.shape[0], gradients.shape[1], -1, gradients.shape[-1])

    @abstractmethod
    def statistics(
        self,
        layer: KroneckerLayer,
        inputs: Tensor,
        gradients: Tensor | None,
        weight: float,
        kfac_approx: str,
        trace_restricted: bool,
        dtype: torch.dtype,
        valid: Tensor | None = None,
        total: LayerStatistics | None = None,
    ) -> LayerStatistics:
        """One batch's sums: ``Σ w a a^T`` and its count, ``Σ g g^T`` (gradients already carry
        ``√w``) and, with ``trace_restricted``, TKFAC's ``Σ ‖∇_W ℓ‖²``, ``Σ tr(gg^T) aa^T``,
        ``Σ tr(aa^T) gg^T`` and a separate bias's ``Σ ‖∇_b ℓ‖²``, all in ``dtype``, over the
        positions :func:`~curvops.nn.layers.padding.kept_positions` keeps for the mask ``valid``
        of the batch's loss terms (``None``: all). With ``total`` (a running total of earlier
        batches, which owns its tensors): ``total`` plus this batch, added into ``total``'s
        tensors in place (:meth:`~curvops.nn.statistics.LayerStatistics.accumulate`)."""

    @abstractmethod
    def correction(
        self,
        layer: KroneckerLayer,
        inputs: Tensor,
        rotated: Tensor,
        q_in: Tensor | None,
        correction: str,
        valid: Tensor | None = None,
    ) -> Tensor:
        """One batch's ``Σ_{n,c} (Q_out^T ∇_W ℓ_nc Q_in)²`` in the weight's layout (``[n_out, n_in]``,
        ``[n_in, n_out]`` for a transposed rule, ``[g, n_out, n_in]`` per group) from the output
        gradients already rotated by ``Q_out`` (``q_in`` is ``None`` for a diagonal input factor),
        over the kept positions as in :meth:`statistics`."""


def differentiable(output: Tensor) -> Tensor:
    """``output``, or a leaf that requires grad where it does not (every parameter up to it
    frozen): something to differentiate the loss at.

    Example:
        >>> differentiable(torch.ones(2)).requires_grad
        True
    """
    return output if output.requires_grad else output.detach().requires_grad_(True)


def second_moment(
    rows: Tensor, grouped: bool = False, out: Tensor | None = None, alpha: float = 1.0
) -> Tensor:
    """``α Σ x x^T`` over the vectors ``x = rows[..., :]`` (all leading axes summed); ``grouped``:
    per group, for rows ``[..., g, n]``, as ``[g, n, n]``. With ``out`` (a running sum) the
    product is added into it in place, in the matrix product itself where the rows allow
    (``addmm``, ``baddbmm``), and ``out`` is returned.

    Contiguous rows take one matrix product; rows that are a transposed view (unfolded
    convolution patches, convolution output gradients) take a batched product over their
    leading axes, which avoids copying them into row-major order.

    Example:
        >>> rows = torch.randn(4, 3, 2, dtype=torch.float64)
        >>> torch.allclose(second_moment(rows), rows.reshape(-1, 2).T @ rows.reshape(-1, 2))
        True
        >>> torch.allclose(second_moment(rows, grouped=True)[1], rows[:, 1].T @ rows[:, 1])
        True
        >>> total = second_moment(rows)
        >>> torch.allclose(second_moment(rows, out=total.clone(), alpha=0.5), 1.5 * total)
        True
    """
    if grouped:
        per_group = rows.reshape(-1, *rows.shape[-2:]).transpose(0, 1)  # [g, M, n]
        if out is not None:
            return torch.baddbmm(out, per_group.transpose(1, 2), per_group, alpha=alpha, out=out)
        product = torch.bmm(per_group.transpose(1, 2), per_group)
    elif rows.is_contiguous():
        flat = rows.reshape(-1, rows.shape[-1])
        if out is not None:
            return torch.addmm(out, flat.T, flat, alpha=alpha, out=out)
        product = flat.T @ flat
    else:
        batched = rows.reshape(-1, *rows.shape[-2:])
        product = torch.bmm(batched.transpose(1, 2), batched).sum(0)
    if out is not None:
        return out.add_(product, alpha=alpha)
    return product if alpha == 1.0 else alpha * product


def rotate(rows: Tensor, basis: Tensor) -> Tensor:
    """``rows @ Q``; with a group axis (rows ``[..., g, n]``, ``Q`` ``[g, n, n]``) per group.

    Example:
        >>> rows, q = torch.randn(5, 2, 3), torch.randn(2, 3, 3)
        >>> torch.allclose(rotate(rows, q)[:, 1], rows[:, 1] @ q[1])
        True
    """
    return rows @ basis if basis.ndim == 2 else torch.einsum("...gi,gij->...gj", rows, basis)


def _position_means(features: Tensor, kept: Tensor | None) -> Tensor:
    """``â_n``, ``[N, 1, n_in]`` (``[N, 1, g, n_in]`` grouped): each datum's mean input over its
    kept positions (zero for none)."""
    if kept is None:
        return features.mean(dim=1, keepdim=True)
    per_datum = kept.sum(dim=1).clamp(min=1).to(features.dtype)
    return features.sum(dim=1, keepdim=True) / per_datum.reshape(-1, *[1] * (features.ndim - 1))


class DenseInputRule(LayerRule):
    """A layer with vector inputs ``a_ns``: subclasses say how the captured input becomes
    ``[N, S, n_in]`` (:meth:`features`; ``[N, S, g, n_in]`` for ``g > 1`` groups, with output
    gradients ``[K, N, S, g, n_out]``); the factor sums, TKFAC's terms and EKFAC's corrections
    follow from them.

    Attributes:
        feature_chunk: for a rule whose features are a copy of its input (a convolution's patches),
            how many numbers of features :meth:`statistics` makes and sums at a time, in chunks of
            data that stay in cache (``None``: the whole batch at once).
    """

    feature_chunk: ClassVar[int | None] = None

    @abstractmethod
    def features(self, module: nn.Module, inputs: Tensor) -> Tensor:
        """The input vectors ``a`` at every position, ``[N, S, n_in]`` (``[N, S, g, n_in]`` if grouped)."""

    def joined_input(self, name: str, module: nn.Module, inputs: list[Tensor]) -> Tensor | list[Tensor]:
        """One call's input, or the list of every call's (:meth:`_features` joins their positions)."""
        return inputs[0] if len(inputs) == 1 else inputs

    def _features(self, layer: KroneckerLayer, inputs: Tensor | list[Tensor], dtype: torch.dtype) -> Tensor:
        """``[N, S, n_in]`` in ``dtype`` (a joint bias's 1 appended): the positions of every call."""
        if isinstance(inputs, list):
            features = torch.cat([self.features(layer.module, x.to(dtype)) for x in inputs], dim=1)
        else:
            features = self.features(layer.module, inputs.to(dtype))
        if layer.joint:
            features = torch.cat([features, features.new_ones(*features.shape[:-1], 1)], dim=-1)
        return features

    def statistics(
        self,
        layer: KroneckerLayer,
        inputs: Tensor,
        gradients: Tensor | None,
        weight: float,
        kfac_approx: str,
        trace_restricted: bool,
        dtype: torch.dtype,
        valid: Tensor | None = None,
        total: LayerStatistics | None = None,
    ) -> LayerStatistics:
        data = (inputs[0] if isinstance(inputs, list) else inputs).shape[0]
        first = self._features(layer, data_rows(inputs, 0, 1), dtype) if self.feature_chunk else None
        blocks = [slice(0, data)] if first is None else chunks(data, first.numel(), self.feature_chunk)
        options = (weight, kfac_approx, trace_restricted)
        if len(blocks) == 1:
            features = self._features(layer, inputs, dtype)
            kept = kept_positions(valid, *features.shape[:2])
            return self._sums(layer, features, gradients, kept, *options, total)
        kept = kept_positions(valid, data, first.shape[1])
        for block in blocks:  # the same sums, chunk by chunk of data
            features = self._features(layer, data_rows(inputs, block.start, block.stop), dtype)
            chunk_gradients = None if gradients is None else gradients[:, block]
            total = self._sums(
                layer, features, chunk_gradients, None if kept is None else kept[block], *options, total
            )
        return total

    def _sums(
        self,
        layer: KroneckerLayer,
        features: Tensor,
        gradients: Tensor | None,
        kept: Tensor | None,
        weight: float,
        kfac_approx: str,
        trace_restricted: bool,
        total: LayerStatistics | None,
    ) -> LayerStatistics:
        """:meth:`statistics` of data with ``features`` and the mask ``kept`` of their positions."""
        grouped, terms = layer.groups > 1, {}

        def moment(name: str, rows: Tensor, alpha: float = 1.0) -> Tensor:  # into total's, if any
            return second_moment(rows, grouped, None if total is None else getattr(total, name), alpha)

        trailing = 2 if grouped else 1
        features, gradients = masked(features, kept, trailing), masked(gradients, kept, trailing)
        if trace_restricted and gradients is not None:
            terms["trace"] = gradient_norms(gradients, features)
            if layer.separate_bias:
                terms["bias_trace"] = gradients.sum(dim=2).square().sum(dim=(0, 1, -1))
        if kfac_approx == "reduce":
            features = _position_means(features, kept)
            gradients = None if gradients is None else gradients.sum(dim=2, keepdim=True)
            kept = None if kept is None else kept.any(dim=1, keepdim=True)
        terms["input_factor"] = moment("input_factor", features, weight)
        count = weight * (math.prod(features.shape[:2]) if kept is None else float(kept.sum()))
        if gradients is not None:
            terms["output_factor"] = moment("output_factor", gradients)
            if trace_restricted:
                input_norms, output_norms = features.square().sum(-1), gradients.square().sum(-1)
                weighted_inputs = features * output_norms.sum(0).sqrt().unsqueeze(-1)
                weighted_outputs = gradients * input_norms.sqrt().unsqueeze(-1)
                terms["trace_input_factor"] = moment("trace_input_factor", weighted_inputs)
                terms["trace_output_factor"] = moment("trace_output_factor", weighted_outputs)
        batch = LayerStatistics(layer, input_count=count, **terms)
        return batch if total is None else total.accumulate(batch)

    def correction(
        self,
        layer: KroneckerLayer,
        inputs: Tensor,
        rotated: Tensor,
        q_in: Tensor | None,
        correction: str,
        valid: Tensor | None = None,
    ) -> Tensor:
        trailing = 2 if layer.groups > 1 else 1
        features = self._features(layer, inputs, q_in.dtype)
        features = masked(features, kept_positions(valid, *features.shape[:2]), trailing)
        columns, data, positions, outputs = *rotated.shape[:3], rotated.shape[-1]
        groups, size = math.prod(rotated.shape[3:-1]), features.shape[-1]
        strategy = correction_strategy(correction, columns, data, positions, outputs, size)
        # per example, Q_in can act on the positions' inputs (S·n_in² per datum) or on the datum's
        # gradient once its positions are summed (n_out·n_in²): the cheaper of the two
        rotate_gradients = strategy == "per-example" and outputs < positions
        if not rotate_gradients:
            features = rotate(features, q_in)
        per_datum = columns * outputs * size if strategy == "per-example" else positions**2 * (outputs + size)
        per_datum *= groups
        total = None
        for block in chunks(data, per_datum):  # bounded memory
            g, a = rotated[:, block], features[block]
            if strategy == "per-example":
                gradients = torch.einsum("kns...o,ns...i->kn...oi", g, a)
                if rotate_gradients:
                    gradients = input_rotated(gradients, q_in)
                part = gradients.square().sum(dim=(0, 1))
            else:
                output_gram = torch.einsum("kns...o,knt...o->nst...o", g, g)
                input_gram = torch.einsum("ns...i,nt...i->nst...i", a, a)
                part = torch.einsum("nst...o,nst...i->...oi", output_gram, input_gram)
            total = part if total is None else total.add_(part)
        return total.mT if self.transposed else total
