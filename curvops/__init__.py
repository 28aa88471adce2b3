"""curvops: curvature matrices of neural networks as PyTorch linear operators.

The structured linear algebra lives in :mod:`curvops.linalg`; its operators and the
errors they raise are re-exported here.
"""

from . import linalg
from .errors import (
    ConvergenceWarning,
    NotPositiveDefiniteError,
    SingularOperatorError,
    SingularOperatorWarning,
    StateDictError,
)
from .linalg import (
    BlockDiagonal,
    CGInverse,
    CurvatureOperator,
    Dense,
    Diagonal,
    Identity,
    Kronecker,
    KroneckerEigen,
    LowRankUpdate,
    Scaled,
    Sum,
    from_state_dict,
)

__version__ = "0.1.0"

__all__ = [
    "BlockDiagonal",
    "CGInverse",
    "ConvergenceWarning",
    "CurvatureOperator",
    "Dense",
    "Diagonal",
    "Identity",
    "Kronecker",
    "KroneckerEigen",
    "LowRankUpdate",
    "NotPositiveDefiniteError",
    "Scaled",
    "SingularOperatorError",
    "SingularOperatorWarning",
    "StateDictError",
    "Sum",
    "from_state_dict",
    "linalg",
]
