"""KFAC: Kronecker-factored blocks ``G ⊗ A`` per layer (Martens & Grosse 2015)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError, UnsupportedOperationError
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

    def pinv(self, atol: float = 1e-8) -> PMatLayerwise:
        """Refused: dropping the eigenvalues ``λ_G λ_A ≤ atol`` of ``G ⊗ A`` leaves the
        Kronecker family (EKFAC's basis holds it)."""
        raise UnsupportedOperationError(
            "KFAC's pseudo-inverse is not a KFAC matrix: use inv(regul), or compute "
            "PMatEKFAC (same eigenbasis) and its pinv(atol)"
        )

    def _policy(self, generator: Jacobian) -> dict[str, str]:
        return {
            e.name: "kfac" if kron_capable(generator, e.name) else self._fallback_kind(e.name)
            for e in self.layer_collection
        }

    @property
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer: (A, G)}`` for the Kronecker layers; ``A: (groups, P+1, P+1)``."""
        return {n: (b.a, b.g) for n, b in self.data.items() if isinstance(b, KronBlock)}

    def compute_eigendecomposition(
        self,
    ) -> dict[str, tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
        """Eigendecompositions of every layer's Kronecker factors, NNGeometry's way.

        ``A = U_A diag(λ_A) U_Aᵀ`` and ``G = U_G diag(λ_G) U_Gᵀ`` (ascending, as
        :func:`torch.linalg.eigh`), so the block ``G ⊗ A`` has eigenvalues ``λ_G ⊗ λ_A`` and
        eigenvectors ``U_G ⊗ U_A`` (the basis EKFAC corrects, George et al. 2018). Stored in
        :attr:`evals` ``{layer: (λ_A, λ_G)}`` and :attr:`evecs` ``{layer: (U_A, U_G)}``
        (:meth:`get_eigendecomposition`). A layer of one group gets NNGeometry's shapes,
        ``λ_A: (P+1,)``, ``U_A: (P+1, P+1)``; a grouped convolution keeps its leading
        ``groups`` axis.

        Returns:
            ``{layer: ((λ_A, U_A), (λ_G, U_G))}`` for the Kronecker layers.
        """
        out = {}
        for name, (a, g) in self.factors.items():
            if a.shape[0] == 1:
                a, g = a[0], g[0]
            eig_a, eig_g = torch.linalg.eigh(a), torch.linalg.eigh(g)
            out[name] = (
                (eig_a.eigenvalues, eig_a.eigenvectors),
                (eig_g.eigenvalues, eig_g.eigenvectors),
            )
        self.evals = {n: (ea[0], eg[0]) for n, (ea, eg) in out.items()}
        self.evecs = {n: (ea[1], eg[1]) for n, (ea, eg) in out.items()}
        return out

    def get_eigendecomposition(
        self,
    ) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, tuple[Tensor, Tensor]]]:
        """``(evals, evecs)`` of :meth:`compute_eigendecomposition` (which must run first)."""
        if not hasattr(self, "evecs"):
            raise InvalidInputError(
                "no eigendecomposition yet: call compute_eigendecomposition() first"
            )
        return self.evals, self.evecs
