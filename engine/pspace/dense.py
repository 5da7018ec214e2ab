"""``PMatDense``: the full ``d × d`` matrix, ``F = (1/n) Σ_{i,k} g_{k,i} g_{k,i}ᵀ``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError, UnsupportedOperationError
from fimntk.engine.linalg import spd_solve
from fimntk.engine.partial_eigen import Progress, top_eigenpairs
from fimntk.engine.pspace.base import PMatAbstract, frobenius, solves_maps
from fimntk.engine.vector import PVector

if TYPE_CHECKING:
    from fimntk.engine.generator.jacobian import Jacobian


class PMatDense(PMatAbstract):
    """Dense matrix; ``data`` is ``(d, d)``. Memory ``d²``; exact for every operation."""

    name = "dense"

    def _compute(self, generator: Jacobian, examples: Iterable) -> Tensor:
        return generator.get_covariance_matrix(examples)

    def mv(self, v: PVector) -> PVector:
        self._check_vector(v)
        return PVector(self.layer_collection, self.data @ v.get_flat_representation())

    def vTMv(self, v: PVector) -> Tensor:
        self._check_vector(v)
        x = v.get_flat_representation()
        return x @ self.data @ x

    def trace(self) -> Tensor:
        return torch.diagonal(self.data).sum()

    def _frobenius_norm(self) -> Tensor:
        return frobenius(self.data)

    def get_diag(self) -> Tensor:
        return torch.diagonal(self.data).clone()

    def to_torch(self) -> Tensor:
        return self.data

    def _rows_times(self, rows: Tensor) -> Tensor:
        return rows @ self.data.t()

    def compute_eigendecomposition(self, impl: str = "eigh") -> None:
        """Store all eigenpairs (NNGeometry's API): ``impl="eigh"`` (ascending) or ``"svd"``
        (``M = V S Vᵀ`` for the symmetric PSD ``M``, descending); read them back with
        :meth:`get_eigendecomposition`. :meth:`eigenpairs` gives the top k instead."""
        if impl == "eigh":
            self._eig = torch.linalg.eigh(self.data)
        elif impl == "svd":
            _, s, vh = torch.linalg.svd(self.data)
            self._eig = (s, vh.t())
        else:
            raise UnsupportedOperationError(f"unknown impl={impl!r}: use 'eigh' or 'svd'")

    def get_eigendecomposition(self) -> tuple[Tensor, Tensor]:
        """``(evals (d,), evecs (d, d))`` from :meth:`compute_eigendecomposition`."""
        eig = getattr(self, "_eig", None)
        if eig is None:
            raise InvalidInputError("call compute_eigendecomposition() first")
        return eig[0], eig[1]

    def _solve_rows(self, rows: Tensor, regul: float) -> Tensor:
        return spd_solve(self.data, rows.t().to(self.data.dtype), regul).t()

    def _mm_same(self, other: PMatAbstract) -> PMatDense:
        return PMatDense(self.layer_collection, data=self.data @ other.data)

    @solves_maps
    def solve(self, v: PVector, regul: float = 1e-8) -> PVector:
        self._check_vector(v)
        regul = self._check_regul(regul)
        return PVector(
            self.layer_collection, spd_solve(self.data, v.get_flat_representation(), regul)
        )

    def inv(self, regul: float = 1e-8) -> PMatDense:
        regul = self._check_regul(regul)
        eye = torch.eye(self.data.shape[0], dtype=self.data.dtype, device=self.data.device)
        return PMatDense(self.layer_collection, data=spd_solve(self.data, eye, regul))

    def eigenpairs(
        self, k: int | None = None, progress: Progress | None = None
    ) -> tuple[Tensor, Tensor]:
        """Top-k eigenvalues (descending) and eigenvectors as columns ``(d, k)``.

        With ``k ≤ d / 8``, Lanczos on the matrix (:func:`~fimntk.engine.partial_eigen.
        top_eigenpairs`) instead of a full eigendecomposition; ``progress(done, total, stage)``
        is called after each product (it may raise to stop); otherwise it is called once,
        before the full eigendecomposition (which cannot stop half-way).
        """
        d = self.data.shape[0]
        if k is not None and 8 * k <= d:
            return top_eigenpairs(self.data, k, progress)
        if progress is not None:
            progress(0, 1, "full eigendecomposition")
        evals, evecs = torch.linalg.eigh(self.data)
        evals, evecs = evals.flip(0), evecs.flip(1)
        if k is not None:
            evals, evecs = evals[:k], evecs[:, :k]
        return evals, evecs

    def centered(self, mean: Tensor) -> PMatDense:
        return PMatDense(self.layer_collection, data=self.data - torch.outer(mean, mean))
