"""Checks of the options that curvops' clients (Laplace, influence functions) take."""

from __future__ import annotations

from typing import Any

from ..linalg.base import CurvatureOperator
from ..linalg.checks import check_choice


def check_curvature(curvature: Any, names: tuple[str, ...]) -> None:
    """Raise unless ``curvature`` is one of ``names`` or an operator (a prebuilt curvature).

    Example:
        >>> check_curvature("kfac", ("kfac", "full"))
        >>> check_curvature("kfca", ("kfac", "full"))
        Traceback (most recent call last):
        ...
        ValueError: Unknown curvature 'kfca'; choose one of ('kfac', 'full').
    """
    if isinstance(curvature, str):
        check_choice(curvature, names, "curvature")
    elif not isinstance(curvature, CurvatureOperator):
        raise TypeError(
            f"curvature must be one of {names} or a curvops operator, got {type(curvature).__name__}."
        )
