"""``PMatDiag``: the diagonal ``F_jj = (1/n) Σ_{i,k} g_{k,i,j}²`` only."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fimntk.engine.pspace.base import PMatAbstract, frobenius, solves_maps
from fimntk.engine.vector import PVector

if TYPE_CHECKING:
    from fimntk.engine.generator.jacobian import Jacobian


class PMatDiag(PMatAbstract):
    """Diagonal matrix; ``data`` is ``(d,)``. Memory ``d``; each operation is ``O(d)``."""

    name = "diag"

    def _compute(self, generator: Jacobian, examples: Iterable) -> Tensor:
        return generator.get_covariance_diag(examples)

    def mv(self, v: PVector) -> PVector:
        self._check_vector(v)
        return PVector(self.layer_collection, self.data * v.get_flat_representation())

    def vTMv(self, v: PVector) -> Tensor:
        self._check_vector(v)
        x = v.get_flat_representation()
        return (self.data * x * x).sum()

    def trace(self) -> Tensor:
        return self.data.sum()

    def _frobenius_norm(self) -> Tensor:
        return frobenius(self.data)

    def get_diag(self) -> Tensor:
        return self.data.clone()

    def _rows_times(self, rows: Tensor) -> Tensor:
        return rows * self.data

    def _mm_same(self, other: PMatAbstract) -> PMatDiag:
        return PMatDiag(self.layer_collection, data=self.data * other.data)

    def eigenvalues(self) -> Tensor:
        """The diagonal, ascending."""
        return torch.sort(self.data).values

    def to_torch(self) -> Tensor:
        return torch.diag(self.data)

    @solves_maps
    def solve(self, v: PVector, regul: float = 1e-8) -> PVector:
        self._check_vector(v)
        regul = self._check_regul(regul)
        return PVector(self.layer_collection, v.get_flat_representation() / (self.data + regul))

    def inv(self, regul: float = 1e-8) -> PMatDiag:
        regul = self._check_regul(regul)
        return PMatDiag(self.layer_collection, data=1.0 / (self.data + regul))

    def pow(self, exponent: float, regul: float = 0.0) -> PMatDiag:
        """``(M + regul·I)^exponent``."""
        return PMatDiag(self.layer_collection, data=(self.data + regul) ** exponent)

    def centered(self, mean: Tensor) -> PMatDiag:
        return PMatDiag(self.layer_collection, data=self.data - mean * mean)
