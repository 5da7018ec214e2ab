"""``PMatBlockDiag``: one dense block per layer, zeros between layers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.linalg import spd_solve
from fimntk.engine.pspace.base import PMatAbstract, frobenius, solves_maps
from fimntk.engine.vector import PVector

if TYPE_CHECKING:
    from fimntk.engine.generator.jacobian import Jacobian


class PMatBlockDiag(PMatAbstract):
    """Block-diagonal matrix; ``data`` is ``{layer: (d_l, d_l)}``. Memory ``Σ_l d_l²``."""

    name = "blockdiag"

    def _compute(self, generator: Jacobian, examples: Iterable) -> dict[str, Tensor]:
        return generator.get_covariance_layer_blocks(examples)

    def _split(self, v: PVector) -> Iterator[tuple[str, Tensor]]:
        x = v.get_flat_representation()
        for name, (start, end) in self.layer_collection.offsets().items():
            yield name, x[start:end]

    def mv(self, v: PVector) -> PVector:
        self._check_vector(v)
        return PVector(
            self.layer_collection, torch.cat([self.data[n] @ x for n, x in self._split(v)])
        )

    def vTMv(self, v: PVector) -> Tensor:
        self._check_vector(v)
        return _tensor_sum(x @ self.data[n] @ x for n, x in self._split(v))

    def trace(self) -> Tensor:
        return _tensor_sum(torch.diagonal(b).sum() for b in self.data.values())

    def _frobenius_norm(self) -> Tensor:
        sq = _tensor_sum(frobenius(b).double() ** 2 for b in self.data.values())
        return sq.sqrt().to(next(iter(self.data.values())).dtype)

    def get_diag(self) -> Tensor:
        return torch.cat([torch.diagonal(self.data[e.name]) for e in self.layer_collection])

    def eigenvalues(self) -> Tensor:
        """The union of the blocks' spectra, ascending (one ``eigvalsh`` per block)."""
        spectra = [torch.linalg.eigvalsh(self.data[e.name]) for e in self.layer_collection]
        return torch.sort(torch.cat(spectra)).values

    def to_torch(self) -> Tensor:
        return torch.block_diag(*[self.data[e.name] for e in self.layer_collection])

    def _rows_times(self, rows: Tensor) -> Tensor:
        offsets = self.layer_collection.offsets()
        return torch.cat([rows[:, s:e] @ self.data[n].t() for n, (s, e) in offsets.items()], dim=1)

    def _solve_rows(self, rows: Tensor, regul: float) -> Tensor:
        offsets = self.layer_collection.offsets()
        parts = [
            spd_solve(self.data[n], rows[:, s:e].t().to(self.data[n].dtype), regul).t()
            for n, (s, e) in offsets.items()
        ]
        return torch.cat(parts, dim=1)

    def _mm_same(self, other: PMatAbstract) -> PMatBlockDiag:
        """Block by block: ``(M N)_l = M_l N_l``."""
        return PMatBlockDiag(
            self.layer_collection, data={n: b @ other.data[n] for n, b in self.data.items()}
        )

    @solves_maps
    def solve(self, v: PVector, regul: float = 1e-8) -> PVector:
        self._check_vector(v)
        regul = self._check_regul(regul)
        return PVector(
            self.layer_collection,
            torch.cat([spd_solve(self.data[n], x, regul) for n, x in self._split(v)]),
        )

    def inv(self, regul: float = 1e-8) -> PMatBlockDiag:
        regul = self._check_regul(regul)
        out = {}
        for n, b in self.data.items():
            eye = torch.eye(b.shape[0], dtype=b.dtype, device=b.device)
            out[n] = spd_solve(b, eye, regul)
        return PMatBlockDiag(self.layer_collection, data=out)

    def centered(self, mean: Tensor) -> PMatBlockDiag:
        out = {}
        for e in self.layer_collection:
            start, end = self.layer_collection.offsets()[e.name]
            out[e.name] = self.data[e.name] - torch.outer(mean[start:end], mean[start:end])
        return PMatBlockDiag(self.layer_collection, data=out)


def _tensor_sum(terms: Iterable[Tensor]) -> Tensor:
    """``Σ terms`` in order (as ``sum`` would, without its integer start)."""
    total: Tensor | None = None
    for term in terms:
        total = term if total is None else total + term
    if total is None:
        raise InvalidInputError("the matrix has no layers")
    return total
