"""Parameter-space matrices, one module per representation."""

from __future__ import annotations

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.pspace.base import PMatAbstract
from fimntk.engine.pspace.blockdiag import PMatBlockDiag
from fimntk.engine.pspace.dense import PMatDense
from fimntk.engine.pspace.diag import PMatDiag
from fimntk.engine.pspace.ekfac import EigenvalueCorrection, PMatEKFAC, PMatEKFACBlockDiag
from fimntk.engine.pspace.eye import PMatEye
from fimntk.engine.pspace.implicit import PMatImplicit
from fimntk.engine.pspace.kfac import PMatKFAC
from fimntk.engine.pspace.layerwise import PMatLayerwise
from fimntk.engine.pspace.lowrank import PMatLowRank
from fimntk.engine.pspace.mixed import PMatMixed
from fimntk.engine.pspace.quasidiag import PMatQuasiDiag

REPRESENTATIONS: dict[str, type[PMatAbstract]] = {
    cls.name: cls
    for cls in (
        PMatDense,
        PMatDiag,
        PMatBlockDiag,
        PMatQuasiDiag,
        PMatKFAC,
        PMatEKFAC,
        PMatEKFACBlockDiag,
        PMatMixed,
        PMatLowRank,
        PMatImplicit,
    )
}


def resolve_representation(rep: str | type[PMatAbstract]) -> type[PMatAbstract]:
    """A representation class from a class, its short name (``"kfac"``) or class name."""
    if isinstance(rep, type) and issubclass(rep, PMatAbstract):
        return rep
    if isinstance(rep, str):
        key = rep.lower().removeprefix("pmat").replace("_", "").replace("-", "")
        for name, cls in REPRESENTATIONS.items():
            if name.replace("_", "") == key:
                return cls
    raise InvalidInputError(
        f"unknown representation {rep!r}; use one of {sorted(REPRESENTATIONS)} or a PMat class"
    )


__all__ = [
    "REPRESENTATIONS",
    "EigenvalueCorrection",
    "PMatAbstract",
    "PMatBlockDiag",
    "PMatDense",
    "PMatDiag",
    "PMatEKFAC",
    "PMatEKFACBlockDiag",
    "PMatEye",
    "PMatImplicit",
    "PMatKFAC",
    "PMatLayerwise",
    "PMatLowRank",
    "PMatMixed",
    "PMatQuasiDiag",
    "resolve_representation",
]
