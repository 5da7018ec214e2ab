"""Diagonal per-layer block."""

from __future__ import annotations

import torch
from torch import Tensor

from fimntk.engine.layers.layout import MatLayout
from fimntk.engine.linalg import pinv_values
from fimntk.engine.pspace.blocks.base import Block


class DiagBlock(Block):
    """A diagonal block ``(d_l,)``."""

    kind = "diag"

    def __init__(self, d: Tensor) -> None:
        self.d = d

    def tensors(self) -> dict[str, Tensor]:
        return {"d": self.d}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], layout: MatLayout | None = None) -> DiagBlock:
        return cls(t["d"])

    def mm(self, x: Tensor) -> Tensor:
        return x * self.d

    def trace(self) -> Tensor:
        return self.d.sum()

    def frob_sq(self) -> Tensor:
        return (self.d.double() ** 2).sum()

    def diag(self) -> Tensor:
        return self.d.clone()

    def dense(self) -> Tensor:
        return torch.diag(self.d)

    def eigenvalues(self) -> Tensor:
        return self.d.clone()

    def product(self, other: Block) -> Block | None:
        if not isinstance(other, DiagBlock):
            return super().product(other)
        return DiagBlock(self.d * other.d)

    def solve(self, x: Tensor, regul: float) -> Tensor:
        return x / (self.d + regul)

    def pow(self, exponent: float, regul: float) -> DiagBlock:
        return DiagBlock((self.d + regul) ** exponent)

    def pinv(self, atol: float) -> DiagBlock:
        return DiagBlock(pinv_values(self.d, atol))

    def scaled(self, s: float) -> DiagBlock:
        return DiagBlock(self.d * s)
