"""Hyperparameters that may be schedules, and their checks."""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real

import torch
from torch import Tensor

from ..linalg.checks import check_nonnegative

Schedule = float | Callable[[int], float]


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (one device synchronisation)."""
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def check_schedule(value: Schedule, what: str) -> Schedule:
    """A number ``>= 0`` or a callable ``step -> number`` (checked when it is evaluated)."""
    return value if callable(value) else check_nonnegative(value, what)


def evaluate(schedule: Schedule, step: int, what: str, current: float | None = None) -> float:
    """The value at ``step``: the schedule's, or for a number ``current`` (so a
    ``torch.optim.lr_scheduler`` that edits ``param_groups`` is followed) or the number."""
    if callable(schedule):
        return check_nonnegative(schedule(step), f"{what}({step})")
    return check_nonnegative(schedule if current is None else current, what)


def check_fraction(value: object, what: str) -> float:
    """A number in ``[0, 1)`` (a decay or momentum)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < 1:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}.")
    return float(value)
