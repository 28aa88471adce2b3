"""Which block each parameter gets from KFAC, EKFAC, TKFAC or TEKFAC, before any pass over data.

:func:`coverage` asks the same questions the builders ask (:func:`~curvops.nn.layers.find_layers`:
the layer rule of each parameter's module, the rule's ``check``, weight tying; the batch-norm
check of :class:`~curvops.nn.ModelData`) without running the model, and answers per parameter
instead of raising at the first refusal.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from ..linalg.checks import check_choice
from .forward_checks import check_batch_statistics
from .layers import KroneckerLayer, find_layers
from .options import UNSUPPORTED_FIX, UNSUPPORTED_OPTIONS, KroneckerOptions, unsupported_error
from .parameters import chosen_parameters
from .tied import check_ties

COLUMNS = ("parameter", "shape", "numel", "module", "type", "block", "rule", "bias", "label")


@dataclass(frozen=True)
class CoverageRow:
    """What one parameter gets.

    Attributes:
        name: the parameter's name in ``model.named_parameters()``.
        shape, numel: its shape and number of entries.
        module, module_type: the module that holds it (for a parameter inside an
            ``nn.MultiheadAttention``, the attention module) and its class name.
        block: ``"kronecker"`` (a block from its layer's Kronecker factors: ``G ⊗ A`` for a
            weight, ``G`` for a separate bias), ``"kronecker-eigen"`` (EKFAC's and TEKFAC's
            corrected eigenvalues in that basis), ``"exact"`` or ``"exact-diagonal"`` (a
            normalization layer's exact block from the statistics pass, or its diagonal above
            the rule's ``dense_limit``), ``"dense"`` or ``"diagonal"`` (an exact block of its
            module from the exact operator, with ``unsupported=``), or ``"refused"``.
        groups: a Kronecker block's number of groups ``g``: a grouped convolution's block is a
            :class:`~curvops.linalg.GroupedKronecker` (``GroupedKroneckerEigen``), one such block
            per group (shown as ``"kronecker ×g"``).
        rule: the layer rule's class name (``"LinearRule"``) for blocks from a rule, else ``None``.
        bias: ``"joint"`` or ``"separate"`` for the weight and bias of a layer whose bias is
            chosen, else ``None``.
        label: the label of its block in the operator (``op.block(label)``), ``None`` if refused;
            the labels of several blocks joined by ``", "`` (an attention's q, k and v rows of
            ``in_proj_weight`` with ``AttentionRule(in_projection="separate")``).
        reason: why it is refused: the builder's error for it (``None`` unless refused).
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    module: str
    module_type: str
    block: str
    rule: str | None = None
    bias: str | None = None
    label: str | None = None
    reason: str | None = None
    groups: int = 1

    def cells(self) -> tuple[str, ...]:
        """The row's entries in the table of :meth:`Coverage.table`."""
        block = self.block if self.groups == 1 else f"{self.block} ×{self.groups}"
        values = (self.name, list(self.shape), self.numel, self.module, self.module_type, block)
        return tuple(map(str, values)) + tuple(v or "-" for v in (self.rule, self.bias, self.label))


@dataclass(frozen=True)
class Coverage:
    """The block of every chosen parameter (:func:`coverage`), one row each in ``params`` order.

    Rows are found by parameter name (``report["fc.weight"]``) or iterated over. Rows that are not
    refused say what the builder gives them once the refused ones are left out of ``params``.

    Attributes:
        approximation: ``"KFAC"``, ``"EKFAC"``, ``"TKFAC"`` or ``"TEKFAC"``.
        rows: one :class:`CoverageRow` per parameter.
        model_refusal: why the builder refuses the model whatever the parameters (batch
            normalisation with batch statistics), or ``None``.
    """

    approximation: str
    rows: tuple[CoverageRow, ...]
    model_refusal: str | None = None

    def __iter__(self) -> Iterator[CoverageRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, name: str) -> CoverageRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"No parameter {name!r} in the coverage; its parameters are {[r.name for r in self]}.")

    @property
    def refused(self) -> tuple[CoverageRow, ...]:
        """The refused rows: leave their parameters out of ``params`` (or follow their ``reason``)."""
        return tuple(row for row in self.rows if row.block == "refused")

    @property
    def totals(self) -> dict[str, int]:
        """The number of parameter entries per block kind, in the order the kinds first appear."""
        totals: dict[str, int] = {}
        for row in self.rows:
            totals[row.block] = totals.get(row.block, 0) + row.numel
        return totals

    def table(self) -> str:
        """An aligned table of the rows, the totals per block kind, and the reasons for refusals."""
        cells = [COLUMNS, *(row.cells() for row in self.rows)]
        widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells]
        lines.append(", ".join(f"{kind} {count}" for kind, count in self.totals.items()))
        lines += [f"refused {row.name}: {row.reason}" for row in self.refused]
        if self.model_refusal is not None:
            lines.append(f"{self.approximation} refuses the model: {self.model_refusal}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def coverage(
    model: nn.Module,
    params: Sequence[nn.Parameter] | Mapping[str, nn.Parameter] | None = None,
    approximation: str = "kfac",
    kfac_approx: str = "expand",
    bias: str = "separate",
    unsupported: str = "error",
) -> Coverage:
    """Which block every parameter gets from :func:`~curvops.KFAC` (or ``approximation``:
    ``"ekfac"``, ``"tkfac"``, ``"tekfac"``) with these options, without data and without
    running the model.

    Each parameter of a layer with a rule (``nn.Linear``, convolutions, ``nn.Embedding``,
    ``nn.MultiheadAttention``'s projections, rules of your own) gets a Kronecker block (one per
    group of a grouped convolution), those of a normalization layer (``nn.LayerNorm``,
    ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.BatchNorm*``) its exact block (``"exact"``, or
    ``"exact-diagonal"`` for a large one); the parameters of other modules (and an attention's
    ``bias_k``/``bias_v``) get an exact ``"dense"`` or ``"diagonal"`` block with
    ``unsupported=``, or are refused. A weight tied between layers (an embedding and the output
    head) is in its first layer's row: KFAC's nearest Kronecker block (:mod:`curvops.nn.tied`).
    Refused too: a layer its rule does not handle (an embedding with ``max_norm``), a tied
    weight for EKFAC, TKFAC and TEKFAC, and a weight tied to a module without a rule; each
    refused row gives the builder's error for it. It raises only for invalid options and
    parameters (as the builders do). What only a pass can show is not checked here: a layer
    whose module never runs in the forward pass, or runs several times on different batch
    sizes, and how an attention module is called (cross-attention of one with a joint q/k/v
    block is refused in the pass).

    Args:
        model: the network.
        params: parameters of ``model`` as for the builders (default: the trainable ones).
        approximation: ``"kfac"``, ``"ekfac"``, ``"tkfac"`` or ``"tekfac"``.
        kfac_approx, bias, unsupported: the builders' options (:func:`~curvops.KFAC`).

    Example:
        >>> layers = [torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.PReLU(), torch.nn.Linear(4, 2)]
        >>> model = torch.nn.Sequential(*layers)
        >>> print(curvops.nn.coverage(model, bias="joint", unsupported="diagonal"))
        parameter  shape   numel  module  type       block      rule           bias   label
        0.weight   [4, 3]  12     0       Linear     kronecker  LinearRule     joint  0
        0.bias     [4]     4      0       Linear     kronecker  LinearRule     joint  0
        1.weight   [4]     4      1       LayerNorm  exact      LayerNormRule  joint  1
        1.bias     [4]     4      1       LayerNorm  exact      LayerNormRule  joint  1
        2.weight   [1]     1      2       PReLU      diagonal   -              -      2
        3.weight   [2, 4]  8      3       Linear     kronecker  LinearRule     joint  3
        3.bias     [2]     2      3       Linear     kronecker  LinearRule     joint  3
        kronecker 26, exact 8, diagonal 1
        >>> report = curvops.nn.coverage(model)
        >>> report.totals, [row.name for row in report.refused]
        ({'kronecker': 26, 'exact': 8, 'refused': 1}, ['2.weight'])
        >>> report["2.weight"].reason  # doctest: +ELLIPSIS
        "KFAC has no Kronecker rule for the parameters of '2' (PReLU). Leave them out of params, ..."
    """
    options = KroneckerOptions.checked(approximation, "type-2", kfac_approx, bias)  # blocks: any Fisher type
    check_choice(unsupported, UNSUPPORTED_OPTIONS, "unsupported")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    chosen, names = chosen_parameters(model, params)
    refusals = _layer_refusals(model, chosen, options)
    usable = [p for p in chosen if id(p) not in refusals]
    layers, others = find_layers(model, usable, options.bias, options.kfac_approx) if usable else ([], [])
    places = dict(refusals)
    for layer in layers:
        _add_places(places, _kronecker_places(layer, options))
    for module_name, module, module_params in others:
        place = _other_place(module_name, module, options, unsupported)
        places.update({id(p): place for p in module_params})
    holders = _first_holders(model)
    rows = tuple(
        CoverageRow(name, tuple(p.shape), p.numel(), **{**holders[id(p)], **places[id(p)]})
        for p, name in zip(chosen, names, strict=True)
    )
    return Coverage(options.approximation.label, rows, _model_refusal(model))


def _layer_refusals(
    model: nn.Module, params: list[nn.Parameter], options: KroneckerOptions
) -> dict[int, dict]:
    """The parameters :func:`find_layers` refuses (a rule's check, weight tying) or the
    approximation refuses (a tied weight but for KFAC), with the error: asked once for all, and
    per parameter where that fails."""
    try:
        check_ties(find_layers(model, params, options.bias, options.kfac_approx)[0], options.approximation)
        return {}
    except ValueError:
        pass
    refusals = {}
    for p in params:
        try:
            check_ties(find_layers(model, [p], options.bias, options.kfac_approx)[0], options.approximation)
        except ValueError as error:
            refusals[id(p)] = {"block": "refused", "reason": str(error)}
    return refusals


def _kronecker_places(layer: KroneckerLayer, options: KroneckerOptions) -> dict[int, dict]:
    """The block of a layer's weight and bias (Kronecker or exact), labelled as :meth:`Layout.place` does."""
    name = layer.name or type(layer.module).__name__
    block = "kronecker-eigen" if options.approximation.corrected else "kronecker"
    if layer.rule.exact:
        block = "exact" if len(layer.rule.block_shape(layer)) == 2 else "exact-diagonal"
    bias = None if layer.bias is None else ("joint" if layer.joint else "separate")
    places = {}
    for kind, p in (("weight", layer.weight), ("bias", layer.bias)):
        if p is not None:
            label = name if layer.joint else f"{name}.{kind}"
            places[id(p)] = {
                **_holder(layer.module_name, layer.module),
                "block": block,
                "rule": type(layer.rule).__name__,
                "bias": bias,
                "label": label,
                "groups": layer.groups,
            }
    return places


def _add_places(places: dict[int, dict], new: dict[int, dict]) -> None:
    """Put ``new`` places in; a parameter with blocks of several parts of one module (an attention's
    q, k and v rows of ``in_proj_weight``) gets their labels joined by ``", "``; a weight tied
    between layers keeps its first layer's place, where its block lies."""
    for key, place in new.items():
        if key in places:
            if places[key]["module"] != place["module"]:
                continue
            place = {**place, "label": f"{places[key]['label']}, {place['label']}"}
        places[key] = place


def _other_place(name: str, module: nn.Module, options: KroneckerOptions, unsupported: str) -> dict:
    """A module without a Kronecker rule: its exact block, or the builder's error."""
    if unsupported == "error":
        reason = unsupported_error(options.approximation.label, [(name, module, None)], UNSUPPORTED_FIX)
        return {**_holder(name, module), "block": "refused", "reason": str(reason)}
    return {**_holder(name, module), "block": unsupported, "label": name or type(module).__name__}


def _holder(name: str, module: nn.Module) -> dict[str, str]:
    return {"module": name, "module_type": type(module).__name__}


def _first_holders(model: nn.Module) -> dict[int, dict[str, str]]:
    """Every parameter's first module (as ``model.named_parameters()`` names it), for refused ones."""
    holders: dict[int, dict[str, str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), _holder(name, module))
    return holders


def _model_refusal(model: nn.Module) -> str | None:
    try:
        check_batch_statistics(model)
    except ValueError as error:
        return str(error)
    return None
