"""Optimizers built on the curvature operators: natural gradient with KFAC, EKFAC and TKFAC,
and a zeroth-order method for when backpropagation is unaffordable."""

from .kfac import KFACOptimizer
from .zeroth_order import ZerothOrderOptimizer

__all__ = ["KFACOptimizer", "ZerothOrderOptimizer"]
