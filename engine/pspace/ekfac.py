"""EKFAC: Kronecker blocks in their eigenbasis, eigenvalues re-estimated (George et al. 2018)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from fimntk.engine.errors import MissingGeneratorError
from fimntk.engine.generator.accumulators import Accumulator, DenseAcc, DiagAcc
from fimntk.engine.generator.ekfac_eigenvalues import EigenDiagAcc
from fimntk.engine.pspace.blocks import DenseBlock, DiagBlock, EKronBlock
from fimntk.engine.pspace.layerwise import PMatLayerwise, kron_capable

if TYPE_CHECKING:
    from fimntk.engine.generator.jacobian import Jacobian


_E = TypeVar("_E", bound="EigenvalueCorrection")


class EigenvalueCorrection(PMatLayerwise):
    """:meth:`update_diag` for the layerwise representations with EKFAC blocks."""

    diag_updated = False

    def update_diag(self: _E, examples: Iterable, generator: Any = None) -> _E:
        """Re-estimate the eigenvalues of the EKFAC blocks (and the exact dense and diagonal
        blocks) on ``examples``; returns ``self``."""
        gen = self.generator if generator is None else generator
        if gen is None:
            raise MissingGeneratorError(
                "update_diag needs a Jacobian generator (a matrix loaded from a file or a pickle "
                "has none): pass generator=Jacobian(model, ...)"
            )
        accs: list[Accumulator] = []
        for name, blk in self.data.items():
            if isinstance(blk, EKronBlock):
                accs.append(EigenDiagAcc(name, blk.u_a, blk.u_g, blk.layout))
            elif isinstance(blk, DenseBlock):
                accs.append(DenseAcc(name))
            else:
                accs.append(DiagAcc(name))
        stats = gen.accumulate(examples, accs, stage="ekfac update_diag")
        for name, blk in list(self.data.items()):
            st = stats[name]
            if isinstance(blk, EKronBlock):
                s, rest = st if blk.thin else (st, None)
                self.data[name] = EKronBlock(blk.u_a, blk.u_g, s, blk.layout, rest)
            elif isinstance(blk, DenseBlock):
                self.data[name] = DenseBlock(st)
            else:
                self.data[name] = DiagBlock(st)
        self.diag_updated = True
        return self


class PMatEKFAC(EigenvalueCorrection):
    """Eigenvalue-corrected KFAC (George, Laurent, Bouthillier, Ballas & Vincent, NeurIPS 2018).

    Built as KFAC in the Kronecker eigenbasis ``U_G ⊗ U_A``; :meth:`update_diag` re-estimates the
    eigenvalues as ``E[(U_Gᵀ ∇W U_A)²]`` from per-example gradients, which makes the trace exact
    and the approximation at least as close to the block-diagonal Fisher in Frobenius norm.
    Damping is exact (``s + λ``).
    """

    name = "ekfac"

    def _policy(self, generator: Jacobian) -> dict[str, str]:
        return {
            e.name: "ekfac" if kron_capable(generator, e.name) else self._fallback_kind(e.name)
            for e in self.layer_collection
        }


class PMatEKFACBlockDiag(EigenvalueCorrection):
    """EKFAC blocks for the layers with Kronecker structure (Linear, Conv, Embedding, attention
    projections) and an exact dense block for every other layer (normalisation layers, layers on
    the ``torch.func`` path), whatever its size: NNGeometry's ``PMatEKFACBlockDiag``. Where a
    large layer without Kronecker structure should rather be diagonal, use :class:`PMatEKFAC`.
    """

    name = "ekfac_blockdiag"

    def _policy(self, generator: Jacobian) -> dict[str, str]:
        return {
            e.name: "ekfac" if kron_capable(generator, e.name) else "dense"
            for e in self.layer_collection
        }
