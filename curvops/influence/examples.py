"""The examples of an influence computation: per-datum losses and their gradients ``∇ℓ_n``.

``_Losses`` holds the per-datum loss ``ℓ_n`` and the mean loss whose curvature ``F`` is;
``_Examples`` streams the per-example gradients of a labelled data set as ``[D, K]`` columns
(``torch.func.vmap(grad(...))`` over ``functional_call``), in data order, and counts its data
and loss terms. Over shards (:mod:`curvops.distributed`) its data is this rank's shard: the
columns are this rank's, the counts the union's, whose examples are numbered rank after rank.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, vmap
from torch.utils._pytree import tree_leaves, tree_map

from ..distributed import Shards
from ..errors import NonDeterministicDataError
from ..nn import LossAdapter, ModelData
from ..nn.batches import as_batches
from ..nn.forward_checks import check_batch_statistics, fixed_forward
from ..nn.shard_sums import Part, union_sums

_INPUT_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AssertionError)
"""What a model or loss raises on inputs it cannot take (torch.func's decompositions assert)."""


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
        self.terms = _with_reduction(loss_fn, "none")  # ℓ_ns: a torch loss's every term


class _Totals(NamedTuple):
    """The counts of a data set over the union of its shards."""

    data: int
    """``N``: the examples."""
    terms: float
    """``Z``: the terms the mean loss divides by."""
    start: int
    """The union's index of this rank's first example (``0`` alone)."""


class _Examples:
    """A labelled data set: per-example loss gradients, ``[D, K]`` columns at a time.

    With ``shards`` active the data is this rank's shard, and may be empty.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        params: Sequence[nn.Parameter] | None,
        losses: _Losses,
        what: str,
        progressbar: bool,
        shards: Shards,
        measurement: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        if measurement is not None and not callable(measurement):
            raise TypeError(
                f"measurement must be a callable (output, target) -> Tensor[n], got {measurement!r}."
            )
        self.measurement = measurement
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
        self.shards = shards
        self.model_data = ModelData(
            model, self.data, params, progressbar, label=what, allow_empty=shards.active
        )
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
        if total == 0 and not self.shards.active:
            raise ValueError(f"{self.what} holds no examples.")

    def check(self) -> None:
        """Fail early on empty data and on inputs the model or loss cannot take (first batch).

        A complete pass, so that it is the first pass every later one is compared with, batch
        by batch: the scores are by position, so a reshuffled pass raises
        :class:`~curvops.errors.NonDeterministicDataError` (the model runs on one batch only).
        Over shards a rank's data may be empty, but not every rank's.
        """
        if next(iter(self.data), None) is None and not self.shards.active:
            raise ValueError(f"{self.what} is empty: it yielded no batches.")

        def local() -> Part:
            count = 0
            for index, x, y in self.batches():
                if len(y) and not count:
                    self._diagnose(index, x, y)
                count += len(y)
            return [], [count]

        _, (count,) = self.union(local, lambda: ([], [0.0]), "checking")
        if not count:
            raise ValueError(f"{self.what} holds no examples on any rank.")

    def union(self, local: Callable[[], Part], empty: Callable[[], Part], what: str) -> Part:
        """``local()``'s sums over the ranks (:func:`~curvops.nn.shard_sums.union_sums`: an error
        on one rank is raised on every rank)."""
        device = self.model_data.device
        return union_sums(self.shards, local, empty, device, what=f"{self.what}: {what}")

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
        if self.measurement is not None:
            self._check_measurement(index, output, y)
            return
        try:
            self.losses.datum.check_target(output, y, index)
            self.losses.datum(output, y)
        except _INPUT_ERRORS as error:
            raise ValueError(
                f"{self.what} batch {index}: the loss cannot compare the model's outputs of shape "
                f"{list(output.shape)} (inputs of shape {shape}) with targets of shape {list(y.shape)}: "
                f"{error}"
            ) from error

    def _check_measurement(self, index: int, output: Tensor, y: Tensor) -> None:
        """Raise a ``ValueError`` naming the batch unless ``measurement(output, y)`` is ``[n]``."""
        try:
            value = self.measurement(output, y)
        except _INPUT_ERRORS as error:
            raise ValueError(
                f"{self.what} batch {index}: measurement failed on outputs of shape {list(output.shape)} "
                f"and targets of shape {list(y.shape)}: {error}"
            ) from error
        if not isinstance(value, Tensor) or tuple(value.shape) != (len(y),):
            shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"{self.what} batch {index}: measurement must return one value per example, a Tensor "
                f"of shape [{len(y)}]; got {shape}. Reduce over everything but the data axis."
            )

    def _gradients(self, index: int, params: dict[str, Tensor], x: Any, y: Tensor) -> Tensor:
        """``[D, b]``: the columns ``∇ℓ_n`` (``∇m_n`` with a measurement) of the ``b`` data in ``(x, y)``."""
        model_data, datum, measurement = self.model_data, self.losses.datum, self.measurement

        def datum_loss(p: dict[str, Tensor], xn: Any, yn: Tensor) -> tuple[Tensor, Tensor]:
            output = model_data.forward(p, tree_map(lambda t: t.unsqueeze(0), xn))
            if measurement is not None:
                return measurement(output, yn.unsqueeze(0)).reshape(()), output
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
            if measurement is None:
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

    def _token_gradients(self, index: int, params: dict[str, Tensor], x: Any, y: Tensor) -> Tensor:
        """``[D, b, S]``: the gradients ``∇ℓ_ns`` of each datum's every target position ``s``
        (``y`` ``[b, S]``; a position of ``ignore_index`` has no loss, so a zero gradient)."""
        model_data, terms = self.model_data, self.losses.terms
        if not isinstance(terms, nn.modules.loss._Loss):
            raise ValueError(
                "per_token needs a torch.nn loss (its reduction='none' gives every token's loss)."
            )
        if y.ndim != 2:
            raise ValueError(
                f"{self.what} batch {index}: per_token needs targets [N, S] (a token axis), got shape "
                f"{list(y.shape)}."
            )

        def token_losses(p: dict[str, Tensor], xn: Any, yn: Tensor) -> Tensor:
            output = model_data.forward(p, tree_map(lambda t: t.unsqueeze(0), xn))
            return terms(output, yn.unsqueeze(0)).reshape(-1)

        with fixed_forward():
            tree = vmap(jacrev(token_losses), in_dims=(None, 0, 0))(params, x, y)  # {name: [b, S, *shape]}
        flat = {name: t.flatten(0, 1) for name, t in tree.items()}
        return model_data.from_tree(flat).reshape(model_data.size, len(y), y.shape[1])

    def token_columns(self, size: int) -> Iterator[Tensor]:
        """``∇ℓ_ns`` for every datum in order, as ``[D, b, S]`` blocks of at most ``size`` data;
        every batch's targets need the same ``S``."""
        params, tokens = self.model_data.param_dict(), None
        for index, x, y in self.batches():
            if tokens is not None and y.ndim == 2 and y.shape[1] != tokens:
                raise ValueError(
                    f"{self.what} batch {index} has {y.shape[1]} target positions, batch 0 had {tokens}: "
                    "per_token scores need every batch padded to the same length (ignore_index)."
                )
            tokens = y.shape[1] if y.ndim == 2 else tokens
            for start in range(0, len(y), size):
                rows = slice(start, start + size)
                yield self._token_gradients(index, params, tree_map(lambda t, rows=rows: t[rows], x), y[rows])

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

    def totals(self) -> _Totals:
        """The number of data ``N`` and of the terms ``Z`` the mean loss divides by, over the
        union, and where this rank's examples start in it (one reduction over shards)."""
        size, rank = self.shards.size, self.shards.rank

        def local() -> Part:
            counts, terms = [0.0] * size, 0.0  # every rank's number of data: this rank's here
            for _, _, y in self.batches():
                counts[rank], terms = counts[rank] + len(y), terms + self.losses.counter.count(y)
            return [], [*counts, terms]

        _, (*counts, terms) = self.union(local, lambda: ([], [0.0] * (size + 1)), "counting")
        return _Totals(int(sum(counts)), terms, int(sum(counts[:rank])))

    def datum_terms(self, indices: Sequence[int], start: int) -> dict[int, float]:
        """``{n: z_n}``: the terms of the mean loss that datum ``n`` of the union holds
        (``0 <= n < N``; this rank's examples are ``start, start + 1, ...``), from its rank."""
        keys = list(dict.fromkeys(indices))

        def local() -> Part:
            terms, offset = dict.fromkeys(keys, 0.0), start
            for _, _, y in self.batches():
                for n in keys:
                    if offset <= n < offset + len(y):
                        terms[n] = self.losses.counter.count(y[n - offset : n - offset + 1])
                offset += len(y)
            return [], list(terms.values())

        _, terms = self.union(local, lambda: ([], [0.0] * len(keys)), "counting")
        return dict(zip(keys, terms, strict=True))


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
