"""Symmetric rank-k accumulation ``M += Jᵀ J`` computing only the lower triangle.

``Jᵀ J`` is symmetric, so a strip of rows ``[s, e)`` needs only columns ``[0, e)``: with s
strips of height b = d/s the products cost ``(s + 1)/(2s)`` of a full one, with ordinary matrix
products (torch has no ``syrk``). Narrower strips save more flops but run as smaller products;
:func:`strip_height` balances the two (measured on one CPU core: a ``(250, 784)`` J takes 0.62×
the time of the full product, a ``(250, 8193)`` J 0.54×).
"""

from __future__ import annotations

from torch import Tensor

#: Below this size a single full product is used.
_MIN_D = 256
#: Bounds of the strip height.
_MIN_STRIP, _MAX_STRIP = 128, 512


def strip_height(d: int) -> int:
    """Height of the strips for a ``(d, d)`` product: about d/8, within [128, 512]; d itself
    (one full product) below 256."""
    if d < _MIN_D:
        return d
    return min(max(d // 8, _MIN_STRIP), _MAX_STRIP)


def add_lower_gram(total: Tensor | None, j: Tensor) -> Tensor:
    """Add ``Jᵀ J`` to ``total`` on the diagonal blocks and below them, for ``j`` of shape
    ``(m, d)``; the strips above are left untouched until :func:`symmetrize_lower`."""
    d = j.shape[1]
    if total is None:
        total = j.new_zeros(d, d)
    b = strip_height(d)
    if b >= d:
        return total.addmm_(j.t(), j)
    for s in range(0, d, b):
        e = min(s + b, d)
        total[s:e, :e].addmm_(j[:, s:e].t(), j[:, :e])
    return total


#: Width of the tiles in which :func:`symmetrize_lower` copies a strip's transpose.
_TILE = 256


def symmetrize_lower(total: Tensor) -> Tensor:
    """Fill the upper strips from the lower ones, in place (diagonal blocks are complete).

    Each strip's transpose is copied in tiles of at most ``b × 256``: a transposed copy of a
    whole ``b × (d − e)`` strip reads with a stride of d and runs at a fraction of the memory
    bandwidth (on one core, 6273²: 193 ms as whole strips, 30–60 ms in tiles)."""
    d = total.shape[0]
    b = strip_height(d)
    for s in range(0, d, b):
        e = min(s + b, d)
        for t in range(e, d, _TILE):
            u = min(t + _TILE, d)
            total[s:e, t:u] = total[t:u, s:e].t()
    return total
