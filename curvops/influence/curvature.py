"""The damped curvature ``F + Λ`` of an influence computation, and its inverse.

Which curvature a name builds (over the mean training loss), which builder options
``curvature_options`` may set, the checks of a prebuilt operator, and the block dampings
``λ_b`` (a number, or ``"heuristic"``: ``HEURISTIC_FACTOR · tr(F_b) / dim(F_b)``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..linalg import BlockDiagonal, CurvatureOperator, Diagonal, Identity, block_layout
from ..linalg.checks import check_damping
from ..nn import ModelData, fisher
from ..nn.approximations import KRONECKER_APPROXIMATIONS
from ..nn.curvature import computation_copy, dense_operator
from ..nn.kfac import BUILDERS, kronecker_approximation
from ..nn.layers import find_layers
from ..nn.options import unsupported_error
from ..nn.shard_sums import Part
from ..nn.staleness import check_built_from, mark_built_from
from .examples import _Examples, _Losses

CURVATURES = (*KRONECKER_APPROXIMATIONS, "diagonal", "ggn", "identity")
"""The names :func:`influence_curvature` builds."""

FISHER_TYPES = tuple(name for name, kind in fisher.FISHER_TYPES.items() if kind.backward)
"""The Fisher types of the built curvatures: those of :mod:`curvops.nn.fisher` with output gradients."""

HEURISTIC_FACTOR = 0.1
"""``damping="heuristic"``: ``λ_b = HEURISTIC_FACTOR · tr(F_b) / dim(F_b)`` per block."""


Damping = float | str


OWN_ARGUMENTS = {
    "model": "model",
    "loss_fn": "loss_fn",
    "data": "train_data",
    "params": "params",
    "fisher_type": "fisher_type",
    "bias": "bias",
    "progressbar": "progressbar",
    "group": "group",
}
"""Builder arguments that the influence functions set from their own: builder name -> argument."""


def _builder(curvature: str, fisher_type: str) -> Callable | None:
    """The builder that ``curvature_options`` go to (``None``: the curvature has no builder)."""
    if curvature in KRONECKER_APPROXIMATIONS:
        return BUILDERS[curvature]
    if curvature == "ggn" or (curvature == "diagonal" and fisher_type != "empirical"):
        return fisher.FISHER_TYPES[fisher_type].exact
    return None


def _builder_options(builder: Callable | None) -> tuple[str, ...]:
    """The keyword arguments of ``builder`` that ``curvature_options`` may set."""
    if builder is None:
        return ()
    names = inspect.signature(builder).parameters
    return tuple(n for n in names if n not in OWN_ARGUMENTS and n != "eigenvalue_correction")


def _check_options(
    options: Mapping[str, Any] | None, curvature: str | CurvatureOperator, fisher_type: str
) -> dict[str, Any]:
    """``curvature_options`` as a dict, every key one the curvature's builder takes."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(
            f"curvature_options must be a dict of the curvature builder's keyword arguments, "
            f"got {type(options).__name__}."
        )
    options = dict(options)
    if not options:
        return options
    if isinstance(curvature, CurvatureOperator):
        raise ValueError(
            f"curvature_options {sorted(map(str, options))} apply to a named curvature, not to a prebuilt "
            "operator: pass them to the function that builds it."
        )
    builder = _builder(curvature, fisher_type)
    for key in options:
        _check_option(key, builder, f"curvature={curvature!r} with fisher_type={fisher_type!r}")
    return options


def _check_option(key: Any, builder: Callable | None, what: str) -> None:
    """Refuse a ``curvature_options`` key that ``builder`` (for the curvature ``what``) does not take."""
    if not isinstance(key, str):
        raise TypeError(f"curvature_options keys must be strings, got {key!r}.")
    if key in OWN_ARGUMENTS:
        raise ValueError(
            f"curvature_options[{key!r}] sets an argument of the influence function itself: "
            f"pass {OWN_ARGUMENTS[key]}= to it instead."
        )
    allowed = _builder_options(builder)
    if key not in allowed:
        takes = f"it takes {', '.join(allowed)}" if allowed else "it takes no curvature_options"
        source = f" (the options of {builder.__name__})" if builder is not None else ""
        raise ValueError(f"curvature_options[{key!r}] is not an option of {what}{source}; {takes}.")


def _check_supported(
    model: nn.Module, model_data: ModelData, curvature: str, bias: str, options: dict[str, Any]
) -> None:
    """Refuse parameters without a layer rule (``nn.PReLU``, ...) unless ``unsupported`` says how."""
    if curvature not in KRONECKER_APPROXIMATIONS or options.get("unsupported", "error") != "error":
        return
    _, others = find_layers(model, model_data.params, bias, options.get("kfac_approx", "expand"))
    if others:
        raise unsupported_error(
            f"curvature={curvature!r}",
            others,
            "Pass curvature_options={'unsupported': 'dense'} (or 'diagonal') for an exact block of their "
            "own, leave them out of params, or use curvature='ggn' or 'diagonal'.",
        )


def _build(
    model: nn.Module,
    losses: _Losses,
    train: _Examples,
    curvature: str,
    fisher_type: str,
    bias: str,
    params: Sequence[nn.Parameter] | None,
    progressbar: bool,
    batch_size: int,
    options: dict[str, Any],
    group: Any,
) -> CurvatureOperator:
    """The operator called ``curvature`` of the mean loss over the training data of every shard
    of ``group``, its builder given ``options`` (checked by :func:`_check_options`)."""
    model_data = train.model_data
    data, mean = model_data.checked_data("train_data curvature"), losses.mean
    if curvature == "identity":
        return Identity(model_data.size, model_data.dtype, model_data.device)
    if curvature in KRONECKER_APPROXIMATIONS:
        return kronecker_approximation(
            curvature,
            model,
            mean,
            data,
            params=params,
            fisher_type=fisher_type,
            bias=bias,
            progressbar=progressbar,
            group=group,
            **options,
        )
    if curvature == "diagonal" and fisher_type == "empirical":
        return _diagonal_blocks(_empirical_diagonal(train, batch_size), model_data)
    builder = fisher.FISHER_TYPES[fisher_type].exact
    if curvature == "ggn":
        model, params = computation_copy(model_data)
        exact = builder(model, mean, data, params=params, progressbar=progressbar, group=group, **options)
        return mark_built_from(dense_operator(exact, model_data.dtype), model_data)
    exact = builder(model, mean, data, params=params, progressbar=progressbar, group=group, **options)
    return _diagonal_blocks(exact.diagonal(), model_data)


def _empirical_diagonal(train: _Examples, batch_size: int) -> Tensor:
    """``diag((1/Z) Σ_n ∇ℓ_n ∇ℓ_n^T)`` from one pass of per-example gradients (the squares
    summed over the ranks)."""
    model_data = train.model_data

    def zeros() -> Part:
        return [torch.zeros(model_data.size, dtype=model_data.dtype, device=model_data.device)], []

    def local() -> Part:
        (squares,), _ = zeros()
        for block in train.columns(batch_size):
            squares = squares + block.square().sum(dim=1)
        return [squares], []

    (squares,), _ = train.union(local, zeros, "empirical Fisher diagonal")
    return squares / train.totals().terms


def _diagonal_blocks(diagonal: Tensor, model_data: ModelData) -> CurvatureOperator:
    """``diag(diagonal)`` as one :class:`~curvops.Diagonal` block per parameter tensor."""
    parts = diagonal.split([p.numel() for p in model_data.params])
    return mark_built_from(BlockDiagonal([Diagonal(part) for part in parts], model_data.names), model_data)


def _check_operator(op: CurvatureOperator, model_data: ModelData) -> None:
    """Refuse a prebuilt ``op`` of another model, size, dtype or device than the parameters."""
    check_built_from(op)
    if op.shape[0] != model_data.size:
        raise ValueError(
            f"The curvature operator has shape {op.shape}, but the parameters have D = {model_data.size} "
            f"entries ({len(model_data.params)} tensors); build it on the same parameters, in the same order."
        )
    if op.dtype != model_data.dtype or op.device != model_data.device:
        raise ValueError(
            f"The curvature operator is {op.dtype} on {op.device}, but the parameters are "
            f"{model_data.dtype} on {model_data.device}."
        )


def _check_damping(damping: Damping) -> Damping:
    """``damping``: a number ``λ >= 0`` or ``"heuristic"``."""
    if isinstance(damping, str):
        if damping != "heuristic":
            raise ValueError(f"damping must be a number >= 0 or 'heuristic', got {damping!r}.")
        return damping
    return check_damping(damping)


def _block_dampings(op: CurvatureOperator, damping: Damping) -> list[float]:
    """``λ_b`` for every block of ``op`` (see :mod:`curvops.influence`)."""
    blocks = block_layout(op).blocks
    if damping != "heuristic":
        return [float(damping)] * len(blocks)
    return [HEURISTIC_FACTOR * b.trace().item() / max(b.shape[0], 1) for b in blocks]


def _damped(op: CurvatureOperator, dampings: list[float], divide: float = 1.0) -> CurvatureOperator:
    """``op + Λ / divide``, block by block, keeping every block's structure (exact inverse)."""
    layout = block_layout(op)
    damped = [
        b + (lam / divide) * Identity(b.shape[0], b.dtype, b.device)
        for b, lam in zip(layout.blocks, dampings, strict=True)
    ]
    return layout.assemble(damped)


def _inverse(damped: CurvatureOperator, op: CurvatureOperator) -> CurvatureOperator:
    """``damped^-1``: exact through the structure, or CG for a matrix-free model operator."""
    return damped.inverse(method="cg" if op.matrix_free else "exact")
