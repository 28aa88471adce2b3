"""Argument checks shared by every part of curvops: numbers, integers, flags, seeds, choices.

Each returns the checked value (as the type it stands for) or raises an exception that names
the argument and what it must be.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
from torch import Tensor


def _scalar(value: Any) -> Any:
    """A one-element tensor as its Python number; anything else unchanged."""
    return value.item() if isinstance(value, Tensor) and value.numel() == 1 else value


def check_nonnegative(value: Any, what: str) -> float:
    """Return ``value`` as a float, raising ``ValueError`` unless it is a finite number ``>= 0``."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}.")
    return float(value)


def check_positive(value: Any, what: str) -> float:
    """Return ``value`` as a float, raising ``ValueError`` unless it is a finite number ``> 0``."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}.")
    return float(value)


def check_positive_int(value: Any, what: str) -> int:
    """Return ``value``, raising ``ValueError`` unless it is an integer ``>= 1`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}.")
    return value


def check_bool(value: Any, what: str) -> bool:
    """Return ``value``, raising ``TypeError`` unless it is a ``bool`` (``"False"`` or ``0`` would
    silently mean something else)."""
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {value!r}.")
    return value


def check_int(value: Any, what: str) -> int:
    """Return ``value``, raising ``TypeError`` unless it is an integer (not a bool or a float)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an integer, got {value!r}.")
    return value


def check_seed(seed: Any, what: str = "seed") -> int:
    """Return ``seed``, raising ``TypeError`` unless it is an integer (``1.5`` or ``True`` would
    fail at the first draw or silently mean ``1``)."""
    return check_int(seed, what)


def check_generator(generator: Any, what: str = "generator") -> torch.Generator | None:
    """Return ``generator``, raising ``TypeError`` unless it is ``None`` or a ``torch.Generator``
    (for a seed ``s`` pass ``torch.Generator().manual_seed(s)``)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{what} must be None or a torch.Generator, got {generator!r}; for a seed s pass "
            "torch.Generator().manual_seed(s)."
        )
    return generator


def check_damping(damping: float) -> float:
    """Return ``damping`` as a float, raising ``ValueError`` unless it is finite and ``>= 0``."""
    return check_nonnegative(damping, "damping")


def check_power(p: float) -> float:
    """Return the exponent ``p`` as a float, raising ``ValueError`` unless it is a finite real."""
    p = _scalar(p)
    if isinstance(p, bool) or not isinstance(p, Real) or not math.isfinite(p):
        raise ValueError(f"The power p must be a finite real number, got {p!r}.")
    return float(p)


def check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    """Raise ``ValueError`` naming the options unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"Unknown {what} {value!r}; choose one of {allowed}.")
