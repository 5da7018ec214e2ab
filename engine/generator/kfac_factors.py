"""KFAC factors ``A`` and ``G`` accumulated over a loader in one pass.

KFAC factors (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions; Eschenhagen, Immer,
Turner, Schneider & Hennig 2023 for weight sharing). With positions t (sequence steps, output
pixels) and pseudo-outputs k:

* ``expand`` (default, = KFC for convolutions): ``A = (1/n) Σ_{i,t} ã ãᵀ``,
  ``G = (1/n) Σ_{i,k} (1/T) Σ_t g gᵀ``: positions are treated as extra examples;
* ``reduce``: ``A = (1/n) Σ_i â âᵀ`` with ``â = (1/T) Σ_t ã``, ``G = (1/n) Σ_{i,k} ĝ ĝᵀ`` with
  ``ĝ = Σ_t g``: positions are aggregated first.

Both are exact (equal to the layer's Fisher block) when every example has the same input ``ã``
and ``T = 1``.
"""

from __future__ import annotations

from typing import cast

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
        self.t = 1
        self.positions = 0  # positions counted in G's normalisation (expand): Σ_i T_i
        self.bias = False
        self.rows = 0  # vectors summed into A (per group): a bound on its rank

    def update(self, bj: BatchJacobian) -> None:
        kernel = cast(OuterKernel, bj.kernels[self.name])  # KFAC layers are outer-product ones
        x, gy = bj.captured[self.name]
        reduce = self.approx == "reduce"
        mask = _sequence_mask(bj.positions_mask, x.shape[0], kernel.positions(x))
        if bj.first:  # A depends on the inputs only: once per batch, not per chunk of K
            a = kernel.inputs(x)
            self.t = a.shape[2]
            count = a.shape[0] * a.shape[2]
            if mask is not None:  # padded positions count nowhere
                a = a * mask[:, None, :, None]
                count = int(mask.sum())
            self.positions += count
            if reduce and a.shape[2] > 1:
                real = a.shape[2] if mask is None else mask.sum(1).clamp_min(1)[:, None, None, None]
                a = a.sum(dim=2, keepdim=True) / real
                count = a.shape[0]
            grp, p = a.shape[1], a.shape[3]
            self.rows += count
            layout = kernel.mat_layout()
            assert layout is not None, "KFAC layers have a matrix view"
            self.bias = layout.bias
            if self.a is None:  # the bordered matrix, filled in place (no second copy)
                self.a = a.new_zeros(grp, p + self.bias, p + self.bias)
            sum_gram(a, self.a[:, :p, :p])
            if self.bias:
                self.a[:, :p, p] += a.sum(dim=(0, 2))
                self.a[:, p, p] += count
        g = kernel.output_grads(x, gy)
        if mask is not None:
            g = g * mask[None, :, None, :, None]
        if reduce and g.shape[3] > 1:
            g = g.sum(dim=3, keepdim=True)
        self.g = sum_gram(g.reshape(-1, *g.shape[2:]), self.g)

    def result(self, n: int) -> tuple[Tensor, Tensor]:
        t = 1 if self.approx == "reduce" else self.t
        if self.a is None or self.g is None:
            raise InvalidInputError("the loader yielded no examples: give it a non-empty dataset")
        a = self.a
        lower = a.shape[0] == 1 and t == 1
        if self.bias:
            p = a.shape[1] - 1
            finish_gram(a[:, :p, :p], lower)
            a[:, p, :p] = a[:, :p, p]
        else:
            finish_gram(a, lower)
        positions = n if self.approx == "reduce" else self.positions
        g = finish_gram(self.g, self.g.shape[0] == 1 and t == 1).div_(positions)
        return a.div_(n), g


def _sequence_mask(mask: Tensor | None, n: int, positions: int) -> Tensor | None:
    """The batch's ``(n, T)`` padding mask when this layer's positions are its sequence
    positions (same n and T), in the layer's dtype; else None (e.g. a layer after pooling)."""
    if mask is None or tuple(mask.shape) != (n, positions):
        return None
    return mask
