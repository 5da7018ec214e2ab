"""Dense per-layer block: the layer's exact matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from fimntk.engine.layers.layout import MatLayout
from fimntk.engine.linalg import spd_solve, sym_pinv
from fimntk.engine.pspace.blocks.base import Block


class DenseBlock(Block):
    """An exact ``(d_l, d_l)`` block."""

    kind = "dense"

    def __init__(self, m: Tensor) -> None:
        self.m = m

    def product(self, other: Block) -> Block | None:
        if not isinstance(other, DenseBlock):
            return super().product(other)
        return DenseBlock(self.m @ other.m)

    def tensors(self) -> dict[str, Tensor]:
        return {"m": self.m}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], layout: MatLayout | None = None) -> DenseBlock:
        return cls(t["m"])

    def mm(self, x: Tensor) -> Tensor:
        return x @ self.m

    def trace(self) -> Tensor:
        return torch.diagonal(self.m).sum()

    def frob_sq(self) -> Tensor:
        return (self.m.double() ** 2).sum()

    def diag(self) -> Tensor:
        return torch.diagonal(self.m).clone()

    def dense(self) -> Tensor:
        return self.m

    def solve(self, x: Tensor, regul: float) -> Tensor:
        return (
            spd_solve(self.m, x.t() if x.dim() > 1 else x, regul).t()
            if x.dim() > 1
            else spd_solve(self.m, x, regul)
        )

    def pow(self, exponent: float, regul: float) -> DenseBlock:
        evals, evecs = torch.linalg.eigh(self.m.double())
        evals = (evals.clamp_min(0) + regul) ** exponent
        return DenseBlock(((evecs * evals) @ evecs.t()).to(self.m.dtype))

    def pinv(self, atol: float) -> DenseBlock:
        return DenseBlock(sym_pinv(self.m, atol))

    def scaled(self, s: float) -> DenseBlock:
        return DenseBlock(self.m * s)
