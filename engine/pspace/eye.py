"""``PMatEye``: the scaled identity ``s·I`` of parameter space, e.g. for damping ``λ·I``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.layercollection import LayerCollection
from fimntk.engine.pspace.base import PMatAbstract, solves_maps
from fimntk.engine.vector import PVector


class PMatEye(PMatAbstract):
    """``s·I`` with ``I`` the ``(d, d)`` identity; ``data`` is the 0-d tensor ``s``. Memory 1.

    Args:
        layer_collection: the layout of the d parameters.
        scaling: ``s`` (default 1).

    Example::

        eye = PMatEye(lc, scaling=0.1)
        eye.solve(v, regul=1e-3).to_torch()   # v / (0.1 + 1e-3)
    """

    name = "eye"

    def __init__(
        self,
        layer_collection: LayerCollection,
        scaling: float | Tensor = 1.0,
        data: Tensor | None = None,
    ) -> None:
        s = torch.as_tensor(scaling if data is None else data)
        if s.dim() != 0 or not torch.isfinite(s):
            raise InvalidInputError(f"scaling must be a finite number, got {scaling!r}")
        super().__init__(layer_collection, data=s)

    @property
    def scaling(self) -> Tensor:
        """``s``, a 0-d tensor."""
        return self.data

    def _d(self) -> int:
        return self.layer_collection.numel()

    def mv(self, v: PVector) -> PVector:
        self._check_vector(v)
        return PVector(self.layer_collection, v.get_flat_representation() * self.data)

    def vTMv(self, v: PVector) -> Tensor:
        self._check_vector(v)
        x = v.get_flat_representation()
        return self.data.to(x.dtype) * torch.dot(x, x)

    def trace(self) -> Tensor:
        return self.data * self._d()

    def _frobenius_norm(self) -> Tensor:
        """``|s|·√d``."""
        return self.data.abs() * math.sqrt(self._d())

    def _rows_times(self, rows: Tensor) -> Tensor:
        return rows * self.data

    def _mm_same(self, other: PMatAbstract) -> PMatEye:
        return PMatEye(self.layer_collection, data=self.data * other.data)

    def pinv(self, atol: float = 1e-8) -> PMatEye:
        """The pseudo-inverse: ``(1/s)·I`` where ``|s| > atol``, else the zero matrix."""
        s = self.data
        return PMatEye(self.layer_collection, data=torch.where(s.abs() > atol, 1 / s, 0 * s))

    def eigenvalues(self) -> Tensor:
        return self.data.expand(self._d()).clone()

    def get_diag(self) -> Tensor:
        return self.data.expand(self._d()).clone()

    def to_torch(self) -> Tensor:
        return self.data * torch.eye(self._d(), dtype=self.data.dtype)

    @solves_maps
    def solve(self, v: PVector, regul: float = 1e-8) -> PVector:
        """``v / (s + regul)``; refused where ``s + regul = 0``."""
        self._check_vector(v)
        return PVector(self.layer_collection, v.get_flat_representation() / self._shifted(regul))

    def inv(self, regul: float = 1e-8) -> PMatEye:
        return PMatEye(self.layer_collection, data=1.0 / self._shifted(regul))

    def pow(self, exponent: float, regul: float = 0.0) -> PMatEye:
        """``((s + regul)·I)^exponent``."""
        return PMatEye(self.layer_collection, data=(self.data + regul) ** exponent)

    def _shifted(self, regul: float) -> Tensor:
        s = self.data + self._check_regul(regul)
        if s == 0:
            raise InvalidInputError(
                "s + regul = 0, so s·I + regul·I is singular: pass a regul that is not -s"
            )
        return s
