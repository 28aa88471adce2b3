"""curvops: curvature matrices of neural networks as PyTorch linear operators.

The structured linear algebra lives in :mod:`curvops.linalg`, the operators defined by a
model, a loss and data in :mod:`curvops.nn`; both are re-exported here. What they are used
for lives in :mod:`curvops.optim` (natural-gradient and zeroth-order optimizers),
:mod:`curvops.laplace` (Laplace approximations) and :mod:`curvops.influence` (influence
functions).
"""

from . import distributed, influence, laplace, linalg, nn, optim
from .compare import Comparison, compare
from .errors import (
    ConvergenceWarning,
    MemoryBudgetError,
    NonDeterministicDataError,
    NotPositiveDefiniteError,
    SingularOperatorError,
    SingularOperatorWarning,
    StaleParametersError,
    StateDictError,
)
from .laplace import Laplace
from .linalg import (
    BlockDiagonal,
    CGInverse,
    CurvatureOperator,
    Dense,
    Diagonal,
    Identity,
    Kronecker,
    KroneckerEigen,
    LinearMap,
    LowRankUpdate,
    Permuted,
    Scaled,
    Sum,
    from_state_dict,
)
from .nn import EKFAC, GGN, KFAC, TKFAC, EmpiricalFisher, FisherMC, Hessian, Jacobian, memory_estimate

__version__ = "0.1.0"

__all__ = [
    "EKFAC",
    "GGN",
    "KFAC",
    "TKFAC",
    "BlockDiagonal",
    "CGInverse",
    "Comparison",
    "ConvergenceWarning",
    "CurvatureOperator",
    "Dense",
    "Diagonal",
    "EmpiricalFisher",
    "FisherMC",
    "Hessian",
    "Identity",
    "Jacobian",
    "Kronecker",
    "KroneckerEigen",
    "Laplace",
    "LinearMap",
    "LowRankUpdate",
    "MemoryBudgetError",
    "NonDeterministicDataError",
    "NotPositiveDefiniteError",
    "Permuted",
    "Scaled",
    "SingularOperatorError",
    "SingularOperatorWarning",
    "StaleParametersError",
    "StateDictError",
    "Sum",
    "compare",
    "distributed",
    "from_state_dict",
    "influence",
    "laplace",
    "linalg",
    "memory_estimate",
    "nn",
    "optim",
]
