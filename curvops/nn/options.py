"""One validation of the options of the Kronecker approximations, shared by the builders
(:func:`~curvops.KFAC`, ...), :class:`~curvops.optim.KFACOptimizer`, Laplace and the
influence functions; and the checks those clients share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..linalg.base import CurvatureOperator
from ..linalg.checks import check_choice, check_positive_int, check_seed
from .approximations import KRONECKER_APPROXIMATIONS, KroneckerApproximation, approximation
from .fisher import FisherType, fisher_type
from .layers import OPAQUE_MODULES, layer_rule
from .losses import LossAdapter

KFAC_APPROXIMATIONS = ("expand", "reduce")
BIAS_OPTIONS = ("separate", "joint")
CORRECTIONS = ("auto", "per-example", "gramian")
UNSUPPORTED_OPTIONS = ("error", "dense", "diagonal")
UNSUPPORTED_FIX = (
    "Leave them out of params, or pass unsupported='dense' or 'diagonal' for an exact block of their own."
)
"""The way out the builders' "no Kronecker rule" error (:func:`unsupported_error`) offers."""


@dataclass(frozen=True)
class KroneckerOptions:
    """The checked options of a Kronecker approximation (see :func:`~curvops.KFAC`).

    Example:
        >>> options = KroneckerOptions.checked("ekfac", "type-2")
        >>> options.approximation.corrected, options.fisher.name, options.what
        (True, 'type-2', "EKFAC('type-2')")
    """

    approximation: KroneckerApproximation
    fisher: FisherType
    kfac_approx: str = "expand"
    bias: str = "separate"
    mc_samples: int = 1
    seed: int = 0
    correction: str = "auto"

    @classmethod
    def checked(
        cls,
        approximation_name: str,
        fisher_type_name: str,
        kfac_approx: str = "expand",
        bias: str = "separate",
        mc_samples: int = 1,
        seed: int = 0,
        correction: str = "auto",
        allowed: tuple[str, ...] = KRONECKER_APPROXIMATIONS,
        what: str = "Kronecker approximation",
    ) -> KroneckerOptions:
        """Check every option (``ValueError``/``TypeError`` naming it) and return them as objects."""
        chosen = approximation(approximation_name, allowed, what)
        fisher = fisher_type(fisher_type_name)
        check_choice(kfac_approx, KFAC_APPROXIMATIONS, "kfac_approx")
        check_choice(bias, BIAS_OPTIONS, "bias")
        check_choice(correction, CORRECTIONS, "correction")
        check_positive_int(mc_samples, "mc_samples")
        check_seed(seed)
        chosen.check(fisher)
        return cls(chosen, fisher, kfac_approx, bias, mc_samples, seed, correction)

    @property
    def what(self) -> str:
        """``"KFAC('mc')"``: the operator and Fisher type, for messages."""
        return f"{self.approximation.label}({self.fisher.name!r})"

    def loss(self, loss_fn: Callable[[Tensor, Tensor], Tensor], what: str | None = None) -> LossAdapter:
        """``loss_fn`` checked for the Fisher type (:meth:`FisherType.loss`)."""
        return self.fisher.loss(loss_fn, what or self.what)


def unsupported_error(subject: str, others: Sequence[tuple[str, nn.Module, Any]], fix: str) -> ValueError:
    """The error for parameters of modules without a Kronecker rule: ``subject`` has no rule for
    them (listed, with the reason for modules of :data:`~curvops.nn.layers.OPAQUE_MODULES`),
    then ``fix``."""
    listing = ", ".join(f"{name!r} ({type(module).__name__})" for name, module, _ in others)
    reasons = "".join(
        f" nn.{kind.__name__} is not supported yet by KFAC: {reason}."
        for kind, reason in OPAQUE_MODULES.items()
        if any(isinstance(module, kind) for _, module, _ in others)
    )
    for name, module, _ in others:
        rule = layer_rule(module)
        reason = None if rule is None else rule.unsupported_reason(module)
        reasons += "" if reason is None else f" In {name!r}, {reason}."
    return ValueError(f"{subject} has no Kronecker rule for the parameters of {listing}.{reasons} {fix}")


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
