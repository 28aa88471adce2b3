"""Stale operators: a model's parameters or buffers changed after an operator was built.

Parameters are *snapshotted by reference*: an operator is the curvature at the values the
parameters had when it was built. They are not copied; instead every pass checks that no
parameter or buffer of the model was changed (in place, e.g. by ``optimizer.step()``, through
``.data``, or replaced) since (:class:`ParameterSnapshot`), and raises
:class:`~curvops.errors.StaleParametersError` if one was, so a stale operator can never be
used by mistake. A stored operator remembers what it was built from
(:func:`mark_built_from`, :func:`check_built_from`). Build a new operator after the
parameters change.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..errors import StaleParametersError
from .tensor_sums import same_sums, value_sums


class ParameterSnapshot:
    """Every parameter and buffer of a model as it was when taken (not only the chosen ones:
    all shape the loss): its version counter, storage address, ``Σ t`` and ``Σ t²``.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> snapshot = ParameterSnapshot(model)
        >>> snapshot.check()
        >>> _ = model.bias.data.add_(1.0)
        >>> snapshot.check()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        curvops.errors.StaleParametersError: Parameter 'bias' changed after this operator was built; ...
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._state = self._versions()
        self._values = self._value_sums()

    def _named_tensors(self) -> list[tuple[str, Tensor]]:
        """Every parameter and buffer of the model."""
        return [*self.model.named_parameters(), *self.model.named_buffers()]

    def _versions(self) -> list[tuple[str, int, int]]:
        """``(name, version counter, storage address)`` per parameter and buffer."""
        return [(name, t._version, t.data_ptr()) for name, t in self._named_tensors()]

    def _value_sums(self) -> list[tuple[float, float]]:
        """Each parameter's and buffer's ``(Σ t, Σ t²)`` (:func:`value_sums`), in one device sync."""
        return [tuple(row) for row in value_sums([t for _, t in self._named_tensors()]).tolist()]

    def non_finite_cause(self) -> str:
        """Why an output can be non-finite from the model itself: its parameters and buffers
        holding NaN or inf (seen in their value sums from the snapshot), named; else ``""``."""
        names = [
            name
            for (name, tensor), sums in zip(self._named_tensors(), self._values, strict=True)
            if not all(math.isfinite(value) for value in sums) and not bool(torch.isfinite(tensor).all())
        ]
        if not names:
            return ""
        return (
            f" The model's {', '.join(map(repr, names))} contain NaN or inf (a diverged training step "
            "or a bad checkpoint?): restore finite values."
        )

    def check(self, skipped: Collection[str] = ()) -> None:
        """Raise :class:`StaleParametersError` if a parameter or buffer not in ``skipped`` changed
        since the snapshot, or one was added or removed.

        Catches in-place updates (``optimizer.step()``), replaced tensors, and changes through
        ``.data`` that no version counter sees (``p.data.mul_(2)``, a BatchNorm buffer): a sum
        and a sum of squares per tensor, compared up to rounding (one device sync; :func:`same_sums`).
        Changes below that tolerance, and permutations of a tensor's entries, go unnoticed.
        """
        state = self._versions()
        if [name for name, _, _ in state] != [name for name, _, _ in self._state]:
            raise StaleParametersError(
                "The model's parameters or buffers are not the ones it had when this operator was "
                "built (one was added or removed); build a new operator."
            )
        changed = [
            name
            for (name, *before), (_, *after) in zip(self._state, state, strict=True)
            if before != after and name not in skipped
        ]
        if not changed:
            changed = [
                name
                for (name, t), before, after in zip(
                    self._named_tensors(), self._values, self._value_sums(), strict=True
                )
                if name not in skipped
                and not same_sums(
                    before, after, t.numel(), exact=not (t.is_floating_point() or t.is_complex())
                )
            ]
        if changed:
            name = changed[0]
            kind = "Parameter" if name in dict(self.model.named_parameters()) else "Buffer"
            raise StaleParametersError(
                f"{kind} {name!r} changed after this operator was built; it represents the "
                "curvature at the old values. Build a new operator for the new parameters."
            )


class Fresh(Protocol):
    """What a stored operator is built from: its :meth:`check_fresh` raises
    :class:`~curvops.errors.StaleParametersError` once the model changed (a
    :class:`~curvops.nn.model.ModelData`)."""

    def check_fresh(self) -> None: ...


def mark_built_from(op: Any, model_data: Fresh) -> Any:
    """Remember on a stored operator (KFAC's blocks, a densified curvature) the model state it was
    built at, for :func:`check_built_from`; returns ``op``."""
    op._built_from = model_data
    return op


def check_built_from(op: Any) -> None:
    """Raise :class:`~curvops.errors.StaleParametersError` if ``op`` was built (see
    :func:`mark_built_from`) from a model whose parameters or buffers changed since: a stored
    operator is the curvature at the old values, so using it with the new ones (as the
    Laplace approximation or influence scores would) mixes two models.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> data = (torch.randn(4, 2), torch.randn(4, 1))
        >>> op = mark_built_from(curvops.Dense(torch.eye(3)), curvops.nn.ModelData(model, data))
        >>> check_built_from(op)
        >>> _ = model.bias.data.add_(1.0)
        >>> check_built_from(op)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        curvops.errors.StaleParametersError: Parameter 'bias' changed after this operator was built; ...
    """
    model_data = getattr(op, "_built_from", None)
    if model_data is not None:
        model_data.check_fresh()
