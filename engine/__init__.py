"""fimntk engine: Fisher Information Matrices and Neural Tangent Kernels of PyTorch networks.

Convention: ``F = (1/n) Σ_i E_y[∇ log p ∇ log pᵀ]`` over the n examples seen; the NTK Gram
``(c, n, c, n)`` is not divided by n. The API follows NNGeometry (George et al., 2021).
"""

from . import estimators
from .errors import (
    FimntkError,
    InvalidInputError,
    MemoryBudgetError,
    SerializationError,
    TrainModeBatchNormError,
    UnsupportedOperationError,
)
from .fspace import FMatDense
from .generator import Jacobian
from .layercollection import LayerCollection
from .memory import estimate_memory
from .metrics import FIM, NTK, EmpiricalFIM, FIM_empirical, FIM_MonteCarlo, GramMatrix
from .pspace import (
    REPRESENTATIONS,
    PMatAbstract,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatMixed,
    PMatQuasiDiag,
    resolve_representation,
)
from .serialization import load, save
from .vector import FVector, PVector

__version__ = "0.1.0"

__all__ = [
    "FIM",
    "NTK",
    "REPRESENTATIONS",
    "EmpiricalFIM",
    "FIM_MonteCarlo",
    "FIM_empirical",
    "FMatDense",
    "FVector",
    "FimntkError",
    "GramMatrix",
    "InvalidInputError",
    "Jacobian",
    "LayerCollection",
    "MemoryBudgetError",
    "PMatAbstract",
    "PMatBlockDiag",
    "PMatDense",
    "PMatDiag",
    "PMatEKFAC",
    "PMatImplicit",
    "PMatKFAC",
    "PMatLowRank",
    "PMatMixed",
    "PMatQuasiDiag",
    "PVector",
    "SerializationError",
    "TrainModeBatchNormError",
    "UnsupportedOperationError",
    "__version__",
    "estimate_memory",
    "estimators",
    "load",
    "resolve_representation",
    "save",
]
