"""KFAC factors ``A`` and ``G`` accumulated over a loader in one pass.

KFAC factors (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions; Eschenhagen, Immer,
Turner, Schneider & Hennig 2023 for weight sharing). With positions t (sequence steps, output
pixels) and pseudo-outputs k:

* ``expand`` (default, = KFC for convolutions): ``A = (1/n) Σ_{i,t} ã ãᵀ``,
  ``G = (1/n) Σ_{i,k} (1/T) Σ_t g gᵀ``: positions are treated as extra examples;
* ``reduce``: ``A = (1/n) Σ_i â âᵀ`` with ``â = (1/T) Σ_t ã``, ``G = (1/n) Σ_{i,k} ĝ ĝᵀ`` with
  ``ĝ = Σ_t g``: positions are aggregated first.

Both are exact (equal to the layer's Fisher block) when every example has the same input ``ã``
and ``T = 1``. A kernel whose groups have different numbers of positions (attention's query and
key projections, ``L ≠ S``) pads them with zeros to one ``T`` and says how many are real
(``group_positions``); ``T`` above is then each group's own.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.generator.accumulators import (
    Accumulator,
    finish_gram,
    sum_gram,
)
from fimntk.engine.generator.batch_jacobian import BatchJacobian
from fimntk.engine.layers.outer_product import OuterKernel

KFAC_APPROX = ("expand", "reduce")


class KronAcc(Accumulator):
    """KFAC factors ``(A, G)`` of one layer (see the module docstring for the conventions).

    The bias is folded in without building ``ã = [a; 1]``: ``A`` is bordered by ``Σ a`` and the
    count of positions, ``[[Σ a aᵀ, Σ a], [Σ aᵀ, Σ 1]]``.
    """

    def __init__(self, name: str, approx: str = "expand") -> None:
        super().__init__(name)
        self.approx = approx
        self.a: Tensor | None = None
        self.g: Tensor | None = None
        self.t: Tensor | None = None  # positions per group (G,), of the last batch
        self.bias = False
        self.rows = 0  # vectors summed into A (per group): a bound on its rank

    def update(self, bj: BatchJacobian) -> None:
        kernel = cast(OuterKernel, bj.kernels[self.name])  # KFAC layers are outer-product ones
        x, gy = bj.captured[self.name]
        reduce = self.approx == "reduce"
        if bj.first:  # A depends on the inputs only: once per batch, not per chunk of K
            a = kernel.inputs(x)
            grp, p = a.shape[1], a.shape[3]
            self.t = _group_positions(kernel, x, a)
            if reduce and a.shape[2] > 1:
                a = a.sum(dim=2, keepdim=True) / self.t.reshape(1, grp, 1, 1)
            self.rows += a.shape[0] * a.shape[2]
            layout = kernel.mat_layout()
            assert layout is not None, "KFAC layers have a matrix view"
            self.bias = layout.bias
            if self.a is None:  # the bordered matrix, filled in place (no second copy)
                self.a = a.new_zeros(grp, p + self.bias, p + self.bias)
            sum_gram(a, self.a[:, :p, :p])
            if self.bias:
                self.a[:, :p, p] += a.sum(dim=(0, 2))
                self.a[:, p, p] += a.shape[0] * (1 if a.shape[2] == 1 else self.t)
        g = kernel.output_grads(x, gy)
        if reduce and g.shape[3] > 1:
            g = g.sum(dim=3, keepdim=True)
        self.g = sum_gram(g.reshape(-1, *g.shape[2:]), self.g)

    def result(self, n: int) -> tuple[Tensor, Tensor]:
        if self.a is None or self.g is None or self.t is None:
            raise InvalidInputError("the loader yielded no examples: give it a non-empty dataset")
        t = torch.ones_like(self.t) if self.approx == "reduce" else self.t
        lower = self.a.shape[0] == 1 and bool((t == 1).all())
        a = self.a
        if self.bias:
            p = a.shape[1] - 1
            finish_gram(a[:, :p, :p], lower)
            a[:, p, :p] = a[:, :p, p]
        else:
            finish_gram(a, lower)
        g = finish_gram(self.g, lower).div_(n * t.reshape(-1, 1, 1))
        return a.div_(n), g


def _group_positions(kernel: OuterKernel, x: Any, a: Tensor) -> Tensor:
    """Real positions per group ``(G,)``: ``kernel.group_positions(x)`` where the kernel pads
    groups, else ``T`` for every group of ``a (n, G, T, P)``."""
    counts = getattr(kernel, "group_positions", None)
    if counts is None:
        return a.new_full((a.shape[1],), float(a.shape[2]))
    return a.new_tensor([float(c) for c in counts(x)])
