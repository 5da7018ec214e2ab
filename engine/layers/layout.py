"""Matrix view of a layer's flat parameters: ``(groups, Q, P [+1 bias column])``.

Kronecker-factored and quasi-diagonal representations act on a layer's gradient as a matrix
whose rows are output units and whose columns are input units, with the bias as one more column
(the "homogeneous coordinates" of Martens & Grosse 2015). For a Linear layer it is ``[W | b]``
of shape ``(1, out, in + 1)``; for a Conv2d with g groups it is ``(g, out/g, in/g·kh·kw + 1)``;
for an Embedding, whose weight is ``(vocab, dim)``, the weight is stored transposed; for a
normalisation layer it is ``(1, C, 2)`` (scale, shift).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MatLayout:
    """How a flat layer vector ``(..., d_l)`` maps to ``(..., groups, q, p + bias)``."""

    groups: int
    q: int
    p: int
    bias: bool
    transposed: bool = False

    @property
    def cols(self) -> int:
        return self.p + int(self.bias)

    @property
    def numel(self) -> int:
        return self.groups * self.q * self.p + (self.groups * self.q if self.bias else 0)

    def to_mat(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        dw = self.groups * self.q * self.p
        w = x[..., :dw]
        if self.transposed:
            w = w.reshape(*lead, self.groups, self.p, self.q).transpose(-1, -2)
        else:
            w = w.reshape(*lead, self.groups, self.q, self.p)
        if not self.bias:
            return w
        b = x[..., dw:].reshape(*lead, self.groups, self.q, 1)
        return torch.cat([w, b], dim=-1)

    def from_mat(self, m: Tensor) -> Tensor:
        lead = m.shape[:-3]
        w = m[..., : self.p]
        w = w.transpose(-1, -2) if self.transposed else w
        w = w.reshape(*lead, -1)
        if not self.bias:
            return w
        return torch.cat([w, m[..., self.p].reshape(*lead, -1)], dim=-1)
