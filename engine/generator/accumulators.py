"""Per-layer statistics accumulated over a loader in one pass (see :meth:`Jacobian.accumulate`).

Each accumulator reads one layer of each :class:`BatchJacobian` and returns its statistic divided
by the number of examples n. Where a layer's per-example gradient is a sum of outer products
``Σ_t g_t ã_tᵀ`` (``ã = [a; 1]`` folds the bias in), the factored accumulators never build
per-example gradients when ``T = 1``.

The factored accumulators of KFAC and EKFAC live in :mod:`.kfac_factors` and
:mod:`.ekfac_eigenvalues`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, cast

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.generator.batch_jacobian import BatchJacobian
from fimntk.engine.layers.layout import MatLayout
from fimntk.engine.layers.outer_product import OuterKernel
from fimntk.engine.linalg import add_lower_gram, symmetrize_lower


def one_position(bj: BatchJacobian, name: str) -> tuple[Tensor, Tensor] | None:
    """``(a (n, G, P), g (K, n, G, Q))`` of a hooked outer-product layer with one position per
    example (``T = 1``), else None. The bias is not folded into ``a``: callers add its share
    (the ``1`` of ``ã = [a; 1]``) without building ``ã``."""
    if name not in bj.captured:
        return None
    kernel = bj.kernels[name]
    if not hasattr(kernel, "outer") or kernel.mat_layout() is None:
        return None
    kernel = cast(OuterKernel, kernel)  # duck-typed: it has ``outer``
    x, gy = bj.captured[name]
    if kernel.positions(x) != 1:
        return None
    return kernel.inputs(x)[:, :, 0], kernel.output_grads(x, gy)[:, :, :, 0]


def mat_grads(bj: BatchJacobian, name: str, layout: MatLayout) -> Tensor:
    """Per-example gradients in matrix view: ``(K, n, groups, Q, P+bias)``."""
    return layout.to_mat(bj.layer_grads(name))


_GRAM_CHUNK = 1 << 24


def sum_gram(x: Tensor, total: Tensor | None) -> Tensor:
    """Add ``Σ_{m,t} x[m, γ, t] x[m, γ, t]ᵀ`` for ``x`` of shape ``(m, G, T, P)`` to ``total``
    ``(G, P, P)``; finish with :func:`finish_gram`.

    Batched products on ``x``'s own memory layout (the transposed views the kernels return are
    not copied), in chunks of examples; a single group with one position accumulates only the
    lower triangle (symmetric strip product).
    """
    m, grp, t, p = x.shape
    if grp == 1 and t == 1:
        return add_lower_gram(None if total is None else total[0], x.reshape(m, p))[None]
    step = max(1, _GRAM_CHUNK // max(1, grp * p * p))
    for s in range(0, m, step):
        part = torch.matmul(x[s : s + step].mT, x[s : s + step]).sum(dim=0)
        total = part if total is None else total.add_(part)
    assert total is not None, "no examples"
    return total


def finish_gram(total: Tensor, lower: bool) -> Tensor:
    """Mirror the lower triangle when :func:`sum_gram` accumulated only that."""
    return symmetrize_lower(total[0])[None] if lower else total


class Accumulator(ABC):
    """Accumulates one layer's statistic over batches."""

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def update(self, bj: BatchJacobian) -> None: ...

    @abstractmethod
    def result(self, n: int) -> Any: ...


class DenseAcc(Accumulator):
    """``(1/n) Σ g gᵀ``: the layer's exact block ``(d_l, d_l)``."""

    total: Tensor | None = None

    def update(self, bj: BatchJacobian) -> None:
        j = bj.layer_grads(self.name)
        self.total = add_lower_gram(self.total, j.reshape(-1, j.shape[-1]))

    def result(self, n: int) -> Tensor:
        return symmetrize_lower(_accumulated(self.total)).div_(n)


class DiagAcc(Accumulator):
    """``(1/n) Σ g ⊙ g``: the layer's diagonal ``(d_l,)``."""

    total: Tensor | None = None

    def update(self, bj: BatchJacobian) -> None:
        if self.total is None:
            self.total = torch.zeros(
                bj.layer_collection[self.name].numel, dtype=bj.dtype, device=bj.device
            )
        bj.add_layer_sq_sum(self.name, self.total)

    def result(self, n: int) -> Tensor:
        return _accumulated(self.total).div_(n)


class QuasiDiagAcc(Accumulator):
    """Diagonal ``(G, Q, P+1)`` and bias-row interactions ``(G, Q, P)`` in matrix view."""

    def __init__(self, name: str, layout: MatLayout) -> None:
        super().__init__(name)
        self.layout = layout
        self.d: Tensor | None = None
        self.c: Tensor | None = None

    def update(self, bj: BatchJacobian) -> None:
        one = one_position(bj, self.name)
        if one is not None:
            a, g = one  # (n, G, P), (K, n, G, Q)
            g2 = bj.batch_sum(("quasidiag", self.name), (g * g).sum(0))  # (n, G, Q)
            if g2 is None:
                return
            grp, q, p = g2.shape[1], g2.shape[2], a.shape[2]
            if self.d is None:
                self.d = a.new_zeros(grp, q, p + 1)
                self.c = a.new_zeros(grp, q, p)
            g2t, at = g2.permute(1, 2, 0), a.transpose(0, 1)  # (G, Q, n), (G, n, P)
            assert self.c is not None
            self.d[..., :p].baddbmm_(g2t, at * at)
            self.d[..., p] += g2.sum(dim=0)
            self.c.baddbmm_(g2t, at)
            return
        m = mat_grads(bj, self.name, self.layout)
        d = (m * m).sum(dim=(0, 1))
        c = (m[..., :-1] * m[..., -1:]).sum(dim=(0, 1))
        self.d = d if self.d is None else self.d.add_(d)
        self.c = c if self.c is None else self.c.add_(c)

    def result(self, n: int) -> tuple[Tensor, Tensor]:
        return _accumulated(self.d).div_(n), _accumulated(self.c).div_(n)


def _accumulated(total: Tensor | None) -> Tensor:
    """An accumulator's sum, which exists once a batch was seen (the generator refuses an empty
    loader before results are asked for)."""
    if total is None:
        raise InvalidInputError("the loader yielded no examples: give it a non-empty dataset")
    return total
