"""``nngeometry.object.pspace``: parameter-space matrices."""

from fimntk.engine import (
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
)

__all__ = [
    "PMatAbstract",
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
]
