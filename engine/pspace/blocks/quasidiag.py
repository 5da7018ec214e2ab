"""Quasi-diagonal per-layer block (Ollivier 2015)."""

from __future__ import annotations

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.layers.layout import MatLayout
from fimntk.engine.pspace.blocks.base import Block, require_layout


class QuasiDiagBlock(Block):
    """Ollivier (2015), "Riemannian metrics for neural networks I": the diagonal plus, for each
    output unit q, the interactions between its bias and the weights of its row.

    ``d: (groups, Q, P+1)`` is the diagonal in matrix view; ``c: (groups, Q, P)`` the entries
    ``F[W_qp, b_q]``. Solves are exact (one arrowhead system per output unit).
    """

    kind = "quasidiag"

    def __init__(self, d: Tensor, c: Tensor, layout: MatLayout) -> None:
        self.d, self.c, self._layout = d, c, layout

    @property
    def layout(self) -> MatLayout:
        return self._layout

    def tensors(self) -> dict[str, Tensor]:
        return {"d": self.d, "c": self.c}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], layout: MatLayout | None) -> QuasiDiagBlock:
        return cls(t["d"], t["c"], require_layout(layout))

    def mm(self, x: Tensor) -> Tensor:
        m = self._layout.to_mat(x)
        w, b = m[..., :-1], m[..., -1:]
        yw = self.d[..., :-1] * w + self.c * b
        yb = self.d[..., -1:] * b + (self.c * w).sum(-1, keepdim=True)
        return self._layout.from_mat(torch.cat([yw, yb], dim=-1))

    def trace(self) -> Tensor:
        return self.d.sum()

    def frob_sq(self) -> Tensor:
        return (self.d.double() ** 2).sum() + 2 * (self.c.double() ** 2).sum()

    def diag(self) -> Tensor:
        return self._layout.from_mat(self.d)

    def solve(self, x: Tensor, regul: float) -> Tensor:
        m = self._layout.to_mat(x)
        vw, vb = m[..., :-1], m[..., -1:]
        dw, db = self.d[..., :-1] + regul, self.d[..., -1:] + regul
        if (dw <= 0).any() or (db <= 0).any():
            raise InvalidInputError("the quasi-diagonal matrix is singular: use a positive regul")
        schur = db - (self.c**2 / dw).sum(-1, keepdim=True)
        xb = (vb - (self.c * vw / dw).sum(-1, keepdim=True)) / schur
        xw = (vw - self.c * xb) / dw
        return self._layout.from_mat(torch.cat([xw, xb], dim=-1))

    def scaled(self, s: float) -> QuasiDiagBlock:
        return QuasiDiagBlock(self.d * s, self.c * s, self._layout)
