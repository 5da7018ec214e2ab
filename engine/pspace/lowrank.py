"""``PMatLowRank``: ``F = Jᵀ J`` stored through ``J``, the stacked pseudo-output Jacobian.

``J`` has shape ``(K·n, d)`` (K pseudo-outputs per example, rows scaled by ``1/√n``), so memory is
``K·n·d`` and nothing ``d × d`` is formed: ``mv`` is ``Jᵀ(J v)``, ``trace`` is ``‖J‖_F²``,
``norm`` is ``‖J Jᵀ‖_F``, ``solve`` uses the Woodbury identity
``(JᵀJ + λI)⁻¹ = (I − Jᵀ(λI + JJᵀ)⁻¹J)/λ`` and eigenpairs come from the ``(K·n) × (K·n)`` Gram.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError, UnsupportedOperationError
from fimntk.engine.linalg import spd_solve
from fimntk.engine.pspace.base import PMatAbstract, solves_maps
from fimntk.engine.vector import PVector

if TYPE_CHECKING:
    from fimntk.engine.generator.jacobian import Jacobian


class PMatLowRank(PMatAbstract):
    """Low-rank representation; ``data`` is ``J`` of shape ``(K·n, d)``."""

    name = "lowrank"

    def _compute(self, generator: Jacobian, examples: Iterable) -> Tensor:
        j = generator.get_jacobian(examples)
        return j.reshape(-1, j.shape[-1]) / math.sqrt(generator.n_examples)

    def mv(self, v: PVector) -> PVector:
        self._check_vector(v)
        jv = self.data @ v.get_flat_representation()
        return PVector(self.layer_collection, self.data.t() @ jv)

    def vTMv(self, v: PVector) -> Tensor:
        self._check_vector(v)
        jv = self.data @ v.get_flat_representation()
        return (jv * jv).sum()

    def trace(self) -> Tensor:
        return (self.data * self.data).sum()

    def _frobenius_norm(self) -> Tensor:
        j = self.data.double()
        return torch.linalg.vector_norm(j @ j.t()).to(self.data.dtype)

    def get_diag(self) -> Tensor:
        return (self.data * self.data).sum(dim=0)

    def compute_eigendecomposition(self, impl: str = "svd") -> None:
        """Store the nonzero spectrum (NNGeometry's API): from the SVD ``J = U S Vᵀ`` of the
        ``(r, d)`` factor, ``JᵀJ = V S² Vᵀ`` (``min(r, d)`` pairs, descending); read them back
        with :meth:`get_eigendecomposition`."""
        if impl != "svd":
            raise UnsupportedOperationError(f"unknown impl={impl!r}: use 'svd'")
        _, s, vh = torch.linalg.svd(self.data, full_matrices=False)
        self._eig = (s * s, vh.t())

    def get_eigendecomposition(self) -> tuple[Tensor, Tensor]:
        """``(evals (k,), evecs (d, k))`` from :meth:`compute_eigendecomposition`."""
        eig = getattr(self, "_eig", None)
        if eig is None:
            raise InvalidInputError("call compute_eigendecomposition() first")
        return eig[0], eig[1]

    def _rows_times(self, rows: Tensor) -> Tensor:
        """``rows Jᵀ J``: two products through the ``r`` pseudo-output rows."""
        return (rows @ self.data.t()) @ self.data

    def eigenvalues(self) -> Tensor:
        """``JᵀJ`` and the ``(r, r)`` Gram ``J Jᵀ`` share their nonzero eigenvalues: the Gram's
        largest ``min(r, d)`` eigenvalues, with ``d − r`` zeros when ``r < d``; ascending."""
        r, d = self.data.shape
        j = self.data.double()
        evals = torch.linalg.eigvalsh(j @ j.t())[max(0, r - d) :].clamp_min(0)
        if r < d:
            evals = torch.cat([evals.new_zeros(d - r), evals])
        return evals.to(self.data.dtype)

    def to_torch(self) -> Tensor:
        return self.data.t() @ self.data

    @solves_maps
    def solve(self, v: PVector, regul: float = 1e-8) -> PVector:
        self._check_vector(v)
        regul = self._check_regul(regul)
        if regul == 0:
            raise InvalidInputError("a low-rank matrix is singular: solve needs a positive regul")
        x = v.get_flat_representation()
        j = self.data
        inner = spd_solve(j @ j.t(), j @ x, regul)
        return PVector(self.layer_collection, (x - j.t() @ inner) / regul)

    def inv(self, regul: float = 1e-8) -> PMatAbstract:
        raise UnsupportedOperationError(
            "the inverse of a low-rank matrix is not low-rank: use solve(v, regul)"
        )

    def eigenpairs(self, k: int | None = None) -> tuple[Tensor, Tensor]:
        """Top-k eigenvalues (descending) and eigenvectors ``(d, k)`` via the Gram ``J Jᵀ``."""
        evals, u = torch.linalg.eigh(self.data @ self.data.t())
        evals, u = evals.flip(0), u.flip(1)
        if k is not None:
            evals, u = evals[:k], u[:, :k]
        keep = evals > evals.max().clamp_min(0) * 1e-12
        vecs = self.data.t() @ u[:, keep] / evals[keep].sqrt()
        evals = torch.cat([evals[keep], evals.new_zeros(int((~keep).sum()))])
        vecs = torch.cat([vecs, vecs.new_zeros(vecs.shape[0], int((~keep).sum()))], dim=1)
        return evals, vecs

    def centered(self, mean: Tensor) -> PMatLowRank:
        """Centred empirical Fisher: rows ``(g_i − ḡ)/√n`` (one row per example)."""
        rows = self.data.shape[0]
        return PMatLowRank(self.layer_collection, data=self.data - mean / math.sqrt(rows))

    def __add__(self, other: PMatAbstract) -> PMatLowRank:
        self._same(other, "+")
        return PMatLowRank(self.layer_collection, data=torch.cat([self.data, other.data]))

    def __sub__(self, other: PMatAbstract) -> PMatAbstract:
        raise UnsupportedOperationError(
            "the difference of two low-rank PSD matrices is not of the form JᵀJ: convert with "
            "to_torch() and use PMatDense"
        )

    def __mul__(self, x: float) -> PMatLowRank:
        if isinstance(x, Tensor) and x.dim() == 0:
            x = x.item()
        if not isinstance(x, (int, float)):
            return NotImplemented
        if x < 0:
            raise UnsupportedOperationError(
                "a low-rank matrix JᵀJ times a negative number has no real factor J: use PMatDense"
            )
        return PMatLowRank(self.layer_collection, data=self.data * math.sqrt(x))

    __rmul__ = __mul__
