"""Layer rules: how KFAC, EKFAC, TKFAC and the optimizer see each kind of layer.

A registry maps module types to :class:`~curvops.nn.layers.rule.LayerRule` objects; a
module's rule is that of the nearest class in its method resolution order, so a subclass of
``nn.Linear`` is a linear layer. Built in: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``,
``nn.Conv3d`` (every padding mode, any ``groups``), ``nn.Embedding`` and ``nn.MultiheadAttention`` (its input
projection and ``out_proj``, :mod:`curvops.nn.layers.attention`) (Kronecker factors), and the
normalization layers ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d``,
``nn.BatchNorm2d``, ``nn.BatchNorm3d`` and ``nn.SyncBatchNorm`` in eval mode (the exact block of
their affine parameters, :mod:`~curvops.nn.layers.norm`). :func:`register_layer_rule` adds a
rule for a module of your own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from .attention import AttentionRule
from .conv import ConvRule
from .embedding import EmbeddingRule
from .linear import LinearRule
from .norm import DENSE_LIMIT, ChannelNormRule, LayerNormRule, NormRule
from .rule import DenseInputRule, KroneckerLayer, LayerRule

_RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Conv3d: ConvRule(),
    nn.Embedding: EmbeddingRule(),
    nn.MultiheadAttention: AttentionRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.RMSNorm: LayerNormRule(),
    nn.GroupNorm: ChannelNormRule(),
    nn.BatchNorm1d: ChannelNormRule(),
    nn.BatchNorm2d: ChannelNormRule(),
    nn.BatchNorm3d: ChannelNormRule(),
    nn.SyncBatchNorm: ChannelNormRule(),
}

OPAQUE_MODULES: dict[type[nn.Module], str] = {}
"""Modules that use their submodules' weights without calling them (so no layer hook sees
those uses): all their parameters are unsupported, with the reason shown in errors."""


def register_layer_rule(module_type: type[nn.Module], rule: LayerRule) -> None:
    """Use ``rule`` for every module of ``module_type`` (and its subclasses without a rule of
    their own) in KFAC, EKFAC, TKFAC and :class:`~curvops.optim.KFACOptimizer`.

    The module must hold ``weight`` (and optionally ``bias``) parameters, run once per forward
    pass, and compute ``y_ns = W a_ns (+ b)`` for the inputs the rule reads from its
    arguments. For vector inputs subclass :class:`~curvops.nn.layers.rule.DenseInputRule` and
    define ``features``; a rule registered for a built-in type replaces the built-in one (e.g.
    ``register_layer_rule(nn.LayerNorm, LayerNormRule(dense_limit=4096))`` keeps dense blocks
    for larger normalization layers).

    Example:
        >>> class Affine(torch.nn.Module):  # a linear layer written by hand
        ...     def __init__(self, n_in, n_out):
        ...         super().__init__()
        ...         self.weight = torch.nn.Parameter(torch.randn(n_out, n_in))
        ...         self.bias = torch.nn.Parameter(torch.zeros(n_out))
        ...     def forward(self, x):
        ...         return x @ self.weight.T + self.bias
        >>> register_layer_rule(Affine, LinearRule())
        >>> type(layer_rule(Affine(3, 2))).__name__
        'LinearRule'
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be a subclass of nn.Module, got {module_type!r}.")
    if not isinstance(rule, LayerRule):
        raise TypeError(f"rule must be a curvops.nn.layers.LayerRule, got {type(rule).__name__}.")
    _RULES[module_type] = rule


def layer_rule(module: nn.Module) -> LayerRule | None:
    """The rule of ``module``'s nearest registered class, or ``None`` (no Kronecker rule).

    Example:
        >>> type(layer_rule(torch.nn.Conv1d(2, 3, 3))).__name__, layer_rule(torch.nn.PReLU())
        ('ConvRule', None)
        >>> type(layer_rule(torch.nn.BatchNorm2d(3))).__name__
        'ChannelNormRule'
    """
    for cls in type(module).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """For every parameter, the ``(module name, module, attribute)`` places that hold it: one
    per module attribute (a module reached under several names, a shared module, is one place,
    under its first name); several places are a tied parameter."""
    owners: dict[int, dict[tuple[int, str], tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attribute, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), {}).setdefault((id(module), attribute), (name, module, attribute))
    return {key: list(places.values()) for key, places in owners.items()}


def _owned_places(model: nn.Module) -> dict[int, tuple[str, nn.Module, str]]:
    """For every parameter inside a module whose rule owns its submodules: that module and the
    parameter's path in it (``("attn", attn, "out_proj.weight")``)."""
    places = {}
    for name, module in model.named_modules():
        rule = layer_rule(module)
        if rule is not None and rule.owns_submodules:
            places.update({id(p): (name, module, path) for path, p in module.named_parameters()})
    return places


def find_layers(
    model: nn.Module,
    params: list[nn.Parameter],
    bias: str,
    kfac_approx: str,
    calls: Mapping[int, frozenset] | None = None,
) -> tuple[list[KroneckerLayer], list[tuple[str, nn.Module, list[nn.Parameter]]]]:
    """The layers with a rule holding chosen parameters (several for a module with parts, see
    :meth:`~curvops.nn.layers.rule.LayerRule.layers`; ``calls``: the parts each module's call
    gives, by ``id(module)``, where they depend on the call), and the other modules that do (a
    module of :data:`OPAQUE_MODULES` stands for all the parameters inside it). A weight tied
    between layers with rules is every one of those layers' weight (each with a separate bias:
    :mod:`curvops.nn.tied` makes its block); other ties raise ``ValueError``."""
    owners, owned = _owners(model), _owned_places(model)
    opaque = {
        id(inner): (name, module)
        for name, module in model.named_modules()
        if isinstance(module, tuple(OPAQUE_MODULES))
        for inner in module.modules()
    }
    chosen = {id(p) for p in params}
    layers: dict[int, list[KroneckerLayer]] = {}
    others: dict[int, tuple[str, nn.Module, list[nn.Parameter]]] = {}
    for p in params:
        places = owners[id(p)]
        if len(places) > 1:
            for name, module, _ in _tied_places(places, opaque):
                if id(module) not in layers:
                    layers[id(module)] = _layers(
                        name, module, layer_rule(module), chosen, "separate", kfac_approx, calls
                    )
            continue
        name, module, attribute = owned.get(id(p), places[0])
        rule = None if id(module) in opaque else layer_rule(module)
        if id(module) in opaque:
            name, module = opaque[id(module)]
        if rule is None or attribute not in rule.parameter_names(module):
            others.setdefault(id(module), (name, module, []))[2].append(p)
        elif id(module) not in layers:
            tied = len(owners.get(id(getattr(module, "weight", None)), ())) > 1
            layers[id(module)] = _layers(
                name, module, rule, chosen, "separate" if tied else bias, kfac_approx, calls
            )
    return [layer for module_layers in layers.values() for layer in module_layers], list(others.values())


def _layers(
    name: str,
    module: nn.Module,
    rule: LayerRule,
    chosen: set[int],
    bias: str,
    kfac_approx: str,
    calls: Mapping[int, frozenset] | None,
) -> list[KroneckerLayer]:
    """The module's layers (:meth:`~curvops.nn.layers.rule.LayerRule.layers`), once its rule has
    checked it."""
    rule.check(name, module, kfac_approx)
    return rule.layers(name, module, chosen, bias, (calls or {}).get(id(module)))


def _tied_places(places: list[tuple[str, nn.Module, str]], opaque: dict) -> list[tuple[str, nn.Module, str]]:
    """The places of a tied parameter, if it is the weight of layers with rules (a block of
    :mod:`curvops.nn.tied`); else ``ValueError`` naming the places."""
    if all(
        attribute == "weight" and id(module) not in opaque and layer_rule(module)
        for _, module, attribute in places
    ):
        return places
    names = " and ".join(repr(f"{name}.{attribute}".lstrip(".")) for name, _, attribute in places)
    raise ValueError(
        f"One parameter is used as {names} (weight tying); KFAC ties only the weights of layers with a "
        "Kronecker rule (an embedding and an output head). Untie it, or leave it out of params."
    )


def calls_from_names(layers: list[KroneckerLayer], names: Iterable[str]) -> dict[int, frozenset]:
    """The parts of each module whose parts depend on the call, read from layer names (those of a
    stored state: ``"attn.in_proj.q"`` is the part ``"in_proj.q"`` of ``"attn"``).

    Example:
        >>> attn = torch.nn.MultiheadAttention(4, 2)
        >>> layers, _ = find_layers(attn, list(attn.parameters()), "separate", "expand")
        >>> calls_from_names(layers, ["in_proj.q", "out_proj"]) == {id(attn): {"in_proj.q", "out_proj"}}
        True
    """
    calls = {}
    for layer in layers:
        if layer.rule.parts_depend_on_call:
            prefix = f"{layer.module_name}." if layer.module_name else ""
            parts = frozenset(name[len(prefix) :] for name in names if name.startswith(prefix))
            calls[id(layer.module)] = parts or None
    return {key: parts for key, parts in calls.items() if parts is not None}


__all__ = [
    "DENSE_LIMIT",
    "OPAQUE_MODULES",
    "AttentionRule",
    "ChannelNormRule",
    "ConvRule",
    "DenseInputRule",
    "EmbeddingRule",
    "KroneckerLayer",
    "LayerNormRule",
    "LayerRule",
    "LinearRule",
    "NormRule",
    "calls_from_names",
    "find_layers",
    "layer_rule",
    "register_layer_rule",
]
