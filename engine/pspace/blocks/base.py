"""Per-layer blocks of the layered representations (KFAC, EKFAC, QuasiDiag, Mixed).

Each block acts on its layer's slice ``x`` of a flat vector, with the operations of
:class:`~fimntk.engine.pspace.base.PMatAbstract` restricted to one layer. Factorisations run in
float64 (a float32 solve on large Kronecker factors loses digits) and results come back in the
block's dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError, UnsupportedOperationError
from fimntk.engine.layers.layout import MatLayout


class Block(ABC):
    """One layer's block; ``tensors()`` lists what is stored (for arithmetic and files)."""

    kind: str = "block"

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]: ...

    @classmethod
    @abstractmethod
    def from_tensors(cls, t: dict[str, Tensor], layout: MatLayout | None) -> Block: ...

    @abstractmethod
    def mm(self, x: Tensor) -> Tensor:
        """``B x`` for ``x`` of shape ``(..., d_l)``."""

    @abstractmethod
    def trace(self) -> Tensor: ...

    @abstractmethod
    def frob_sq(self) -> Tensor:
        """``‖B‖_F²`` in float64."""

    @abstractmethod
    def diag(self) -> Tensor: ...

    @abstractmethod
    def solve(self, x: Tensor, regul: float) -> Tensor:
        """``(B + regul·I)⁻¹ x`` (KFAC: its damped-factor approximation, see the class)."""

    def inv(self, regul: float) -> Block:
        return self.pow(-1.0, regul)

    def product(self, other: Block) -> Block | None:
        """The block of ``B · C`` (``C`` on the same layer) where its kind is closed under
        products (Kronecker, diagonal, dense), else None (the caller then multiplies the
        dense blocks)."""
        return None

    def pow(self, exponent: float, regul: float) -> Block:
        raise UnsupportedOperationError(f"a {self.kind} block has no power")

    def pinv(self, atol: float) -> Block:
        """The pseudo-inverse, eigenvalues ``λ ≤ atol`` taken as zero
        (:func:`~fimntk.engine.linalg.pinv_values`), in the kinds closed under it (dense,
        diagonal, EKFAC)."""
        raise UnsupportedOperationError(f"a {self.kind} block has no pseudo-inverse of its kind")

    def dense(self) -> Tensor:
        """``B`` as a ``(numel, numel)`` tensor: ``mm`` of the identity's rows gives the columns
        ``B e_i`` as rows, hence the transpose (``B`` itself need not be symmetric: a product)."""
        d = self.diag().numel()
        eye = torch.eye(d, dtype=self.diag().dtype, device=self.diag().device)
        return self.mm(eye).t()

    def eigenvalues(self) -> Tensor:
        """The block's eigenvalues ``(numel,)``, any order; this default diagonalises
        :meth:`dense` (symmetrised against round-off)."""
        m = self.dense().double()
        return torch.linalg.eigvalsh((m + m.t()) / 2)

    @property
    def layout(self) -> MatLayout | None:
        return None

    def scaled(self, s: float) -> Block:
        raise UnsupportedOperationError(f"a {self.kind} block cannot be scaled")

    def combine(self, other: Block, sign: float) -> Block:
        """``self + sign · other`` for blocks of the same kind."""
        if type(other) is not type(self):
            raise UnsupportedOperationError(
                f"cannot add a {other.kind} block to a {self.kind} block: convert with "
                "to_torch() and use PMatDense"
            )
        t1, t2 = self.tensors(), other.tensors()
        return type(self).from_tensors({k: t1[k] + sign * t2[k] for k in t1}, self.layout)


def require_layout(layout: MatLayout | None) -> MatLayout:
    """The layout of a structured block, which cannot be built without one."""
    if layout is None:
        raise InvalidInputError("a structured block (kfac, ekfac, quasidiag) needs its layout")
    return layout
