"""Statistics from a model: curvature operators defined by a network, a loss and data."""

from .coverage_report import Coverage, CoverageRow, coverage
from .curvature import GGN, EmpiricalFisher, FisherMC, Hessian, ModelCurvature
from .jacobian import Jacobian
from .kfac import EKFAC, KFAC, TKFAC
from .layers import LayerRule, register_layer_rule
from .losses import LossAdapter
from .mappings import MappingBatches, ModelInputs, mapping_batches
from .memory_estimate import MemoryEstimate, MemoryRow, memory_estimate
from .model import ModelData

__all__ = [
    "EKFAC",
    "GGN",
    "KFAC",
    "TKFAC",
    "Coverage",
    "CoverageRow",
    "EmpiricalFisher",
    "FisherMC",
    "Hessian",
    "Jacobian",
    "LayerRule",
    "LossAdapter",
    "MappingBatches",
    "MemoryEstimate",
    "MemoryRow",
    "ModelCurvature",
    "ModelData",
    "ModelInputs",
    "coverage",
    "mapping_batches",
    "memory_estimate",
    "register_layer_rule",
]
