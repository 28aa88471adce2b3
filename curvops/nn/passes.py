"""What a pass over the data saw, and the checks that every pass sees the data of the first.

An operator passes over the data once per product, so it is one fixed matrix only if every
pass sees the same data. Each batch's fingerprint (:class:`Fingerprint`: shapes, kinds, and
per tensor ``Σ t`` and ``Σ t²``) is recorded in a :class:`PassRecord`, fetched once per pass;
:class:`PassChecks` compares every complete pass with the first, and, with
``check_deterministic``, each batch's data and model output with the first seen as they come.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import NonDeterministicDataError
from .tensor_sums import same_sums, tensor_leaves, value_sums

Layout = tuple[tuple[str, tuple[int, ...], bool], ...]
"""Per tensor of a batch: its name, its shape and whether it holds floating-point (or complex) values."""

FIXED_LOADER = (
    "curvops passes over the data once per product and needs the same data on every pass: use a "
    "fixed loader (a list of batches, or a DataLoader with shuffle=False and no random augmentation)"
)

CHANGED_BATCH = {
    "data": "the data changed between passes (shuffling or augmentation?); use a fixed, non-shuffled loader",
    "output": "the model output changed between passes on the same data (dropout or another random "
    "layer in train mode?); call model.eval()",
}
"""The cause of a batch that differs from its first sight, per kind (``check_deterministic``)."""


def named_leaves(x: Any, y: Any) -> list[tuple[str, Tensor]]:
    """The tensors of a batch ``(X, y)`` named ``X, X1, X2, ...`` and ``y, y1, ...`` in tree order.

    Example:
        >>> x = torch.zeros(2)
        >>> [name for name, _ in named_leaves({"a": x, "b": x}, x)]
        ['X', 'X1', 'y']
    """
    named = [(f"X{i or ''}", t) for i, t in enumerate(tensor_leaves(x))]
    return named + [(f"y{i or ''}", t) for i, t in enumerate(tensor_leaves(y))]


def layout_of(named: Sequence[tuple[str, Tensor]]) -> Layout:
    """The :data:`Layout` of named tensors."""
    return tuple((name, tuple(t.shape), t.is_floating_point() or t.is_complex()) for name, t in named)


@dataclass(frozen=True)
class Fingerprint:
    """One batch's :data:`Layout` and each of its tensors' ``(Σ t, Σ t²)`` (:func:`value_sums`).

    Example:
        >>> batch = named_leaves(torch.ones(3, 2), torch.tensor([0, 1, 1]))
        >>> first = Fingerprint.of(batch)
        >>> first.matches(Fingerprint.of(batch))
        True
        >>> first.matches(Fingerprint.of(named_leaves(torch.ones(3, 2), torch.tensor([1, 0, 0]))))
        False
    """

    layout: Layout
    sums: tuple[tuple[float, float], ...]

    @classmethod
    def of(cls, named: Sequence[tuple[str, Tensor]]) -> Fingerprint:
        """The fingerprint of named tensors, fetched at once (one device sync)."""
        rows = value_sums([t for _, t in named]).tolist()
        return cls(layout_of(named), tuple(tuple(row) for row in rows))

    def matches(self, other: Fingerprint) -> bool:
        """Equal layouts and sums: integers exactly, floats up to rounding (:func:`same_sums`)."""
        return self.layout == other.layout and all(
            same_sums(a, b, math.prod(shape), exact=not floating)
            for (_, shape, floating), a, b in zip(self.layout, self.sums, other.sums, strict=True)
        )


class PassRecord:
    """What one pass over the data saw, for comparing a later pass with the first.

    Per batch the :class:`Fingerprint` of ``(X, y)``; the sums stay on the device until
    :meth:`finish` (one sync per pass), which fills :attr:`batches`.
    """

    def __init__(self) -> None:
        self._layouts: list[Layout] = []
        self._pending: list[Tensor] = []
        self.batches: list[Fingerprint] = []

    def __len__(self) -> int:
        """The number of batches recorded."""
        return len(self._layouts)

    def add(self, x: Any, y: Any) -> None:
        """Record one batch."""
        named = named_leaves(x, y)
        self._layouts.append(layout_of(named))
        self._pending.append(value_sums([t for _, t in named]))

    def finish(self) -> None:
        """Fetch the sums of every batch (one device sync)."""
        if self._pending:
            flat = torch.cat([part.reshape(-1, 2).cpu() for part in self._pending]).tolist()
            offsets = list(itertools.accumulate((len(layout) for layout in self._layouts), initial=0))
            self.batches = [
                Fingerprint(layout, tuple(tuple(row) for row in flat[a:b]))
                for layout, (a, b) in zip(self._layouts, itertools.pairwise(offsets), strict=True)
            ]
        self._pending = []

    def totals(self) -> dict[str, list]:
        """Order-free totals per tensor name: ``[rows, elements, Σ t, Σ t², floating]``."""
        totals: dict[str, list] = {}
        for batch in self.batches:
            for (name, shape, floating), (total, squares) in zip(batch.layout, batch.sums, strict=True):
                entry = totals.setdefault(name, [0, 0, 0.0, 0.0, floating])
                entry[0] += shape[0] if shape else 1
                entry[1] += math.prod(shape)
                entry[2] += total
                entry[3] += squares
        return totals

    def same_batch(self, other: PassRecord, index: int) -> bool:
        """Whether batch ``index`` has the same shapes and sums in both passes."""
        return self.batches[index].matches(other.batches[index])

    def total_differences(self, other: PassRecord) -> list[str]:
        """What differs between the order-free totals of two passes, in words."""
        mine, theirs = self.totals(), other.totals()
        if mine.keys() != theirs.keys():
            return [f"the batches hold tensors {sorted(theirs)}, on the first pass {sorted(mine)}"]
        changes = []
        for name, (rows, elements, total, squares, floating) in mine.items():
            rows_b, elements_b, total_b, squares_b, _ = theirs[name]
            if (rows, elements) != (rows_b, elements_b):
                changes.append(
                    f"{name} has {rows_b} rows ({elements_b} entries), {rows} ({elements}) on the first"
                )
            elif not same_sums((total, squares), (total_b, squares_b), elements, exact=not floating):
                changes.append(f"the values of {name} differ (sum {total_b:.8g}, {total:.8g} on the first)")
        return changes


class PassChecks:
    """The passes over one data set so far, and the checks of a new pass against them.

    Every complete pass is compared with the first complete one (:meth:`check_pass`). With
    ``per_batch`` (``check_deterministic``) each batch's data and model output are also
    compared, as they come, with their first sight (:meth:`check_batch`): the same
    :class:`Fingerprint`, kept per kind and batch index.

    Example:
        >>> checks, batch = PassChecks(per_batch=True), torch.ones(2, 3)
        >>> checks.check_batch("output", 0, [("output", batch)])
        >>> checks.check_batch("output", 0, [("output", batch + 1)])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        curvops.errors.NonDeterministicDataError: Batch 0: the model output changed ...
    """

    def __init__(self, per_batch: bool = False) -> None:
        self.per_batch = per_batch
        self.first: PassRecord | None = None
        self._first_seen: dict[tuple[str, int], Fingerprint] = {}

    def check_count(self, description: str, index: int) -> None:
        """Raise when a pass reaches batch ``index`` and the first pass had no more batches."""
        expected = None if self.first is None else len(self.first)
        if index == expected:
            raise NonDeterministicDataError(
                f"{description}: data yielded more than {expected} batches on this pass, {expected} on "
                f"the first; {FIXED_LOADER}."
            )

    def check_batch(self, kind: str, index: int, named: Sequence[tuple[str, Tensor]]) -> None:
        """With ``per_batch``, raise if batch ``index``'s tensors of ``kind`` (``"data"`` or
        ``"output"``) differ from their first sight, which they become if there was none."""
        if not self.per_batch:
            return
        fingerprint = Fingerprint.of(named)
        if not self._first_seen.setdefault((kind, index), fingerprint).matches(fingerprint):
            raise NonDeterministicDataError(f"Batch {index}: {CHANGED_BATCH[kind]}.")

    def check_pass(self, description: str, record: PassRecord, any_order: bool) -> None:
        """Compare a complete, finished pass with the first (which it becomes if there was none):
        the same number of batches, and the same batches in order or, with ``any_order``, the
        same :meth:`PassRecord.totals`."""
        first = self.first
        if first is None:
            self.first = record
            return
        if len(record) != len(first):
            raise NonDeterministicDataError(
                f"{description}: data yielded {len(record)} batches on this pass, {len(first)} on the "
                f"first; {FIXED_LOADER}."
            )
        if any_order:
            changes = first.total_differences(record)
            if changes:
                raise NonDeterministicDataError(
                    f"{description}: the data differ from the first pass: {'; '.join(changes)} (random "
                    f"augmentation, or shuffling with drop_last?); {FIXED_LOADER}."
                )
            return
        for index in range(len(record)):
            if not first.same_batch(record, index):
                raise NonDeterministicDataError(
                    f"{description}: batch {index} differs from batch {index} of the first pass, and this "
                    "result depends on the order of the batches (labels drawn per batch, rows batch by "
                    f"batch, or data by position); shuffling? {FIXED_LOADER}."
                )
