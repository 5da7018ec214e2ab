"""Symmetric rank-k accumulation ``M += Jᵀ J`` computing only the lower triangle.

``Jᵀ J`` is symmetric, so a strip of rows ``[s, e)`` needs only columns ``[0, e)``: about half
the flops of a full product for large d, with ordinary matrix products (torch has no ``syrk``).
"""

from __future__ import annotations

import torch
from torch import Tensor

_BLOCK = 1024


def add_lower_gram(total: Tensor | None, j: Tensor) -> Tensor:
    """``tril(total + Jᵀ J)`` for ``j`` of shape ``(m, d)``; upper entries are left undefined."""
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
    """The symmetric matrix whose lower triangle is that of ``total``."""
    if total.shape[0] <= _BLOCK:
        return total
    low = torch.tril(total)
    return low + torch.tril(total, -1).t()
