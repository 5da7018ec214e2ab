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
        self.t = 1
        # positions counted in G's normalisation (expand), per group: Σ_i T_i
        self.positions: Tensor | None = None
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
            group_t = _group_positions(kernel, x, a)  # (G,)
            count = a.shape[0] * group_t
            if mask is not None:  # padded positions count nowhere
                a = a * mask[:, None, :, None]
                count = mask.sum().expand_as(group_t).to(a.dtype)
            self.positions = count if self.positions is None else self.positions + count
            if reduce and a.shape[2] > 1:
                real = (
                    group_t.reshape(1, -1, 1, 1)
                    if mask is None
                    else mask.sum(1).clamp_min(1)[:, None, None, None]
                )
                a = a.sum(dim=2, keepdim=True) / real
                count = torch.full_like(group_t, a.shape[0])
            grp, p = a.shape[1], a.shape[3]
            self.rows += int(count.max())
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
        if self.a is None or self.g is None or self.positions is None:
            raise InvalidInputError("the loader yielded no examples: give it a non-empty dataset")
        a = self.a
        lower = a.shape[0] == 1 and t == 1
        if self.bias:
            p = a.shape[1] - 1
            finish_gram(a[:, :p, :p], lower)
            a[:, p, :p] = a[:, :p, p]
        else:
            finish_gram(a, lower)
        positions = n if self.approx == "reduce" else self.positions.reshape(-1, 1, 1)
        g = finish_gram(self.g, lower).div_(positions)
        return a.div_(n), g


def _group_positions(kernel: OuterKernel, x: Any, a: Tensor) -> Tensor:
    """Real positions per group ``(G,)``: ``kernel.group_positions(x)`` where the kernel pads
    groups, else ``T`` for every group of ``a (n, G, T, P)``."""
    counts = getattr(kernel, "group_positions", None)
    if counts is None:
        return a.new_full((a.shape[1],), float(a.shape[2]))
    return a.new_tensor([float(c) for c in counts(x)])


def _sequence_mask(mask: Tensor | None, n: int, positions: int) -> Tensor | None:
    """The batch's ``(n, T)`` padding mask when this layer's positions are its sequence
    positions (same n and T), in the layer's dtype; else None (e.g. a layer after pooling)."""
    if mask is None or tuple(mask.shape) != (n, positions):
        return None
    return mask
