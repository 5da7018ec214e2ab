"""``nngeometry.object.pspace``: parameter-space matrices."""

from __future__ import annotations

import torch
from torch import Tensor

from fimntk.engine import (
    LayerCollection,
    PMatAbstract,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatEKFACBlockDiag,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatMixed,
    PMatQuasiDiag,
)
from fimntk.engine import PMatEye as EnginePMatEye

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


class PMatEye(EnginePMatEye):
    """The engine's scaled identity with NNGeometry's default scaling: a float32 ``1.0``
    whatever torch's default dtype (NNGeometry builds it at import time), so ``to_torch()`` is
    float32 unless a scaling of another dtype is given. The engine's ``PMatEye`` takes torch's
    default dtype instead."""

    def __init__(
        self,
        layer_collection: LayerCollection,
        scaling: float | Tensor | None = None,
        data: Tensor | None = None,
    ) -> None:
        if scaling is None:
            scaling = torch.tensor(1.0, dtype=torch.float32)
        super().__init__(layer_collection, scaling=scaling, data=data)

    def pinv(self, atol: float = 1e-8) -> EnginePMatEye:
        """The engine's pseudo-inverse; the zero matrix (``|s| ≤ atol``) has torch's default
        dtype, as NNGeometry's ``torch.tensor(0.0)``."""
        out = super().pinv(atol)
        if bool(out.scaling == 0):
            return PMatEye(self.layer_collection, scaling=torch.tensor(0.0))
        return out
