"""Statistics from a model: curvature operators defined by a network, a loss and data."""

from .curvature import GGN, EmpiricalFisher, FisherMC, Hessian, ModelCurvature
from .jacobian import Jacobian
from .kfac import EKFAC, KFAC, TKFAC
from .losses import LossAdapter
from .model import ModelData

__all__ = [
    "EKFAC",
    "GGN",
    "KFAC",
    "TKFAC",
    "EmpiricalFisher",
    "FisherMC",
    "Hessian",
    "Jacobian",
    "LossAdapter",
    "ModelCurvature",
    "ModelData",
]
