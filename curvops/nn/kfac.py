"""KFAC: the Kronecker-factored approximation of a model's Fisher / GGN as a structured operator."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..linalg import BlockDiagonal, CurvatureOperator, Dense, Diagonal, Kronecker, Permuted
from ..linalg.base import check_choice
from .curvature import GGN, EmpiricalFisher, FisherMC
from .kronecker_statistics import (
    FISHER_TYPES,
    KFAC_APPROXIMATIONS,
    KRONECKER_LAYERS,
    KroneckerLayer,
    KroneckerStatistics,
    check_layer,
)
from .losses import LossAdapter
from .model import ModelData

UNSUPPORTED_OPTIONS = ("error", "dense", "diagonal")


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """For every parameter, the ``(module name, module, attribute)`` places that hold it."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attribute, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((name, module, attribute))
    return owners


class _Layout:
    """Where each block's entries sit in the flat parameter vector."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.offsets, start = {}, 0
        for p in params:
            self.offsets[id(p)] = start
            start += p.numel()
        self.size = start

    def indices(self, p: nn.Parameter, device: torch.device) -> Tensor:
        return self.offsets[id(p)] + torch.arange(p.numel(), device=device)

    def joint(self, weight: nn.Parameter, bias: nn.Parameter, device: torch.device) -> Tensor:
        """``vec([W b])`` order: each output row's weights, then its bias."""
        rows = self.indices(weight, device).reshape(weight.shape[0], -1)
        return torch.cat([rows, self.indices(bias, device).unsqueeze(1)], dim=1).flatten()


def KFAC(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: Iterable,
    params: Sequence[nn.Parameter] | None = None,
    fisher_type: str = "mc",
    mc_samples: int = 1,
    kfac_approx: str = "expand",
    seed: int = 0,
    progressbar: bool = False,
    bias: str = "separate",
    unsupported: str = "error",
    check_deterministic: bool = False,
) -> CurvatureOperator:
    """KFAC of the Fisher / GGN of ``loss_fn`` over ``data``, as a structured operator.

    Per supported layer (``nn.Linear`` with any leading axes, ``nn.Conv1d``, ``nn.Conv2d``
    with ``groups=1``, ``nn.Embedding``) the block of its weight is ``G ⊗ A`` (see
    :mod:`curvops.nn.kronecker_statistics` for ``A``, ``G``, ``fisher_type`` and
    ``kfac_approx``); an embedding's block is ``A ⊗ G`` with a diagonal ``A`` (its weight is
    ``[num_embeddings, dim]``). The operator is block-diagonal over layers, in the order and
    layout of ``params`` — the same matrix convention as :class:`~curvops.GGN` (the loss over
    the whole data set as its reduction defines it, independent of batching) — so
    ``inverse``, ``logdet``, ``det`` and ``trace`` are exact through the Kronecker factors,
    and ``inverse(damping, factored=True)`` gives the π-damped inverse. It is a snapshot: its
    factors are tensors, with a ``state_dict``. The result is a :class:`~curvops.BlockDiagonal`
    labelled by parameter (``"fc.weight"``, ``"fc.bias"``) or, for a joint bias, by layer
    (``"fc"``, a :class:`~curvops.Permuted` Kronecker block from ``vec([W b])`` to
    ``[vec W, b]``); only a ``params`` order that splits a layer's weight from its bias
    wraps the whole operator in one ``Permuted``.

    Args:
        model: the network.
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``
            (``"forward-only"`` takes any loss).
        data: a re-iterable of ``(X, y)`` batches; statistics take one pass over it.
        params: the parameters (default: the model's trainable ones, in order).
        fisher_type: ``"type-2"`` (KFAC of the GGN), ``"mc"``, ``"empirical"`` or
            ``"forward-only"`` (``G = I``).
        mc_samples: labels drawn per datum for ``"mc"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` for layers shared over positions.
        seed: seed of the ``"mc"`` label draws.
        progressbar: a tqdm bar on the pass over the data.
        bias: ``"separate"`` (a ``G`` block of its own) or ``"joint"`` (one block ``G ⊗ A`` with
            a constant 1 appended to the inputs) for layers whose weight and bias are both in
            ``params``.
        unsupported: what to do with parameters of other modules (LayerNorm, BatchNorm, ...):
            ``"error"``, or an exact ``"dense"`` or ``"diagonal"`` block per module from the
            exact operator of the same ``fisher_type`` (GGN for ``"type-2"`` and
            ``"forward-only"``).
        check_deterministic: raise when the data or outputs differ between passes.

    Example:
        >>> layers = [torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)]
        >>> model = torch.nn.Sequential(*layers).double()
        >>> data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
        >>> kfac = curvops.KFAC(model, torch.nn.CrossEntropyLoss(), data, fisher_type="type-2")
        >>> kfac.shape, type(kfac).__name__
        ((26, 26), 'BlockDiagonal')
        >>> step = kfac.inverse(damping=1e-3) @ torch.ones(26, dtype=torch.float64)
    """
    check_choice(fisher_type, FISHER_TYPES, "fisher_type")
    check_choice(kfac_approx, KFAC_APPROXIMATIONS, "kfac_approx")
    check_choice(bias, ("separate", "joint"), "bias")
    check_choice(unsupported, UNSUPPORTED_OPTIONS, "unsupported")
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}.")
    loss = LossAdapter(loss_fn, likelihood=fisher_type != "forward-only", what=f"KFAC({fisher_type!r})")
    if fisher_type in ("type-2", "mc"):
        loss.check_sampling(f"KFAC({fisher_type!r})")
    model_data = ModelData(model, data, params, progressbar, check_deterministic)
    layers, others = _find_layers(model, model_data.params, bias, kfac_approx)
    if others and unsupported == "error":
        listing = ", ".join(f"{name!r} ({type(module).__name__})" for name, module, _ in others)
        raise ValueError(
            f"KFAC has no Kronecker rule for the parameters of {listing}. Leave them out of params, "
            "or pass unsupported='dense' or 'diagonal' for an exact block of their own."
        )
    if layers:
        KroneckerStatistics(model_data, loss, layers, fisher_type, kfac_approx, mc_samples, seed).collect()
    layout = _Layout(model_data.params)
    device = model_data.device
    entries = [entry for layer in layers for entry in _layer_blocks(layer, layout, device)]
    for name, module, chosen in others:
        exact = _exact_operator(fisher_type, model, loss_fn, data, chosen, mc_samples, seed)
        block = Dense(exact.to_dense()) if unsupported == "dense" else Diagonal(exact.diagonal())
        where = torch.cat([layout.indices(p, device) for p in chosen])
        entries.append((name or type(module).__name__, block, where))
    return _assemble(sorted(entries, key=lambda entry: int(entry[2].min())))


def _assemble(entries: list[tuple[str, CurvatureOperator, Tensor]]) -> CurvatureOperator:
    """``(label, block, flat indices)`` in order as one operator on the flat parameter vector.

    A block whose indices are a contiguous range (a layer's weight and bias next to each
    other in ``params``) is permuted within that range, so the result is a labelled
    ``BlockDiagonal``; otherwise the whole block-diagonal is permuted at once.
    """
    labels = [label for label, _, _ in entries]
    local = []
    for _, block, where in entries:
        start = int(where.min())
        if int(where.max()) - start + 1 != where.numel():  # the indices are distinct: not a range
            permutation = torch.cat([where for _, _, where in entries])
            return Permuted(BlockDiagonal([block for _, block, _ in entries], labels), permutation)
        in_order = bool((where[1:] > where[:-1]).all())
        local.append(block if in_order else Permuted(block, where - start))
    return BlockDiagonal(local, labels)


def _find_layers(
    model: nn.Module, params: list[nn.Parameter], bias: str, kfac_approx: str
) -> tuple[list[KroneckerLayer], list[tuple[str, nn.Module, list[nn.Parameter]]]]:
    """The supported layers holding chosen parameters, and the other modules that do."""
    owners = _owners(model)
    chosen = {id(p) for p in params}
    layers: dict[int, KroneckerLayer] = {}
    others: dict[int, tuple[str, nn.Module, list[nn.Parameter]]] = {}
    for p in params:
        places = owners[id(p)]
        if len(places) > 1:
            names = " and ".join(repr(f"{name}.{attribute}".lstrip(".")) for name, _, attribute in places)
            raise ValueError(
                f"One parameter is used as {names} (weight tying); KFAC needs one layer per parameter. "
                "Leave it out of params."
            )
        name, module, attribute = places[0]
        if isinstance(module, KRONECKER_LAYERS) and attribute in ("weight", "bias"):
            if id(module) not in layers:
                check_layer(name, module, kfac_approx)
                weight = module.weight if id(module.weight) in chosen else None
                module_bias = getattr(module, "bias", None)
                bias_param = module_bias if module_bias is not None and id(module_bias) in chosen else None
                joint = bias == "joint" and weight is not None and bias_param is not None
                layers[id(module)] = KroneckerLayer(name, module, weight, bias_param, joint)
        else:
            others.setdefault(id(module), (name, module, []))[2].append(p)
    return list(layers.values()), list(others.values())


def _layer_blocks(layer: KroneckerLayer, layout: _Layout, device: torch.device) -> list[tuple]:
    """``(label, block, flat indices)`` for a layer: its weight (with the bias if joint), its bias."""
    g, a = layer.output_factor, layer.input_factor
    name = layer.name or type(layer.module).__name__
    if isinstance(layer.module, nn.Embedding):
        return [(f"{name}.weight", Kronecker(a, g), layout.indices(layer.weight, device))]
    if layer.joint:
        return [(name, Kronecker(g, a), layout.joint(layer.weight, layer.bias, device))]
    blocks = []
    if layer.weight is not None:
        blocks.append((f"{name}.weight", Kronecker(g, a), layout.indices(layer.weight, device)))
    if layer.bias is not None:
        blocks.append((f"{name}.bias", Dense(g), layout.indices(layer.bias, device)))
    return blocks


def _exact_operator(
    fisher_type: str, model: nn.Module, loss_fn, data, params: list[nn.Parameter], mc_samples: int, seed: int
) -> CurvatureOperator:
    if fisher_type == "empirical":
        return EmpiricalFisher(model, loss_fn, data, params)
    if fisher_type == "mc":
        return FisherMC(model, loss_fn, data, params, mc_samples=mc_samples, seed=seed)
    return GGN(model, loss_fn, data, params)
