"""fimntk engine: Fisher Information Matrices and Neural Tangent Kernels of PyTorch networks.

Convention: ``F = (1/n) Σ_i E_y[∇ log p ∇ log pᵀ]`` over the n examples seen; the NTK Gram
``(c, n, c, n)`` is not divided by n. The API follows NNGeometry (George et al., 2021).
"""

from fimntk.engine import estimators
from fimntk.engine.errors import (
    FimntkError,
    InvalidInputError,
    MemoryBudgetError,
    MissingGeneratorError,
    SerializationError,
    TrainModeBatchNormError,
    UnsupportedOperationError,
)
from fimntk.engine.fspace import FMatDense
from fimntk.engine.generator import Jacobian
from fimntk.engine.hessian import Hessian, PMatHessianImplicit
from fimntk.engine.layercollection import LayerCollection
from fimntk.engine.memory import estimate_memory
from fimntk.engine.metrics import FIM, NTK, EmpiricalFIM, FIM_empirical, FIM_MonteCarlo, GramMatrix
from fimntk.engine.pfmap import PFMapDense, PFMapImplicit, random_pfmap
from fimntk.engine.pspace import (
    REPRESENTATIONS,
    EigenvalueCorrection,
    PMatAbstract,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatEKFACBlockDiag,
    PMatEye,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatMixed,
    PMatQuasiDiag,
    resolve_representation,
)
from fimntk.engine.serialization import load, save
from fimntk.engine.vector import FVector, PVector
from fimntk.version import __version__

__all__ = [
    "FIM",
    "NTK",
    "REPRESENTATIONS",
    "EigenvalueCorrection",
    "EmpiricalFIM",
    "FIM_MonteCarlo",
    "FIM_empirical",
    "FMatDense",
    "FVector",
    "FimntkError",
    "GramMatrix",
    "Hessian",
    "InvalidInputError",
    "Jacobian",
    "LayerCollection",
    "MemoryBudgetError",
    "MissingGeneratorError",
    "PFMapDense",
    "PFMapImplicit",
    "PMatAbstract",
    "PMatBlockDiag",
    "PMatDense",
    "PMatDiag",
    "PMatEKFAC",
    "PMatEKFACBlockDiag",
    "PMatEye",
    "PMatHessianImplicit",
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
    "random_pfmap",
    "resolve_representation",
    "save",
]
