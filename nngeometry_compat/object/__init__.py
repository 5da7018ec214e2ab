"""``nngeometry.object``: vectors, maps and matrices of parameter and function space."""

from fimntk.nngeometry.object.fspace import FMatDense
from fimntk.nngeometry.object.map import PFMapDense, PFMapImplicit
from fimntk.nngeometry.object.pspace import (
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
)
from fimntk.nngeometry.object.vector import FVector, PVector

__all__ = [
    "FMatDense",
    "FVector",
    "PFMapDense",
    "PFMapImplicit",
    "PMatBlockDiag",
    "PMatDense",
    "PMatDiag",
    "PMatEKFAC",
    "PMatEKFACBlockDiag",
    "PMatEye",
    "PMatImplicit",
    "PMatKFAC",
    "PMatLowRank",
    "PMatMixed",
    "PMatQuasiDiag",
    "PVector",
]
