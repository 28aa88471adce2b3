"""Influence functions: how much each training example helps or hurts the loss on a query.

For a training example ``n`` and a query example ``t`` (any labelled input, e.g. a test
point), the influence score is

``score(t, n) = ∇ℓ_t^T (F + Λ)^-1 ∇ℓ_n``

with

- ``ℓ_n`` the loss of datum ``n`` on its own: a ``torch.nn`` loss with ``reduction="sum"`` on
  that one datum (one row of the model output; its cross-entropy, say, or its squared error
  summed over the output units; another callable's value on the one datum) and ``∇ℓ_n``
  its gradient with respect to the parameters ``θ``, from ``torch.func.vmap(grad(...))``
  over ``functional_call``;
- ``F`` a curvature matrix of the *mean* training loss ``L(θ) = (1/Z) Σ_n ℓ_n`` over
  ``train_data`` (``Z`` the number of terms the mean divides by, see
  :mod:`curvops.nn.losses`: ``Z = N`` for cross-entropy with one class label per datum), as
  curvops builds it for a loss with ``reduction="mean"`` — the convention of kronfluence;
- ``Λ = λI`` for a number ``damping = λ >= 0`` (exact damping: ``F + λI`` is inverted
  exactly through ``F``'s structure), or ``damping="heuristic"``: ``λ_b = 0.1 · tr(F_b) /
  dim(F_b)``, a tenth of the mean eigenvalue, separately for every block ``F_b`` of a
  block-diagonal ``F`` (one per layer for KFAC and its relatives, one per parameter tensor
  for ``"diagonal"``, the whole matrix for ``"ggn"``, ``λ = 0.1`` for ``"identity"``).

What the sign means (to first order in the step):

- a preconditioned gradient step on ``n``, ``θ ← θ - η (F + Λ)^-1 ∇ℓ_n``, changes the query
  loss by ``-η · score(t, n)``: a **positive** score means training on ``n`` lowers ``ℓ_t``
  (``n`` is *helpful* to ``t``, their gradients aligned in the metric ``(F + Λ)^-1``), a
  **negative** score means it raises ``ℓ_t`` (``n`` is *harmful*);
- at a minimum ``θ*`` of ``L``, with ``F`` the Hessian and ``Λ = 0``, upweighting ``n`` — minimising
  ``L + ε ℓ_n`` — changes the query loss at rate ``dℓ_t/dε = -score(t, n)``; removing ``n``
  (``ε = -1/Z``) raises ``ℓ_t`` by about ``score(t, n) / Z`` (``1/N`` of it for
  classification). Koh & Liang's ``I_up,loss(n, t)`` is ``-score(t, n)``.

Costs: the curvature is built once over ``train_data``; then the query gradients are
preconditioned ``query_batch_size`` columns at a time (``(F + Λ)^-1`` applied to a
``[D, K]`` block), and for each such block the training gradients are streamed
``train_batch_size`` at a time and dotted with it. Memory is about
``D · (query_batch_size + train_batch_size)`` numbers; the training gradients are
computed once per query block and never held all at once.

Train mode: per-example gradients need a deterministic model that treats each datum on its
own. Batch normalisation in train mode is refused (it would normalise each datum alone and
update its running statistics); dropout in train mode gets a warning, and curvops then
raises :class:`~curvops.errors.NonDeterministicDataError` at the random forward pass. Call
``model.eval()`` first.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.utils._pytree import tree_leaves, tree_map

from .errors import NonDeterministicDataError
from .linalg import (
    BlockDiagonal,
    CurvatureOperator,
    Diagonal,
    Identity,
    LowRankUpdate,
    block_layout,
)
from .linalg.checks import check_bool, check_choice, check_damping, check_positive_int
from .nn import EKFAC, GGN, KFAC, TKFAC, EmpiricalFisher, FisherMC, LossAdapter, ModelData
from .nn.approximations import KRONECKER_APPROXIMATIONS
from .nn.curvature import computation_copy, dense_operator
from .nn.kfac import kronecker_approximation
from .nn.layers import find_layers
from .nn.model import as_batches, check_batch_statistics, check_built_from, fixed_forward, mark_built_from
from .nn.options import check_curvature

_INPUT_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AssertionError)
"""What a model or loss raises on inputs it cannot take (torch.func's decompositions assert)."""

CURVATURES = ("kfac", "ekfac", "tkfac", "tekfac", "diagonal", "ggn", "identity")
"""The names :func:`influence_curvature` builds."""

FISHER_TYPES = ("type-2", "mc", "empirical")
"""The Fisher types of the built curvatures."""

HEURISTIC_FACTOR = 0.1
"""``damping="heuristic"``: ``λ_b = HEURISTIC_FACTOR · tr(F_b) / dim(F_b)`` per block."""


Damping = float | str


class TopInfluences(NamedTuple):
    """The most helpful and most harmful training examples per query (see :func:`top_influences`).

    Each field has the shape of ``scores`` with its last axis cut to ``k``.

    Attributes:
        helpful: training indices of the ``k`` largest scores, largest first.
        helpful_scores: those scores.
        harmful: training indices of the ``k`` smallest scores, most negative first
            (harmful only where the score is negative).
        harmful_scores: those scores.
    """

    helpful: Tensor
    helpful_scores: Tensor
    harmful: Tensor
    harmful_scores: Tensor


# ----------------------------------------------------------------------------- losses


def _with_reduction(loss_fn: Callable, reduction: str) -> Callable:
    """``loss_fn`` with another ``reduction`` (a shallow copy of a ``torch.nn`` loss)."""
    if isinstance(loss_fn, nn.modules.loss._Loss):
        if loss_fn.reduction == reduction:
            return loss_fn
        changed = copy.copy(loss_fn)
        changed.reduction = reduction
        return changed
    return loss_fn


class _Losses:
    """The per-datum loss ``ℓ_n`` and the mean loss whose curvature ``F`` is."""

    def __init__(self, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
        reduction = getattr(loss_fn, "reduction", "mean")
        if not isinstance(loss_fn, nn.modules.loss._Loss) and reduction != "mean":
            raise ValueError(
                f"loss_fn has reduction={reduction!r}; influence functions use the curvature of the "
                "mean training loss, so pass a loss that averages over the batch (reduction='mean')."
            )
        self.mean = _with_reduction(loss_fn, "mean")
        self.counter = LossAdapter(self.mean)  # checks the reduction; counts the mean's terms
        # ℓ_n: a torch loss summed over the datum's terms; another callable's mean over one datum
        self.datum = LossAdapter(_with_reduction(loss_fn, "sum"))


# ------------------------------------------------------------------------------- data


class _Examples:
    """A labelled data set: per-example loss gradients, ``[D, K]`` columns at a time."""

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        params: Sequence[nn.Parameter] | None,
        losses: _Losses,
        what: str,
        progressbar: bool,
    ) -> None:
        self.data = as_batches(data)
        try:
            reiterable = iter(self.data) is not self.data
        except TypeError:
            reiterable = False
        if not reiterable:
            raise TypeError(
                f"{what} must be a re-iterable of (X, y) batches (a list or a DataLoader) or one pair of "
                f"tensors (X, y), got {type(data).__name__}; one-shot iterators and generators cannot be "
                "passed over more than once."
            )
        self.model_data = ModelData(model, self.data, params, progressbar, label=what)
        self.losses = losses
        self.what = what

    def batches(self) -> Iterator[tuple[int, Any, Tensor]]:
        """``(index, X, y)`` with ``len(y)`` data each; raises for empty data and malformed batches."""
        total = 0
        for index, x, y in self.model_data.batches(f"{self.what} gradients"):
            if not isinstance(y, Tensor) or y.ndim == 0:
                raise TypeError(f"{self.what} batch {index}: y must be a tensor with one row per datum.")
            for leaf in tree_leaves(x):
                if not isinstance(leaf, Tensor) or leaf.ndim == 0 or leaf.shape[0] != len(y):
                    shape = list(leaf.shape) if isinstance(leaf, Tensor) else type(leaf).__name__
                    raise ValueError(
                        f"{self.what} batch {index}: X (shape {shape}) must have one row per target, "
                        f"{len(y)} of them."
                    )
            total += len(y)
            yield index, x, y
        if total == 0:
            raise ValueError(f"{self.what} holds no examples.")

    def check(self) -> None:
        """Fail early on empty data and on inputs the model or loss cannot take (first batch).

        A complete pass, so that it is the first pass every later one is compared with, batch
        by batch: the scores are by position, so a reshuffled pass raises
        :class:`~curvops.errors.NonDeterministicDataError` (the model runs on one batch only).
        """
        if next(iter(self.data), None) is None:
            raise ValueError(f"{self.what} is empty: it yielded no batches.")
        diagnosed = False
        for index, x, y in self.batches():
            if len(y) and not diagnosed:
                self._diagnose(index, x, y)
                diagnosed = True

    def _diagnose(self, index: int, x: Any, y: Tensor) -> None:
        """Raise a ``ValueError`` naming the shapes if the model or the loss fails on ``(x, y)``."""
        model_data = self.model_data
        shapes = [list(leaf.shape) for leaf in tree_leaves(x)]
        shape = shapes[0] if len(shapes) == 1 else shapes
        with fixed_forward():
            try:
                with torch.no_grad():
                    output = model_data.forward(model_data.param_dict(), x)
            except _INPUT_ERRORS as error:
                raise ValueError(
                    f"{self.what} batch {index}: the model cannot take inputs of shape {shape} "
                    f"(first axis: data): {error}"
                ) from error
        try:
            self.losses.datum.check_target(output, y, index)
            self.losses.datum(output, y)
        except _INPUT_ERRORS as error:
            raise ValueError(
                f"{self.what} batch {index}: the loss cannot compare the model's outputs of shape "
                f"{list(output.shape)} (inputs of shape {shape}) with targets of shape {list(y.shape)}: "
                f"{error}"
            ) from error

    def _gradients(self, index: int, params: dict[str, Tensor], x: Any, y: Tensor) -> Tensor:
        """``[D, b]``: the columns ``∇ℓ_n`` of the ``b`` data in ``(x, y)``."""
        model_data, datum = self.model_data, self.losses.datum

        def datum_loss(p: dict[str, Tensor], xn: Any, yn: Tensor) -> tuple[Tensor, Tensor]:
            output = model_data.forward(p, tree_map(lambda t: t.unsqueeze(0), xn))
            return datum(output, yn.unsqueeze(0)), output

        try:
            with fixed_forward():
                tree, outputs = vmap(grad(datum_loss, has_aux=True), in_dims=(None, 0, 0))(params, x, y)
        except NonDeterministicDataError:
            raise
        except _INPUT_ERRORS:
            self._diagnose(index, x, y)
            raise
        try:
            datum.check_target(outputs.flatten(0, 1), y, index)  # [b, 1, ...]: one output per datum
        except ValueError:
            self._diagnose(index, x, y)  # the same error, with the shapes of the inputs
            raise
        columns = model_data.from_tree(tree)
        if not bool(torch.isfinite(columns).all()):
            raise ValueError(
                f"{self.what} batch {index}: a per-example gradient contains NaN or inf."
                f"{model_data.non_finite_tensors()}"
            )
        return columns

    def columns(self, size: int) -> Iterator[Tensor]:
        """``∇ℓ_n`` for every datum in order, as ``[D, size]`` blocks (the last one smaller)."""
        params = self.model_data.param_dict()
        parts, filled = [], 0
        for index, x, y in self.batches():
            start = 0
            while start < len(y):
                take = min(len(y) - start, size - filled)
                rows = slice(start, start + take)
                inputs = tree_map(lambda t, rows=rows: t[rows], x)
                parts.append(self._gradients(index, params, inputs, y[rows]))
                filled, start = filled + take, start + take
                if filled == size:
                    yield torch.cat(parts, dim=1)
                    parts, filled = [], 0
        if parts:
            yield torch.cat(parts, dim=1)

    def totals(self) -> tuple[int, float]:
        """``(N, Z)``: the number of data and of the terms the mean loss divides by."""
        total, terms = 0, 0.0
        for _, _, y in self.batches():
            total, terms = total + len(y), terms + self.losses.counter.count(y)
        return total, terms

    def datum_terms(self, indices: Sequence[int]) -> dict[int, float]:
        """``{n: z_n}``: the terms of the mean loss that datum ``n`` holds (``0 <= n < N``)."""
        terms, offset = {}, 0
        for _, _, y in self.batches():
            for n in indices:
                if offset <= n < offset + len(y):
                    terms[n] = self.losses.counter.count(y[n - offset : n - offset + 1])
            offset += len(y)
        return terms


def _removed_indices(removed: Any) -> tuple[bool, list[int]]:
    """``(whether one index was given, the indices)`` from an int, a sequence or an integer tensor."""
    if isinstance(removed, Tensor) and not removed.is_floating_point() and removed.ndim <= 1:
        removed = removed.tolist()
    single = isinstance(removed, int) and not isinstance(removed, bool)
    indices = [removed] if single else removed
    if (
        not isinstance(indices, Sequence)
        or isinstance(indices, str)
        or not indices
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in indices)
    ):
        raise ValueError(
            f"removed must be a training index or a non-empty sequence of them, got {removed!r}."
        )
    return single, list(indices)


def _check_mode(model: nn.Module) -> None:
    """Refuse batch norm in train mode; warn about dropout in train mode."""
    if not isinstance(model, nn.Module):
        return
    check_batch_statistics(model)
    modules = [m for m in model.modules() if m.training]
    dropout = sorted({type(m).__name__ for m in modules if isinstance(m, nn.modules.dropout._DropoutNd)})
    if dropout:
        warnings.warn(
            f"The model is in train mode and has {', '.join(dropout)} layers: its gradients would be "
            "random (curvops refuses random forward passes). Call model.eval().",
            UserWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------------- curvature

OWN_ARGUMENTS = {
    "model": "model",
    "loss_fn": "loss_fn",
    "data": "train_data",
    "params": "params",
    "fisher_type": "fisher_type",
    "bias": "bias",
    "progressbar": "progressbar",
}
"""Builder arguments that the influence functions set from their own: builder name -> argument."""

EXACT_CURVATURES = {"type-2": GGN, "empirical": EmpiricalFisher, "mc": FisherMC}
"""The exact operator of each ``fisher_type`` that ``"ggn"`` and ``"diagonal"`` are built from."""


def _builder(curvature: str, fisher_type: str) -> Callable | None:
    """The builder that ``curvature_options`` go to (``None``: the curvature has no builder)."""
    if curvature in KRONECKER_APPROXIMATIONS:
        return {"kfac": KFAC, "ekfac": EKFAC}.get(curvature, TKFAC)
    if curvature == "ggn" or (curvature == "diagonal" and fisher_type != "empirical"):
        return EXACT_CURVATURES[fisher_type]
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
    allowed = _builder_options(builder)
    what = f"curvature={curvature!r} with fisher_type={fisher_type!r}"
    for key in options:
        if not isinstance(key, str):
            raise TypeError(f"curvature_options keys must be strings, got {key!r}.")
        if key in OWN_ARGUMENTS:
            raise ValueError(
                f"curvature_options[{key!r}] sets an argument of the influence function itself: "
                f"pass {OWN_ARGUMENTS[key]}= to it instead."
            )
        if key not in allowed:
            takes = f"it takes {', '.join(allowed)}" if allowed else "it takes no curvature_options"
            source = f" (the options of {builder.__name__})" if builder is not None else ""
            raise ValueError(f"curvature_options[{key!r}] is not an option of {what}{source}; {takes}.")
    return options


def _check_supported(
    model: nn.Module, model_data: ModelData, curvature: str, bias: str, options: dict[str, Any]
) -> None:
    """Refuse parameters without a Kronecker rule (LayerNorm, ...) unless ``unsupported`` says how."""
    if curvature not in KRONECKER_APPROXIMATIONS or options.get("unsupported", "error") != "error":
        return
    _, others = find_layers(model, model_data.params, bias, options.get("kfac_approx", "expand"))
    if others:
        listing = ", ".join(f"{name!r} ({type(module).__name__})" for name, module, _ in others)
        raise ValueError(
            f"curvature={curvature!r} has no Kronecker rule for the parameters of {listing}. Pass "
            "curvature_options={'unsupported': 'dense'} (or 'diagonal') for an exact block of their own, "
            "leave them out of params, or use curvature='ggn' or 'diagonal'."
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
) -> CurvatureOperator:
    """The operator called ``curvature`` of the mean loss over the training data, its builder
    given ``options`` (checked by :func:`_check_options`)."""
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
            **options,
        )
    if curvature == "diagonal" and fisher_type == "empirical":
        # diag((1/Z) Σ_n ∇ℓ_n ∇ℓ_n^T) from one pass of per-example gradients
        squares = sum(block.square().sum(dim=1) for block in train.columns(batch_size))
        diagonal = squares / train.totals()[1]
    else:
        builder = EXACT_CURVATURES[fisher_type]
        if curvature == "ggn":
            model, params = computation_copy(model_data)
            exact = builder(model, mean, data, params=params, progressbar=progressbar, **options)
            return mark_built_from(dense_operator(exact, model_data.dtype), model_data)
        exact = builder(model, mean, data, params=params, progressbar=progressbar, **options)
        diagonal = exact.diagonal()
    parts = diagonal.split([p.numel() for p in model_data.params])
    return mark_built_from(BlockDiagonal([Diagonal(part) for part in parts], model_data.names), model_data)


def _check_operator(op: CurvatureOperator, model_data: ModelData) -> None:
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
    if isinstance(damping, str):
        if damping != "heuristic":
            raise ValueError(f"damping must be a number >= 0 or 'heuristic', got {damping!r}.")
        return damping
    return check_damping(damping)


def _block_dampings(op: CurvatureOperator, damping: Damping) -> list[float]:
    """``λ_b`` for every block of ``op`` (see the module docstring)."""
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


class _Setup:
    """The checked arguments, the training data and the damped curvature."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        train_data: Any,
        curvature: str | CurvatureOperator,
        damping: Damping,
        fisher_type: str,
        bias: str,
        params: Sequence[nn.Parameter] | None,
        train_batch_size: int,
        query_batch_size: int,
        progressbar: bool,
        curvature_options: Mapping[str, Any] | None,
    ) -> None:
        check_curvature(curvature, CURVATURES)
        check_choice(fisher_type, FISHER_TYPES, "fisher_type")
        check_choice(bias, ("separate", "joint"), "bias")
        self.options = _check_options(curvature_options, curvature, fisher_type)
        self.damping = _check_damping(damping)
        self.train_batch_size = check_positive_int(train_batch_size, "train_batch_size")
        self.query_batch_size = check_positive_int(query_batch_size, "query_batch_size")
        _check_mode(model)
        self.model, self.params, self.progressbar = model, params, progressbar
        self.losses = _Losses(loss_fn)
        self.train = _Examples(model, train_data, params, self.losses, "train_data", progressbar)
        if isinstance(curvature, CurvatureOperator):
            _check_operator(curvature, self.train.model_data)
        else:
            _check_supported(model, self.train.model_data, curvature, bias, self.options)
        self.curvature, self.fisher_type, self.bias = curvature, fisher_type, bias

    def examples(self, data: Any, what: str) -> _Examples:
        examples = _Examples(self.model, data, self.params, self.losses, what, self.progressbar)
        examples.check()
        return examples

    def build(self) -> None:
        """Build (or take) ``F``, its block dampings and ``(F + Λ)^-1``."""
        self.train.check()
        if isinstance(self.curvature, CurvatureOperator):
            self.op = self.curvature
        else:
            self.op = _build(
                self.model, self.losses, self.train, self.curvature, self.fisher_type, self.bias,
                self.params, self.progressbar, self.train_batch_size, self.options,
            )  # fmt: skip
        self.dampings = _block_dampings(self.op, self.damping)
        self.inverse = _inverse(_damped(self.op, self.dampings), self.op)

    def scores(self, preconditioned: Tensor) -> Tensor:
        """``P^T [∇ℓ_1, ..., ∇ℓ_N]`` for preconditioned query columns ``P``, streaming the train data."""
        return torch.cat([preconditioned.T @ g for g in self.train.columns(self.train_batch_size)], dim=1)


# --------------------------------------------------------------------------- public API


def influence_curvature(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    train_data: Iterable,
    curvature: str = "ekfac",
    fisher_type: str = "type-2",
    bias: str = "joint",
    params: Sequence[nn.Parameter] | None = None,
    progressbar: bool = False,
    curvature_options: Mapping[str, Any] | None = None,
) -> CurvatureOperator:
    """The curvature ``F`` of the mean loss over ``train_data`` that the influence functions use.

    Build it once and pass it as ``curvature=`` to :func:`influence_scores`,
    :func:`self_influence` and :func:`leave_one_out_scores` to reuse it. ``F`` is the curvature
    of ``L = (1/Z) Σ_n ℓ_n`` whatever ``loss_fn``'s reduction (a ``torch.nn`` loss with
    ``reduction="sum"`` is copied with ``"mean"``), of size ``D x D`` over ``params``:

    - ``"kfac"``, ``"ekfac"``, ``"tkfac"``, ``"tekfac"``: :func:`~curvops.KFAC`,
      :func:`~curvops.EKFAC`, :func:`~curvops.TKFAC` (``eigenvalue_correction`` for
      ``"tekfac"``) of the Fisher of ``fisher_type``: one block per layer
      (``bias="joint"``: weight and bias in one block ``G ⊗ A`` over ``[W b]``, as kronfluence
      does) or per parameter (``"separate"``);
    - ``"ggn"``: the exact curvature of ``fisher_type``, densified (``D x D`` in memory, small
      models): the GGN ``(1/Z) Σ_n J_n^T ∇²_f ℓ_n J_n`` (= the type-2 Fisher) for
      ``"type-2"``, the exact empirical Fisher ``(1/Z) Σ_n ∇ℓ_n ∇ℓ_n^T`` for ``"empirical"``,
      the exact Monte-Carlo Fisher for ``"mc"`` — each the matrix KFAC of the same
      ``fisher_type`` approximates;
    - ``"diagonal"``: the exact diagonal of that matrix, one :class:`~curvops.Diagonal` block
      per parameter tensor (labelled by its name). For ``"empirical"`` it takes one pass of
      per-example gradients, ``(1/Z) Σ_n ∇ℓ_n ⊙ ∇ℓ_n``; otherwise ``D`` products with the
      exact operator (small and moderate models);
    - ``"identity"``: ``I`` (plain gradient dot products).

    Args:
        model: the network.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` (any
            ``torch.func``-differentiable loss for ``"ggn"`` with ``"type-2"`` and ``"identity"``).
        train_data: a re-iterable of ``(X, y)`` batches, or one pair of tensors ``(X, y)``.
        curvature: one of the names above.
        fisher_type: ``"type-2"`` (default: the GGN, deterministic, the curvature influence
            functions approximate — Bae et al. 2022; no label noise), ``"mc"`` (labels sampled from
            the model: cheaper than type-2 for many classes) or ``"empirical"`` (the true
            labels' gradients; a biased curvature estimate, Kunstner et al. 2019).
        bias: ``"joint"`` or ``"separate"`` (Kronecker curvatures only).
        params: the parameters (default: the model's trainable ones, in order).
        progressbar: tqdm bars on the passes over the data.
        curvature_options: further keyword arguments of the builder: for the Kronecker
            curvatures those of :func:`~curvops.KFAC`, :func:`~curvops.EKFAC` or
            :func:`~curvops.TKFAC` (``unsupported``, ``kfac_approx``, ``mc_samples``, ``seed``,
            ``correction``, ``check_deterministic``); for ``"ggn"`` and ``"diagonal"`` those of
            the exact operator of ``fisher_type`` (``check_deterministic``; ``mc_samples`` and
            ``seed`` for ``"mc"``). A key the builder does not take, or one that is an argument
            above (``fisher_type``, ``bias``, ``params``, ...), raises a ``ValueError``.

    Example:
        >>> from curvops.influence import influence_curvature
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> op = influence_curvature(model.double(), torch.nn.CrossEntropyLoss(), data, "kfac")
        >>> op.labels, op.block_sizes  # weight and bias in one block per layer
        (('0', '2'), (16, 10))

        A LayerNorm has no Kronecker rule; ``unsupported="dense"`` gives it an exact block:

        >>> layers = [torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)]
        >>> model = torch.nn.Sequential(*layers).double()
        >>> data = (torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))
        >>> op = influence_curvature(
        ...     model, torch.nn.CrossEntropyLoss(), data, "kfac", curvature_options={"unsupported": "dense"}
        ... )
        >>> op.labels, op.block_sizes
        (('0', '1', '2'), (16, 8, 10))
    """
    check_choice(curvature, CURVATURES, "curvature")
    setup = _Setup(
        model, loss_fn, train_data, curvature, 0.0, fisher_type, bias, params, 1, 1, progressbar,
        curvature_options,
    )  # fmt: skip
    setup.train.check()
    return _build(
        model, setup.losses, setup.train, curvature, fisher_type, bias, params, progressbar, 32,
        setup.options,
    )  # fmt: skip


def influence_scores(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    train_data: Iterable,
    query_data: Iterable,
    curvature: str | CurvatureOperator = "ekfac",
    damping: float | str = "heuristic",
    fisher_type: str = "type-2",
    bias: str = "joint",
    params: Sequence[nn.Parameter] | None = None,
    train_batch_size: int = 32,
    query_batch_size: int = 128,
    progressbar: bool = False,
    curvature_options: Mapping[str, Any] | None = None,
) -> Tensor:
    """Influence of every training example on every query: ``∇ℓ_t^T (F + Λ)^-1 ∇ℓ_n``.

    See the module docstring for ``ℓ_n``, ``F``, ``Λ`` and the sign: a positive score means
    that a gradient step on training example ``n`` lowers the loss of query ``t`` (by
    ``η · score`` for a step ``-η (F + Λ)^-1 ∇ℓ_n``, to first order), i.e. ``n`` is helpful to
    ``t``; removing ``n`` from the training set raises ``ℓ_t`` by about ``score / Z``.

    The query gradients ``[D, K]`` are preconditioned by ``(F + Λ)^-1`` ``query_batch_size``
    columns at a time; the training gradients are streamed past each block
    ``train_batch_size`` at a time. The result does not depend on either size, nor on how
    the data is batched.

    Args:
        model: the network (in eval mode).
        loss_fn: the training loss (see :func:`influence_curvature`).
        train_data: a re-iterable of ``(X, y)`` batches (a list or a non-shuffling
            ``DataLoader``), or one pair of tensors ``(X, y)``; ``N`` data in all.
        query_data: the same for the ``M`` queries (e.g. test points with their labels).
        curvature: a name of :func:`influence_curvature` (built over ``train_data`` with
            ``fisher_type``, ``bias`` and ``params``), or a prebuilt
            :class:`~curvops.CurvatureOperator` on the same parameters — the curvature of the
            mean loss over ``train_data``.
        damping: ``λ >= 0``, or ``"heuristic"`` (``0.1 ·`` the mean eigenvalue of each block).
        fisher_type: ``"type-2"``, ``"mc"`` or ``"empirical"``.
        bias: ``"joint"`` or ``"separate"``.
        params: the parameters ``θ`` (default: the model's trainable ones, in order).
        train_batch_size: training gradients computed and held at once.
        query_batch_size: query gradients preconditioned and held at once (each block costs
            one pass of training gradients).
        progressbar: tqdm bars on the passes over the data.
        curvature_options: further keyword arguments of the curvature's builder, e.g.
            ``{"unsupported": "dense"}`` for a model with LayerNorm and a Kronecker curvature
            (see :func:`influence_curvature`); none with a prebuilt operator.

    Returns:
        ``[M, N]`` scores, query ``t`` by training example ``n``, in data order.

    Example:
        >>> from curvops.influence import influence_scores
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> model = model.double()
        >>> train = (torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,)))
        >>> query = (torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1]))
        >>> scores = influence_scores(model, torch.nn.CrossEntropyLoss(), train, query, curvature="kfac")
        >>> scores.shape
        torch.Size([2, 10])
        >>> same = influence_scores(
        ...     model, torch.nn.CrossEntropyLoss(), train, query, "kfac",
        ...     train_batch_size=3, query_batch_size=1,
        ... )
        >>> torch.allclose(scores, same)
        True
    """
    setup = _Setup(
        model, loss_fn, train_data, curvature, damping, fisher_type, bias, params,
        train_batch_size, query_batch_size, progressbar, curvature_options,
    )  # fmt: skip
    query = setup.examples(query_data, "query_data")
    setup.build()
    rows = [setup.scores(setup.inverse @ q) for q in query.columns(setup.query_batch_size)]
    return torch.cat(rows, dim=0)


def self_influence(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    train_data: Iterable,
    curvature: str | CurvatureOperator = "ekfac",
    damping: float | str = "heuristic",
    fisher_type: str = "type-2",
    bias: str = "joint",
    params: Sequence[nn.Parameter] | None = None,
    train_batch_size: int = 32,
    progressbar: bool = False,
    curvature_options: Mapping[str, Any] | None = None,
) -> Tensor:
    """Self-influence ``∇ℓ_n^T (F + Λ)^-1 ∇ℓ_n`` of every training example (``>= 0``).

    The diagonal of ``influence_scores(train_data, train_data)`` at the cost of one pass of
    training gradients: each ``[D, b]`` block is preconditioned and dotted with itself. Large
    values flag examples the model has to bend most to fit (often mislabelled or atypical):
    sort with :func:`top_influences`. Arguments as for :func:`influence_scores`.

    Returns:
        ``[N]`` scores in data order.

    Example:
        >>> from curvops.influence import influence_scores, self_influence
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> model = model.double()
        >>> train = (torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))
        >>> loss = torch.nn.CrossEntropyLoss()
        >>> own = self_influence(model, loss, train, curvature="ekfac", damping=1e-3)
        >>> torch.allclose(own, influence_scores(model, loss, train, train, "ekfac", 1e-3).diagonal())
        True
    """
    setup = _Setup(
        model, loss_fn, train_data, curvature, damping, fisher_type, bias, params,
        train_batch_size, 1, progressbar, curvature_options,
    )  # fmt: skip
    setup.build()
    parts = [(g * (setup.inverse @ g)).sum(dim=0) for g in setup.train.columns(setup.train_batch_size)]
    return torch.cat(parts)


def top_influences(scores: Tensor, k: int) -> TopInfluences:
    """The ``k`` most helpful (largest) and most harmful (smallest) scores along the last axis.

    Works on ``[M, N]`` :func:`influence_scores` (per query) and on ``[N]``
    :func:`self_influence` scores. Ties come in no particular order.

    Args:
        scores: ``[..., N]`` finite floating-point scores.
        k: ``1 <= k <= N``.

    Returns:
        :class:`TopInfluences` of ``[..., k]`` tensors: ``helpful`` and ``helpful_scores``
        (descending), ``harmful`` and ``harmful_scores`` (ascending: most negative first).

    Example:
        >>> from curvops.influence import top_influences
        >>> top = top_influences(torch.tensor([[0.5, -2.0, 3.0, 0.1]]), k=2)
        >>> top.helpful.tolist(), top.helpful_scores.tolist(), top.harmful.tolist()
        ([[2, 0]], [[3.0, 0.5]], [[1, 3]])
    """
    if not isinstance(scores, Tensor) or not scores.is_floating_point() or scores.ndim == 0:
        raise ValueError("top_influences takes a floating-point tensor of scores with at least one axis.")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("The scores contain NaN or inf.")
    count = scores.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= count:
        raise ValueError(
            f"k must be an integer in [1, {count}] (the number of training examples), got {k!r}."
        )
    helpful = torch.topk(scores, k, dim=-1, largest=True, sorted=True)
    harmful = torch.topk(scores, k, dim=-1, largest=False, sorted=True)
    return TopInfluences(helpful.indices, helpful.values, harmful.indices, harmful.values)


def leave_one_out_scores(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    train_data: Iterable,
    query_data: Iterable,
    removed: int | Sequence[int] | Tensor,
    curvature: str | CurvatureOperator = "ggn",
    damping: float | str = "heuristic",
    fisher_type: str = "empirical",
    bias: str = "joint",
    params: Sequence[nn.Parameter] | None = None,
    renormalize: bool = False,
    train_batch_size: int = 32,
    query_batch_size: int = 128,
    progressbar: bool = False,
    curvature_options: Mapping[str, Any] | None = None,
) -> Tensor:
    """Influence scores re-computed with one training example's curvature removed.

    Removing datum ``r`` from the mean empirical Fisher ``F = (1/Z) Σ_n ∇ℓ_n ∇ℓ_n^T`` removes
    its share ``(1/Z) ∇ℓ_r ∇ℓ_r^T``. With ``u = ∇ℓ_r / √Z`` this is the rank-one downdate
    ``F_-r = F - u u^T``, a :class:`~curvops.LowRankUpdate` whose damped inverse is exact by
    Sherman-Morrison through ``F``'s own structured inverse, without rebuilding ``F``:

    ``score_-r(t, n) = ∇ℓ_t^T (F_-r + Λ)^-1 ∇ℓ_n``.

    Normalisation: ``renormalize=False`` (default) keeps the full data set's ``Z``, so
    ``F_-r = (1/Z) Σ_{n≠r} ∇ℓ_n ∇ℓ_n^T``; ``renormalize=True`` gives the mean over the remaining
    data, ``F_-r = (1/(Z - z_r)) Σ_{n≠r} ∇ℓ_n ∇ℓ_n^T = c (F - u u^T)`` with ``c = Z / (Z - z_r)``
    (``z_r`` the datum's terms, 1 for a class label), inverted as
    ``(1/c) (F - u u^T + Λ/c)^-1``. The damping ``Λ`` is the full ``F``'s, held fixed.

    This is exact for the empirical Fisher (the default: ``"ggn"`` with ``"empirical"``, or a
    prebuilt :class:`~curvops.EmpiricalFisher`). For any other ``F`` (e.g. KFAC) it is the model
    "``F`` less ``r``'s empirical-Fisher share", not ``F`` rebuilt without ``r``. The other
    arguments are :func:`influence_scores`'s (note the defaults ``curvature="ggn"`` and
    ``fisher_type="empirical"``).

    Args:
        removed: a training index, or a sequence (or 1-D integer tensor) of them, each removed on
            its own; negative indices count from the end.
        renormalize: divide by the remaining data's ``Z - z_r`` instead of ``Z``.

    Returns:
        ``[M, N]`` scores for an ``int`` ``removed``, ``[R, M, N]`` for a sequence of ``R``.
        Each block holds ``D · R · query_batch_size`` numbers.

    Example:
        >>> from curvops.influence import leave_one_out_scores
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> model = model.double()
        >>> train = (torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))
        >>> query = (torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 1]))
        >>> loss = torch.nn.CrossEntropyLoss()
        >>> leave_one_out_scores(model, loss, train, query, removed=[0, 3], damping=1e-2).shape
        torch.Size([2, 2, 6])
    """
    single, indices = _removed_indices(removed)
    check_bool(renormalize, "renormalize")
    setup = _Setup(
        model, loss_fn, train_data, curvature, damping, fisher_type, bias, params,
        train_batch_size, query_batch_size, progressbar, curvature_options,
    )  # fmt: skip
    query = setup.examples(query_data, "query_data")
    setup.train.check()
    total, terms = setup.train.totals()
    for n in indices:
        if not -total <= n < total:
            raise IndexError(f"removed index {n} is out of range for {total} training examples.")
    indices = [n % total for n in indices]
    datum_terms = setup.train.datum_terms(indices)
    setup.build()
    gradients, offset = {}, 0
    for block in setup.train.columns(setup.train_batch_size):
        for n in indices:
            if offset <= n < offset + block.shape[1]:
                gradients[n] = block[:, n - offset]
        offset += block.shape[1]
    inverses = []
    for n in indices:
        remaining = terms - datum_terms[n]
        if renormalize and remaining <= 0:
            raise ValueError(f"Removing example {n} leaves no loss terms to renormalise by.")
        scale = terms / remaining if renormalize else 1.0
        base = _damped(setup.op, setup.dampings, scale)
        downdate = LowRankUpdate(base, gradients[n] / math.sqrt(terms), sign=-1)
        inverses.append((1.0 / scale) * _inverse(downdate, setup.op))
    blocks = []
    for q in query.columns(setup.query_batch_size):
        preconditioned = torch.cat([inverse @ q for inverse in inverses], dim=1)
        blocks.append(setup.scores(preconditioned).reshape(len(inverses), q.shape[1], -1))
    result = torch.cat(blocks, dim=1)
    return result[0] if single else result
