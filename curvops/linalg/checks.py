"""Argument checks shared by every part of curvops: numbers, integers, flags, seeds, choices,
matrices.

Each returns the checked value (as the type it stands for) or raises an exception that names
the argument and what it must be.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from .precision import validation_eps


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


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite: its sum is finite only if they all are (NaN
    and ±inf propagate), so one reduction answers, and only a sum of finite entries that overflows
    needs the entry-wise look (and its ``numel`` booleans).

    Example:
        >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
        >>> all_finite(torch.full((4,), 3e38))  # the sum overflows; the entries are finite
        True
    """
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_matrix(matrix: Any, name: str, symmetric: bool, allow_diagonal: bool = False) -> None:
    """Raise a clear error unless ``matrix`` is a finite, square, floating-point ``[n, n]`` tensor.

    With ``symmetric=True`` it must also equal its transpose up to ``sqrt(eps)`` relative
    (``eps`` of its dtype, or of the dtype it was converted from: see
    :func:`~curvops.linalg.precision.validation_eps`).
    With ``allow_diagonal=True`` a finite floating-point 1-D ``[n]`` tensor (the diagonal of a
    diagonal matrix, symmetric by construction) passes too.
    """
    vector = allow_diagonal and isinstance(matrix, Tensor) and matrix.ndim == 1
    if not vector and (
        not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]
    ):
        shape = list(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        expected = "a square [n, n] tensor" + (" or a 1-D [n] diagonal" if allow_diagonal else "")
        raise ValueError(f"{name} must be {expected}, got {shape}.")
    if not matrix.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {matrix.dtype}.")
    if not all_finite(matrix):
        raise ValueError(f"{name} contains NaN or inf.")
    if symmetric and not vector and matrix.numel():
        tol = math.sqrt(validation_eps(matrix.dtype)) * matrix.abs().max()
        if bool((matrix - matrix.T).abs().max() > tol):
            raise ValueError(f"{name} is not symmetric; curvops operators are symmetric.")


def check_same_place(tensors: Sequence[Tensor], what: str) -> tuple[torch.dtype, torch.device]:
    """The common dtype and device of ``tensors``; a clear error if they differ."""
    dtypes = {t.dtype for t in tensors}
    devices = {t.device for t in tensors}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"All {what} must share one dtype and device, got dtypes {sorted(map(str, dtypes))} "
            f"and devices {sorted(map(str, devices))}."
        )
    return tensors[0].dtype, tensors[0].device
