"""Symmetric rank-k accumulation ``M += Jᵀ J`` computing only the lower triangle.

``Jᵀ J`` is symmetric, so a strip of rows ``[s, e)`` needs only columns ``[0, e)``: about half
the flops of a full product for large d, with ordinary matrix products (torch has no ``syrk``).
"""

from __future__ import annotations

from torch import Tensor

_BLOCK = 1024


def add_lower_gram(total: Tensor | None, j: Tensor) -> Tensor:
    """Add ``Jᵀ J`` to ``total`` on the diagonal blocks and below them, for ``j`` of shape
    ``(m, d)``; the strips above are left untouched until :func:`symmetrize_lower`."""
    d = j.shape[1]
    if total is None:
        total = j.new_zeros(d, d)
    if d <= _BLOCK:
        return total.addmm_(j.t(), j)
    for s in range(0, d, _BLOCK):
        e = min(s + _BLOCK, d)
        total[s:e, :e].addmm_(j[:, s:e].t(), j[:, :e])
    return total


def symmetrize_lower(total: Tensor) -> Tensor:
    """Fill the upper strips from the lower ones, in place (diagonal blocks are complete)."""
    d = total.shape[0]
    for s in range(0, d, _BLOCK):
        e = min(s + _BLOCK, d)
        if e < d:
            total[s:e, e:] = total[e:, s:e].t()
    return total
