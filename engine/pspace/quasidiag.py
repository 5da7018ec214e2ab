"""Quasi-diagonal representation (Ollivier 2015)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fimntk.engine.pspace.layerwise import PMatLayerwise

if TYPE_CHECKING:
    from fimntk.engine.generator.jacobian import Jacobian


class PMatQuasiDiag(PMatLayerwise):
    """Quasi-diagonal (Ollivier 2015): the diagonal plus each bias's interactions with its row.

    Layers with a bias and a matrix view (Linear, Conv, Embedding has none, normalisation layers)
    get a :class:`~fimntk.engine.pspace.blocks.QuasiDiagBlock`; the others their diagonal.
    """

    name = "quasidiag"

    def _policy(self, generator: Jacobian) -> dict[str, str]:
        out = {}
        for e in self.layer_collection:
            k = generator.kernel(e.name)
            layout = k.mat_layout() if k is not None else None
            out[e.name] = "quasidiag" if layout is not None and layout.bias else "diag"
        return out
