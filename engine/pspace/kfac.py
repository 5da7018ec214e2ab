"""KFAC: Kronecker-factored blocks ``G ⊗ A`` per layer (Martens & Grosse 2015)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from fimntk.engine.pspace.blocks import KronBlock
from fimntk.engine.pspace.layerwise import PMatLayerwise, kron_capable

if TYPE_CHECKING:
    from fimntk.engine.generator.jacobian import Jacobian


class PMatKFAC(PMatLayerwise):
    """Kronecker-factored approximate curvature (Martens & Grosse 2015; KFC, Grosse & Martens 2016).

    Per Linear/Conv/Embedding layer ``F_l ≈ G ⊗ A`` in the ``[W | b]`` matrix view, with
    ``A = (1/n) Σ ã ãᵀ`` (inputs with a 1 appended for the bias) and ``G = (1/n) Σ_k g gᵀ``
    (output gradients of the pseudo-outputs); positions follow ``kfac_approx`` ("expand", default,
    or "reduce"; :mod:`fimntk.engine.generator.kfac_factors`). Other layers get exact blocks.
    ``solve``, ``inv`` and ``pow`` damp the factors with the π-correction.
    """

    name = "kfac"

    def _policy(self, generator: Jacobian) -> dict[str, str]:
        return {
            e.name: "kfac" if kron_capable(generator, e.name) else self._fallback_kind(e.name)
            for e in self.layer_collection
        }

    @property
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer: (A, G)}`` for the Kronecker layers; ``A: (groups, P+1, P+1)``."""
        return {n: (b.a, b.g) for n, b in self.data.items() if isinstance(b, KronBlock)}
