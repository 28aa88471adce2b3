"""Layer rules: how KFAC, EKFAC, TKFAC and the optimizer see each kind of layer.

A registry maps module types to :class:`~curvops.nn.layers.rule.LayerRule` objects; a
module's rule is that of the nearest class in its method resolution order, so a subclass of
``nn.Linear`` is a linear layer. Built in: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``,
``nn.Conv3d`` (every padding mode, any ``groups``) and ``nn.Embedding`` (Kronecker factors), and the
normalization layers ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d``,
``nn.BatchNorm2d``, ``nn.BatchNorm3d`` and ``nn.SyncBatchNorm`` in eval mode (the exact block of
their affine parameters, :mod:`~curvops.nn.layers.norm`). :func:`register_layer_rule` adds a
rule for a module of your own.
"""

from __future__ import annotations

from torch import nn

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
    nn.LayerNorm: LayerNormRule(),
    nn.RMSNorm: LayerNormRule(),
    nn.GroupNorm: ChannelNormRule(),
    nn.BatchNorm1d: ChannelNormRule(),
    nn.BatchNorm2d: ChannelNormRule(),
    nn.BatchNorm3d: ChannelNormRule(),
    nn.SyncBatchNorm: ChannelNormRule(),
}

OPAQUE_MODULES = {
    nn.MultiheadAttention: "it uses its out_proj weight without calling the out_proj module",
}
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


def find_layers(
    model: nn.Module, params: list[nn.Parameter], bias: str, kfac_approx: str
) -> tuple[list[KroneckerLayer], list[tuple[str, nn.Module, list[nn.Parameter]]]]:
    """The layers with a rule holding chosen parameters, and the other modules that do (a
    module of :data:`OPAQUE_MODULES` stands for all the parameters inside it). A weight tied
    between layers with rules is every one of those layers' weight (each with a separate bias:
    :mod:`curvops.nn.tied` makes its block); other ties raise ``ValueError``."""
    owners = _owners(model)
    opaque = {
        id(inner): (name, module)
        for name, module in model.named_modules()
        if isinstance(module, tuple(OPAQUE_MODULES))
        for inner in module.modules()
    }
    chosen = {id(p) for p in params}
    layers: dict[int, KroneckerLayer] = {}
    others: dict[int, tuple[str, nn.Module, list[nn.Parameter]]] = {}
    for p in params:
        places = owners[id(p)]
        if len(places) > 1:
            for name, module, _ in _tied_places(places, opaque):
                if id(module) not in layers:
                    layers[id(module)] = _layer(
                        name, module, layer_rule(module), chosen, "separate", kfac_approx
                    )
            continue
        name, module, attribute = places[0]
        rule = None if id(module) in opaque else layer_rule(module)
        if id(module) in opaque:
            name, module = opaque[id(module)]
        if rule is None or attribute not in ("weight", "bias"):
            others.setdefault(id(module), (name, module, []))[2].append(p)
        elif id(module) not in layers:
            tied = len(owners.get(id(getattr(module, "weight", None)), ())) > 1
            layers[id(module)] = _layer(name, module, rule, chosen, "separate" if tied else bias, kfac_approx)
    return list(layers.values()), list(others.values())


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


def _layer(
    name: str, module: nn.Module, rule: LayerRule, chosen: set[int], bias: str, kfac_approx: str
) -> KroneckerLayer:
    rule.check(name, module, kfac_approx)
    weight = module.weight if id(module.weight) in chosen else None
    module_bias = getattr(module, "bias", None)
    bias_param = module_bias if module_bias is not None and id(module_bias) in chosen else None
    joint = bias == "joint" and weight is not None and bias_param is not None
    return KroneckerLayer(name, module, rule, weight, bias_param, joint)


__all__ = [
    "DENSE_LIMIT",
    "OPAQUE_MODULES",
    "ChannelNormRule",
    "ConvRule",
    "DenseInputRule",
    "EmbeddingRule",
    "KroneckerLayer",
    "LayerNormRule",
    "LayerRule",
    "LinearRule",
    "NormRule",
    "find_layers",
    "layer_rule",
    "register_layer_rule",
]
