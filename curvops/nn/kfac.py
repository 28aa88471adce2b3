"""KFAC, EKFAC and TKFAC: Kronecker-factored approximations of a model's Fisher / GGN as
structured operators, built from the statistics of :mod:`curvops.nn.kronecker_statistics`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..linalg import (
    BlockDiagonal,
    Cast,
    CurvatureOperator,
    Dense,
    Diagonal,
    Kronecker,
    KroneckerEigen,
    Permuted,
    spectral,
)
from ..linalg.checks import check_bool, check_choice, check_positive_int, check_seed
from .curvature import GGN, EmpiricalFisher, FisherMC, computation_copy, dense_operator
from .kronecker_statistics import (
    CORRECTIONS,
    FISHER_TYPES,
    KFAC_APPROXIMATIONS,
    KRONECKER_LAYERS,
    KroneckerLayer,
    KroneckerStatistics,
    check_layer,
)
from .losses import LossAdapter
from .model import ModelData, mark_built_from

UNSUPPORTED_OPTIONS = ("error", "dense", "diagonal")
OPAQUE_MODULES = {
    nn.MultiheadAttention: "it uses its out_proj weight without calling the out_proj module",
}
"""Modules that use their submodules' weights without calling them (so no layer hook sees
those uses): all their parameters are unsupported, with the reason shown in errors."""


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """For every parameter, the ``(module name, module, attribute)`` places that hold it."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attribute, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((name, module, attribute))
    return owners


class Layout:
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

    Precision: the statistics are accumulated in at least float32 and the factors decomposed in
    float64; for a bfloat16 or float16 model every block is a :class:`~curvops.linalg.Cast` of
    its float32 operator, so products (and the inverse's) take and give the model's dtype while
    the eigenvalues keep float32's resolution (see ``docs/conventions.rst``, "Precision").

    Args:
        model: the network.
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``
            (``"forward-only"`` takes any loss).
        data: a re-iterable of ``(X, y)`` batches, or one pair ``(X, y)`` with a tensor ``X``;
            statistics take one pass over it.
        params: the parameters, trainable or frozen, a list or a dict of them (default: the
            model's trainable ones, in order).
        fisher_type: ``"type-2"`` (KFAC of the GGN), ``"mc"``, ``"empirical"`` or
            ``"forward-only"`` (``G = I``).
        mc_samples: labels drawn per datum for ``"mc"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` for layers shared over positions.
        seed: seed of the ``"mc"`` label draws.
        progressbar: a tqdm bar on the pass over the data.
        bias: ``"separate"`` (a ``G`` block of its own) or ``"joint"`` (one block ``G ⊗ A`` with
            a constant 1 appended to the inputs) for layers whose weight and bias are both in
            ``params``.
        unsupported: what to do with parameters of other modules (LayerNorm, BatchNorm,
            ``nn.MultiheadAttention`` with its ``out_proj``, ...): ``"error"``, or an exact
            ``"dense"`` or ``"diagonal"`` block per module from the
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
    return _build("kfac", "auto", **locals())


def EKFAC(
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
    correction: str = "auto",
) -> CurvatureOperator:
    """EKFAC (George et al. 2018): KFAC's eigenbasis with corrected eigenvalues.

    Per layer, with the KFAC factors ``G = Q_G diag(γ) Q_G^T`` and ``A = Q_A diag(α) Q_A^T``,
    the block is ``(Q_G ⊗ Q_A) diag(s) (Q_G ⊗ Q_A)^T`` with
    ``s = (1/Z) Σ_n Σ_c ((Q_G ⊗ Q_A)^T vec(∇_W ℓ_nc))²`` over every datum's gradient
    ``∇_W ℓ_nc = Σ_s g_nsc a_ns^T`` (summed over positions, columns ``c`` as for ``fisher_type``):
    the diagonal of the true block in KFAC's eigenbasis, so EKFAC is never farther from the
    true block (Frobenius) than KFAC. A :class:`~curvops.KroneckerEigen` per block, so the
    damped inverse and logdet are exact from ``s + λ``. Two passes over the data: KFAC's
    statistics, then the correction. The other arguments are :func:`~curvops.KFAC`'s
    (``fisher_type="forward-only"`` has no gradients to correct with and is refused).

    Args:
        correction: ``"per-example"`` (rotate every datum's gradient: memory ``K·N·n_out·n_in``
            per batch), ``"gramian"`` (contract rotated Gramians over positions: memory
            ``N·S²·(n_out + n_in)``) or ``"auto"`` (the smaller, per layer and batch). Both give
            the same ``s``. An ``nn.Embedding`` sums its gradient rows by index instead.

    Example:
        >>> layers = [torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)]
        >>> model = torch.nn.Sequential(*layers).double()
        >>> data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
        >>> ekfac = curvops.EKFAC(model, torch.nn.CrossEntropyLoss(), data, fisher_type="type-2")
        >>> type(ekfac.block("0.weight")).__name__
        'KroneckerEigen'
    """
    return _build("ekfac", **locals())


def TKFAC(
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
    eigenvalue_correction: bool = False,
    correction: str = "auto",
) -> CurvatureOperator:
    """TKFAC (Gao et al., AAAI 2021): a trace-restricted Kronecker factorisation.

    Per layer ``F ≈ δ Ψ ⊗ Φ`` (output factor first, as everywhere in curvops) with
    ``Φ ∝ Σ tr(g g^T) a a^T`` and ``Ψ ∝ Σ tr(a a^T) g g^T`` over data, positions (as
    ``kfac_approx`` says) and output-space columns, normalised to ``tr Φ = tr Ψ = 1``, and
    ``δ = (1/Z) Σ_n Σ_c ‖∇_W ℓ_nc‖_F²`` is the true block's trace, also under weight sharing
    (the per-datum gradients' norms come from position Gramians). A separate bias's block
    is KFAC's ``G`` scaled to its true trace. One pass over the data, like KFAC.

    With ``eigenvalue_correction=True`` this is TEKFAC (arXiv 2011.13609): EKFAC's corrected
    eigenvalues in TKFAC's eigenbasis ``Q_Ψ ⊗ Q_Φ`` (a second pass; ``correction`` as for
    :func:`~curvops.EKFAC`), never farther from the true block than TKFAC.

    The other arguments are :func:`~curvops.KFAC`'s (``"forward-only"`` is refused).

    Example:
        >>> layers = [torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)]
        >>> model = torch.nn.Sequential(*layers).double()
        >>> data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
        >>> tkfac = curvops.TKFAC(model, torch.nn.CrossEntropyLoss(), data, fisher_type="type-2")
        >>> block = tkfac.block("0.weight")
        >>> round(block.factors[1].trace().item(), 6)  # tr Φ
        1.0
    """
    arguments = locals()
    corrected = check_bool(arguments.pop("eigenvalue_correction"), "eigenvalue_correction")
    approximation = "tekfac" if corrected else "tkfac"
    return _build(approximation, **arguments)


KRONECKER_APPROXIMATIONS = ("kfac", "ekfac", "tkfac", "tekfac")


def kronecker_approximation(
    name: str, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], data: Iterable, **options: Any
) -> CurvatureOperator:
    """:func:`KFAC`, :func:`EKFAC`, :func:`TKFAC` or TEKFAC (``TKFAC(eigenvalue_correction=True)``)
    by name, for code that lets its users choose one; ``options`` go to the builder.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
        >>> data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
        >>> op = kronecker_approximation("tekfac", model, torch.nn.CrossEntropyLoss(), data)
        >>> type(op.block("0.weight")).__name__
        'KroneckerEigen'
    """
    check_choice(name, KRONECKER_APPROXIMATIONS, "Kronecker approximation")
    if name in ("tkfac", "tekfac"):
        return TKFAC(model, loss_fn, data, eigenvalue_correction=name == "tekfac", **options)
    return (KFAC if name == "kfac" else EKFAC)(model, loss_fn, data, **options)


def _build(
    approximation: str,
    correction: str,
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: Iterable,
    params: Sequence[nn.Parameter] | None,
    fisher_type: str,
    mc_samples: int,
    kfac_approx: str,
    seed: int,
    progressbar: bool,
    bias: str,
    unsupported: str,
    check_deterministic: bool,
) -> CurvatureOperator:
    """KFAC, EKFAC, TKFAC or TEKFAC: statistics, then one labelled block per layer parameter."""
    name = approximation.upper()
    check_choice(fisher_type, FISHER_TYPES, "fisher_type")
    check_choice(kfac_approx, KFAC_APPROXIMATIONS, "kfac_approx")
    check_choice(bias, ("separate", "joint"), "bias")
    check_choice(unsupported, UNSUPPORTED_OPTIONS, "unsupported")
    check_choice(correction, CORRECTIONS, "correction")
    check_positive_int(mc_samples, "mc_samples")
    check_seed(seed)
    if approximation != "kfac" and fisher_type == "forward-only":
        raise ValueError(f"{name} needs output gradients; fisher_type='forward-only' has none.")
    loss = LossAdapter(loss_fn, likelihood=fisher_type != "forward-only", what=f"{name}({fisher_type!r})")
    if fisher_type in ("type-2", "mc"):
        loss.check_sampling(f"{name}({fisher_type!r})")
    model_data = ModelData(model, data, params, progressbar, check_deterministic)
    layers, others = find_layers(model, model_data.params, bias, kfac_approx)
    if others and unsupported == "error":
        listing = ", ".join(f"{module_name!r} ({type(module).__name__})" for module_name, module, _ in others)
        reasons = "".join(
            f" nn.{kind.__name__} is not supported yet by KFAC: {reason}."
            for kind, reason in OPAQUE_MODULES.items()
            if any(isinstance(module, kind) for _, module, _ in others)
        )
        raise ValueError(
            f"{name} has no Kronecker rule for the parameters of {listing}.{reasons} Leave them out of "
            "params, or pass unsupported='dense' or 'diagonal' for an exact block of their own."
        )
    blocks: list[list[CurvatureOperator]] = []
    if layers:
        statistics = KroneckerStatistics(model_data, loss, layers, fisher_type, kfac_approx, mc_samples, seed)
        statistics.collect(trace_restricted=approximation in ("tkfac", "tekfac"))
        if approximation in ("ekfac", "tekfac"):
            bases = [eigenbasis(layer, approximation)[0] for layer in layers]
            corrected = statistics.corrections(bases, correction)
            blocks = [
                corrected_blocks(layer, basis, s)
                for layer, basis, s in zip(layers, bases, corrected, strict=True)
            ]
        else:
            blocks = [kronecker_blocks(layer, approximation) for layer in layers]
    layout = Layout(model_data.params)
    device = model_data.device
    entries = [
        entry
        for layer, layer_blocks in zip(layers, blocks, strict=True)
        for entry in place(layer, layer_blocks, layout, device)
    ]
    if others:  # exact blocks from the model in its computation dtype (a float32 copy of a bf16 one)
        exact_model, exact_params = computation_copy(model_data)
        twin = {id(p): q for p, q in zip(model_data.params, exact_params, strict=True)}
    for module_name, module, chosen in others:
        checked = model_data.checked_data(f"{name} exact block of {module_name!r}")
        chosen_twins = [twin[id(p)] for p in chosen]
        exact = _exact_operator(fisher_type, exact_model, loss_fn, checked, chosen_twins, mc_samples, seed)
        block = dense_operator(exact) if unsupported == "dense" else Diagonal(exact.diagonal())
        where = torch.cat([layout.indices(p, device) for p in chosen])
        entries.append((module_name or type(module).__name__, block, where))
    op = assemble(sorted(entries, key=lambda entry: int(entry[2].min())), model_data.dtype)
    return mark_built_from(op, model_data)


def assemble(
    entries: list[tuple[str, CurvatureOperator, Tensor]], dtype: torch.dtype | None = None
) -> CurvatureOperator:
    """``(label, block, flat indices)`` in order as one operator on the flat parameter vector.

    A block whose indices are a contiguous range (a layer's weight and bias next to each
    other in ``params``) is permuted within that range, so the result is a labelled
    ``BlockDiagonal``; otherwise the whole block-diagonal is permuted at once. With ``dtype``
    (the model's) every block of another dtype (float32 statistics of a bf16 model) becomes a
    :class:`~curvops.linalg.Cast` to it: the precision policy.
    """
    if dtype is not None:
        entries = [(label, _in_dtype(block, dtype), where) for label, block, where in entries]
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


def _in_dtype(block: CurvatureOperator, dtype: torch.dtype) -> CurvatureOperator:
    return block if block.dtype == dtype else Cast(block, dtype)


def find_layers(
    model: nn.Module, params: list[nn.Parameter], bias: str, kfac_approx: str
) -> tuple[list[KroneckerLayer], list[tuple[str, nn.Module, list[nn.Parameter]]]]:
    """The supported layers holding chosen parameters, and the other modules that do (a
    module of :data:`OPAQUE_MODULES` stands for all the parameters inside it)."""
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
            names = " and ".join(repr(f"{name}.{attribute}".lstrip(".")) for name, _, attribute in places)
            raise ValueError(
                f"One parameter is used as {names} (weight tying); KFAC needs one layer per parameter. "
                "Leave it out of params."
            )
        name, module, attribute = places[0]
        if id(module) in opaque:
            name, module = opaque[id(module)]
            others.setdefault(id(module), (name, module, []))[2].append(p)
        elif isinstance(module, KRONECKER_LAYERS) and attribute in ("weight", "bias"):
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


def kronecker_blocks(layer: KroneckerLayer, approximation: str) -> list[CurvatureOperator]:
    """KFAC's or TKFAC's blocks of a layer: weight (with a joint bias) first, then a separate bias."""
    g, a = layer.output_factor, layer.input_factor
    trace_restricted = approximation == "tkfac"
    if trace_restricted:
        weight_output, weight_input = layer.trace * layer.trace_output_factor, layer.trace_input_factor
    else:
        weight_output, weight_input = g, a
    factors = (weight_input, weight_output) if layer.embedding else (weight_output, weight_input)
    blocks = [Kronecker(*factors)] if layer.weight is not None else []
    if layer.bias is not None and not layer.joint:
        blocks.append(Dense(g * (layer.bias_trace / g.trace()) if trace_restricted else g))
    return blocks


def eigenbasis(
    layer: KroneckerLayer, approximation: str
) -> tuple[tuple[Tensor, Tensor | None, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """``(Q_out, Q_in, Q_bias)``, the eigenvectors of the factors the uncorrected blocks use, and
    their eigenvalues ``(e_out, e_in, e_bias)`` in the same order.

    EKFAC: KFAC's ``G`` and ``A``; TEKFAC: TKFAC's ``Ψ`` and ``Φ``. A separate bias's block is
    ``G`` in both, so its basis is ``G``'s. An embedding's diagonal input factor has ``Q_in =
    None`` (the identity) and is its own ``e_in``.
    """

    def decompose(factor: Tensor) -> tuple[Tensor, Tensor | None]:
        return (factor, None) if layer.embedding and factor.ndim == 1 else spectral.eigh(factor)

    e_bias, q_bias = spectral.eigh(layer.output_factor)
    if approximation == "ekfac":
        e_in, q_in = decompose(layer.input_factor)
        return (q_bias, q_in, q_bias), (e_bias, e_in, e_bias)
    e_in, q_in = decompose(layer.trace_input_factor)
    e_out, q_out = spectral.eigh(layer.trace_output_factor)
    return (q_out, q_in, q_bias), (e_out, e_in, e_bias)


def corrected_blocks(
    layer: KroneckerLayer,
    basis: tuple[Tensor, Tensor | None, Tensor],
    corrected: tuple[Tensor | None, Tensor | None],
) -> list[CurvatureOperator]:
    """EKFAC's blocks of a layer: ``KroneckerEigen`` in the basis with the corrected eigenvalues."""
    (q_out, q_in, q_bias), (weight, bias) = basis, corrected
    blocks = []
    if weight is not None:
        bases = [None, q_out] if layer.embedding else [q_out, q_in]
        blocks.append(KroneckerEigen(bases, weight))
    if bias is not None:
        blocks.append(KroneckerEigen([q_bias], bias))
    return blocks


def place(
    layer: KroneckerLayer, blocks: list[CurvatureOperator], layout: Layout, device: torch.device
) -> list[tuple[str, CurvatureOperator, Tensor]]:
    """``(label, block, flat indices)`` for a layer's blocks (weight, or weight+bias if joint; bias)."""
    name = layer.name or type(layer.module).__name__
    if layer.joint:
        return [(name, blocks[0], layout.joint(layer.weight, layer.bias, device))]
    params = [(kind, p) for kind, p in (("weight", layer.weight), ("bias", layer.bias)) if p is not None]
    return [
        (f"{name}.{kind}", block, layout.indices(p, device))
        for (kind, p), block in zip(params, blocks, strict=True)
    ]


def _exact_operator(
    fisher_type: str, model: nn.Module, loss_fn, data, params: list[nn.Parameter], mc_samples: int, seed: int
) -> CurvatureOperator:
    if fisher_type == "empirical":
        return EmpiricalFisher(model, loss_fn, data, params)
    if fisher_type == "mc":
        return FisherMC(model, loss_fn, data, params, mc_samples=mc_samples, seed=seed)
    return GGN(model, loss_fn, data, params)
