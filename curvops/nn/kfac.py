"""KFAC, EKFAC and TKFAC: Kronecker-factored approximations of a model's Fisher / GGN as
structured operators, built from the statistics of :mod:`curvops.nn.kronecker_pass` by the
approximation objects of :mod:`curvops.nn.approximations`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import Shards, decompose_blocks
from ..linalg import CurvatureOperator, Diagonal
from ..linalg.checks import check_bool, check_choice
from ..linalg.spectral import check_decomposition_dtype
from .assembly import Entry, Layout, assemble
from .curvature import computation_copy, dense_operator
from .kronecker_pass import KroneckerPass
from .layers import KroneckerLayer, find_layers
from .model import ModelData
from .options import UNSUPPORTED_FIX, UNSUPPORTED_OPTIONS, KroneckerOptions, unsupported_error
from .staleness import mark_built_from
from .tied import check_ties, merged_ties


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
    group: Any = None,
    decomposition_dtype: torch.dtype | None = None,
) -> CurvatureOperator:
    """KFAC of the Fisher / GGN of ``loss_fn`` over ``data``, as a structured operator.

    Per supported layer (``nn.Linear`` with any leading axes, ``nn.Conv1d``, ``nn.Conv2d``,
    ``nn.Conv3d`` with any ``padding_mode`` and any ``groups``, ``nn.Embedding``, and
    ``nn.MultiheadAttention``'s input projection and ``out_proj``, each a linear layer shared over
    the tokens, see :mod:`curvops.nn.layers.attention`) the block of
    its weight is ``G ⊗ A`` (a grouped convolution's, depthwise included, is a
    :class:`~curvops.linalg.GroupedKronecker`: one ``G_j ⊗ A_j`` per group ``j``, from that
    group's input channels and output gradients; likewise its bias's ``G_j``; see
    :mod:`curvops.nn.layers.rule` for ``A``, ``G`` and ``kfac_approx``, :mod:`curvops.nn.fisher`
    for ``fisher_type``); an embedding's block is ``A ⊗ G`` with a diagonal ``A`` (its weight is
    ``[num_embeddings, dim]``). The normalization layers (``nn.LayerNorm``, ``nn.RMSNorm``,
    ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d`` in eval mode) get the exact block of their affine
    parameters for ``fisher_type`` (its diagonal for more than 2048 of them), from the same pass
    (:mod:`curvops.nn.layers.norm`; EKFAC and TKFAC give the same block). A module called several
    times in the forward pass shares its weight over its calls as over positions
    (:mod:`curvops.nn.layers.rule`); a weight tied between layers (an embedding and the output
    head) gets the nearest Kronecker product to the sum of its uses' blocks
    (:mod:`curvops.nn.tied`; KFAC only). The operator is
    block-diagonal over layers, in the order and layout of ``params`` — the same matrix
    convention as :class:`~curvops.GGN` (the loss over the whole data set as its reduction
    defines it, independent of batching) — so
    ``inverse``, ``logdet``, ``det`` and ``trace`` are exact through the Kronecker factors,
    and ``inverse(damping, factored=True)`` gives the π-damped inverse. It is a snapshot: its
    factors are tensors, with a ``state_dict``. The result is a :class:`~curvops.BlockDiagonal`
    labelled by parameter (``"fc.weight"``, ``"fc.bias"``) or, for a joint bias, by layer
    (``"fc"``, a :class:`~curvops.Permuted` Kronecker block from ``vec([W b])`` to
    ``[vec W, b]``); only a ``params`` order that splits a layer's weight from its bias
    wraps the whole operator in one ``Permuted``.

    Padding: targets equal to ``ignore_index`` are no loss terms and enter no factor. A layer
    whose positions ``[N, S]`` line up with the targets (``N·S`` of them: a token-wise layer
    with targets ``[N, S]``, or ``[N·S]`` for a model ending in ``output.flatten(0, -2)``) leaves
    out its positions of ignored targets; any other layer (a convolution before pooling, a
    layer after a sequence reduction) leaves out the data whose targets are all ignored (see
    :mod:`curvops.nn.layers.rule`). The same holds for EKFAC's corrections and TKFAC's traces.

    Precision: the statistics are accumulated in at least float32 and the factors decomposed in
    ``decomposition_dtype`` (float64 by default; float32 with a float64 fallback per factor); for a
    bfloat16 or float16 model every block is a :class:`~curvops.linalg.Cast` of
    its float32 operator, so products (and the inverse's) take and give the model's dtype while
    the eigenvalues keep float32's resolution (see ``docs/conventions.rst``, "Precision").

    Args:
        model: the network.
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss`` for
            ``"mc"`` (unweighted, unsmoothed) and ``"empirical"``; ``"type-2"`` takes these with
            class weights, ``pos_weight`` and label smoothing (closed forms), and any other loss
            convex and twice differentiable in the outputs that sums or averages per-datum
            terms (per-datum Hessians by autodiff, rows of at most 1024 numbers; a loss with
            negative curvature is refused); ``"forward-only"`` takes any loss.
        data: a re-iterable of ``(X, y)`` batches, or one pair ``(X, y)`` with a tensor ``X``
            (mappings: :func:`~curvops.nn.mapping_batches`); statistics take one pass over it.
        params: the parameters, trainable or frozen, a list or a dict of them (default: the
            model's trainable ones, in order).
        fisher_type: ``"type-2"`` (KFAC of the GGN), ``"mc"``, ``"empirical"`` or
            ``"forward-only"`` (``G = I``; a normalization layer's block is ``I``).
        mc_samples: labels drawn per datum for ``"mc"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` for layers shared over positions.
        seed: seed of the ``"mc"`` label draws (over several ranks, each draws its shard's
            labels with a seed of its own from it, :meth:`~curvops.distributed.Shards.seed`; rank
            0 with ``seed`` itself).
        progressbar: a tqdm bar on the pass over the data.
        bias: ``"separate"`` (a ``G`` block of its own) or ``"joint"`` (one block ``G ⊗ A`` with
            a constant 1 appended to the inputs) for layers whose weight and bias are both in
            ``params``; for a normalization layer one exact block per parameter, or one over
            ``[γ; β]`` with their cross terms.
        unsupported: what to do with parameters of modules without a rule
            (an attention's ``bias_k``/``bias_v``, ``nn.PReLU``, ...): ``"error"``, or an exact
            ``"dense"`` or ``"diagonal"`` block per module from the
            exact operator of the same ``fisher_type`` (GGN for ``"type-2"`` and
            ``"forward-only"``).
        check_deterministic: raise when the data or outputs differ between passes.
        group: the process group whose ranks hold shards of ``data`` (``None``: the default
            group when torch.distributed is initialized); ``"local"`` keeps this process's data
            alone (:mod:`curvops.distributed`). Every rank gets the operator of the union of the
            shards; a rank's shard may be empty.
        decomposition_dtype: the dtype of the factors' eigendecompositions (each factor is
            decomposed once, lazily, and shared by the blocks that hold it: a layer's ``G``
            serves its weight and bias blocks): ``torch.float64``, or ``torch.float32`` (half
            the memory of ``eigh``, about twice as fast) where a factor whose float32 ``eigh``
            fails or is inaccurate is recomputed in float64 (:func:`curvops.linalg.spectral.eigh`).
            ``None`` (default): float64 here and for TKFAC; for EKFAC and TEKFAC, which use
            only the eigenbasis, the factors' own dtype (float32 for a float32, bfloat16 or
            float16 model). With
            more than one rank the builder decomposes every factor, each on one rank
            (:func:`curvops.distributed.decompose_blocks`), so ``inverse`` and ``logdet`` cost
            no ``eigh`` afterwards.

    Example:
        >>> layers = [torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)]
        >>> model = torch.nn.Sequential(*layers).double()
        >>> data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
        >>> kfac = curvops.KFAC(model, torch.nn.CrossEntropyLoss(), data, fisher_type="type-2")
        >>> kfac.shape, type(kfac).__name__
        ((26, 26), 'BlockDiagonal')
        >>> step = kfac.inverse(damping=1e-3) @ torch.ones(26, dtype=torch.float64)
    """
    options = KroneckerOptions.checked("kfac", fisher_type, kfac_approx, bias, mc_samples, seed)
    return _build(
        options,
        model,
        loss_fn,
        data,
        params,
        progressbar,
        unsupported,
        check_deterministic,
        group,
        decomposition_dtype,
    )


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
    group: Any = None,
    decomposition_dtype: torch.dtype | None = None,
) -> CurvatureOperator:
    """EKFAC (George et al. 2018): KFAC's eigenbasis with corrected eigenvalues.

    Per layer, with the KFAC factors ``G = Q_G diag(γ) Q_G^T`` and ``A = Q_A diag(α) Q_A^T``,
    the block is ``(Q_G ⊗ Q_A) diag(s) (Q_G ⊗ Q_A)^T`` with
    ``s = (1/Z) Σ_n Σ_c ((Q_G ⊗ Q_A)^T vec(∇_W ℓ_nc))²`` over every datum's gradient
    ``∇_W ℓ_nc = Σ_s g_nsc a_ns^T`` (summed over positions, columns ``c`` as for ``fisher_type``):
    the diagonal of the true block in KFAC's eigenbasis, so EKFAC is never farther from the
    true block (Frobenius) than KFAC. A :class:`~curvops.KroneckerEigen` per block, so the
    damped inverse and logdet are exact from ``s + λ``. KFAC's statistics pass over the data
    keeps the layer inputs and output gradients for the correction where they fit in
    :data:`~curvops.nn.kronecker_pass.CORRECTION_CACHE_BYTES` (256 MiB): one pass; larger data
    is passed over twice, and must then be the same both times (a fixed loader for ``"mc"``,
    whose labels are drawn per batch). The other arguments are :func:`~curvops.KFAC`'s
    (``fisher_type="forward-only"`` has no gradients to correct with and is refused).

    Args:
        correction: ``"per-example"`` (rotate every datum's gradient: memory ``K·N·n_out·n_in``
            per batch), ``"gramian"`` (contract rotated Gramians over positions: memory
            ``N·S²·(n_out + n_in)``) or ``"auto"`` (the smaller, per layer and batch). Both give
            the same ``s``. An ``nn.Embedding`` sums its gradient rows by index instead.
        decomposition_dtype: as for :func:`~curvops.KFAC`; the eigenbases are computed (spread
            over the ranks of a process group) before the correcting pass.
        group: the process group whose ranks hold shards of ``data`` (``None``: the default
            group when torch.distributed is initialized); ``"local"`` keeps this process's data
            alone (:mod:`curvops.distributed`). Every rank gets the operator of the union of the
            shards; a rank's shard may be empty.

    Example:
        >>> layers = [torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)]
        >>> model = torch.nn.Sequential(*layers).double()
        >>> data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
        >>> ekfac = curvops.EKFAC(model, torch.nn.CrossEntropyLoss(), data, fisher_type="type-2")
        >>> type(ekfac.block("0.weight")).__name__
        'KroneckerEigen'
    """
    options = KroneckerOptions.checked("ekfac", fisher_type, kfac_approx, bias, mc_samples, seed, correction)
    return _build(
        options,
        model,
        loss_fn,
        data,
        params,
        progressbar,
        unsupported,
        check_deterministic,
        group,
        decomposition_dtype,
    )


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
    group: Any = None,
    decomposition_dtype: torch.dtype | None = None,
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

    The other arguments are :func:`~curvops.KFAC`'s (``"forward-only"`` is refused), and
    ``decomposition_dtype`` is as for :func:`~curvops.KFAC`.

    Args:
        group: the process group whose ranks hold shards of ``data`` (``None``: the default
            group when torch.distributed is initialized); ``"local"`` keeps this process's data
            alone (:mod:`curvops.distributed`). Every rank gets the operator of the union of the
            shards; a rank's shard may be empty.

    Example:
        >>> layers = [torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)]
        >>> model = torch.nn.Sequential(*layers).double()
        >>> data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
        >>> tkfac = curvops.TKFAC(model, torch.nn.CrossEntropyLoss(), data, fisher_type="type-2")
        >>> block = tkfac.block("0.weight")
        >>> round(block.factors[1].trace().item(), 6)  # tr Φ
        1.0
    """
    name = "tekfac" if check_bool(eigenvalue_correction, "eigenvalue_correction") else "tkfac"
    options = KroneckerOptions.checked(name, fisher_type, kfac_approx, bias, mc_samples, seed, correction)
    return _build(
        options,
        model,
        loss_fn,
        data,
        params,
        progressbar,
        unsupported,
        check_deterministic,
        group,
        decomposition_dtype,
    )


BUILDERS = {"kfac": KFAC, "ekfac": EKFAC, "tkfac": TKFAC, "tekfac": TKFAC}
"""The public builder of each Kronecker approximation (TEKFAC is ``TKFAC(eigenvalue_correction=True)``)."""


def kronecker_approximation(
    name: str,
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: Iterable,
    group: Any = None,
    **options: Any,
) -> CurvatureOperator:
    """:func:`KFAC`, :func:`EKFAC`, :func:`TKFAC` or TEKFAC (``TKFAC(eigenvalue_correction=True)``)
    by name, for code that lets its users choose one; ``options`` go to the builder.

    Args:
        group: the process group whose ranks hold shards of ``data`` (``None``: the default
            group when torch.distributed is initialized); ``"local"`` keeps this process's data
            alone (:mod:`curvops.distributed`). Every rank gets the operator of the union of the
            shards; a rank's shard may be empty.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
        >>> data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
        >>> op = kronecker_approximation("tekfac", model, torch.nn.CrossEntropyLoss(), data)
        >>> type(op.block("0.weight")).__name__
        'KroneckerEigen'
    """
    check_choice(name, tuple(BUILDERS), "Kronecker approximation")
    if name in ("tkfac", "tekfac"):
        options = {"eigenvalue_correction": name == "tekfac", **options}
    return BUILDERS[name](model, loss_fn, data, group=group, **options)


def _build(
    options: KroneckerOptions,
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: Iterable,
    params: Sequence[nn.Parameter] | None,
    progressbar: bool,
    unsupported: str,
    check_deterministic: bool,
    group: Any,
    decomposition_dtype: torch.dtype | None = None,
) -> CurvatureOperator:
    """One labelled block per layer parameter from the statistics of the union of ``group``'s
    shards, and exact blocks for the rest."""
    check_choice(unsupported, UNSUPPORTED_OPTIONS, "unsupported")
    if decomposition_dtype is not None:
        check_decomposition_dtype(decomposition_dtype)
    shards = Shards.of(group)
    loss = options.loss(loss_fn)
    model_data = ModelData(model, data, params, progressbar, check_deterministic, allow_empty=shards.active)
    if decomposition_dtype is None:
        decomposition_dtype = options.approximation.default_decomposition_dtype(model_data.dtype)
    layers, others = find_layers(model, model_data.params, options.bias, options.kfac_approx)
    if others and unsupported == "error":
        raise unsupported_error(options.approximation.label, others, UNSUPPORTED_FIX)
    check_ties(layers, options.approximation)
    layout, device = Layout(model_data.params), model_data.device
    entries: list[Entry] = []
    if layers:
        pairs = _kronecker_blocks(  # attention follows its call
            options, model_data, loss, layers, shards, decomposition_dtype
        )
        layers = [layer for layer, _ in pairs]
        blocks = merged_ties(layers, [layer_blocks for _, layer_blocks in pairs])
        for layer, layer_blocks in zip(layers, blocks, strict=True):
            entries += layout.place(layer, layer_blocks, device)
    if others:
        entries += _exact_blocks(options, model_data, loss_fn, others, unsupported, layout, group)
    return mark_built_from(assemble(entries, model_data.dtype), model_data)


def _kronecker_blocks(
    options: KroneckerOptions,
    model_data: ModelData,
    loss,
    layers: list,
    shards: Shards | None = None,
    decomposition_dtype: torch.dtype = torch.float64,
) -> list[tuple[KroneckerLayer, list[CurvatureOperator]]]:
    """Each layer and its blocks: one statistics pass over ``shards`` (``None``: this process
    alone; the layers of an attention module follow its first call), and for EKFAC/TEKFAC a
    correcting one (for the layers it corrects: not those with exact blocks) in the eigenbases
    of the factors, decomposed first, spread over the ranks
    (:func:`~curvops.distributed.decompose_blocks`). KFAC's and TKFAC's factors are decomposed
    here only with more than one rank (``shards.active``): every factor once, spread, so the
    operator's ``inverse`` and ``logdet`` are free afterwards; alone they are decomposed
    lazily, by the first ``inverse`` or ``logdet``."""
    approximation = options.approximation
    shards = shards or Shards()
    passes = KroneckerPass(model_data, loss, layers, options, shards)
    statistics = passes.statistics()
    blocks = [approximation.kronecker_blocks(s, decomposition_dtype) for s in statistics]
    corrects = [approximation.corrects(s.layer) for s in statistics]
    decompose_blocks(
        [b for bs, c in zip(blocks, corrects, strict=True) if c or shards.active for b in bs], shards
    )
    if not any(corrects):
        return [(s.layer, layer_blocks) for s, layer_blocks in zip(statistics, blocks, strict=True)]
    bases = [
        approximation.eigenbasis(s, layer_blocks)[0] if c else None
        for s, layer_blocks, c in zip(statistics, blocks, corrects, strict=True)
    ]
    corrections = passes.corrections(bases)
    return [
        (s.layer, layer_blocks if basis is None else approximation.corrected_blocks(s.layer, basis, c))
        for s, layer_blocks, basis, c in zip(statistics, blocks, bases, corrections, strict=True)
    ]


def _exact_blocks(
    options: KroneckerOptions,
    model_data: ModelData,
    loss_fn,
    others: list,
    unsupported: str,
    layout: Layout,
    group: Any,
) -> list[Entry]:
    """Exact dense or diagonal blocks of the modules without a Kronecker rule, from the exact
    operator of the Fisher type on the model in its computation dtype (a float32 copy of a bf16 one),
    over ``group``'s shards."""
    exact_model, exact_params = computation_copy(model_data)
    twin = {id(p): q for p, q in zip(model_data.params, exact_params, strict=True)}
    entries = []
    for module_name, module, chosen in others:
        checked = model_data.checked_data(f"{options.approximation.label} exact block of {module_name!r}")
        exact = options.fisher.exact_operator(
            exact_model,
            loss_fn,
            checked,
            [twin[id(p)] for p in chosen],
            options.mc_samples,
            options.seed,
            group=group,
        )
        block = dense_operator(exact) if unsupported == "dense" else Diagonal(exact.diagonal())
        where = torch.cat([layout.indices(p, model_data.device) for p in chosen])
        entries.append((module_name or type(module).__name__, block, where))
    return entries
