"""Structured linear algebra: symmetric operators that know their own fast paths.

No neural-network code lives here; every operator is tested against ``torch.linalg`` on
its dense matrix.
"""

from .base import CurvatureOperator
from .blocks import BlockLayout, block_layout
from .composite import BlockDiagonal, Cast, Scaled, Sum
from .dense import Dense
from .diagonal import Diagonal, Identity
from .estimators import (
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_diagonal,
    hutchpp_trace,
    lanczos,
    lanczos_basis,
    rademacher,
    ritz_pairs,
    slq_logdet,
)
from .factor import Factor
from .grouped import GroupedKronecker, GroupedKroneckerEigen
from .kronecker import Kronecker, KroneckerEigen
from .linear_map import LinearMap, Transposed
from .lowrank import LowRankUpdate
from .matrix_functions import LanczosPower
from .memory import get_memory_budget, memory_budget, set_memory_budget
from .permuted import Permuted
from .precision import computation_dtype
from .solvers import CGInverse, cg
from .state import from_state_dict

__all__ = [
    "BlockDiagonal",
    "BlockLayout",
    "CGInverse",
    "Cast",
    "CurvatureOperator",
    "Dense",
    "Diagonal",
    "Factor",
    "GroupedKronecker",
    "GroupedKroneckerEigen",
    "Identity",
    "Kronecker",
    "KroneckerEigen",
    "LanczosPower",
    "LinearMap",
    "LowRankUpdate",
    "Permuted",
    "Scaled",
    "Sum",
    "Transposed",
    "block_layout",
    "cg",
    "computation_dtype",
    "from_state_dict",
    "get_memory_budget",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_diagonal",
    "hutchpp_trace",
    "lanczos",
    "lanczos_basis",
    "memory_budget",
    "rademacher",
    "ritz_pairs",
    "set_memory_budget",
    "slq_logdet",
]
