"""Per-layer statistics accumulated over a loader in one pass (see :meth:`Jacobian.accumulate`).

Each accumulator reads one layer of each :class:`BatchJacobian` and returns its statistic divided
by the number of examples n. Where a layer's per-example gradient is a sum of outer products
``Σ_t g_t ã_tᵀ`` (``ã = [a; 1]`` folds the bias in), the factored accumulators never build
per-example gradients when ``T = 1``.

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

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from fimntk.engine.generator._syrk import add_lower_gram, symmetrize_lower
from fimntk.engine.generator.jacobian import BatchJacobian
from fimntk.engine.layers.layout import MatLayout

KFAC_APPROX = ("expand", "reduce")


def one_position(bj: BatchJacobian, name: str) -> tuple[Tensor, Tensor] | None:
    """``(a (n, G, P), g (K, n, G, Q))`` of a hooked outer-product layer with one position per
    example (``T = 1``), else None. The bias is not folded into ``a``: callers add its share
    (the ``1`` of ``ã = [a; 1]``) without building ``ã``."""
    if name not in bj.captured:
        return None
    kernel = bj.kernels[name]
    if not hasattr(kernel, "outer") or kernel.mat_layout() is None:
        return None
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
    def result(self, n: int): ...


class DenseAcc(Accumulator):
    """``(1/n) Σ g gᵀ``: the layer's exact block ``(d_l, d_l)``."""

    total: Tensor | None = None

    def update(self, bj: BatchJacobian) -> None:
        j = bj.layer_grads(self.name)
        self.total = add_lower_gram(self.total, j.reshape(-1, j.shape[-1]))

    def result(self, n: int) -> Tensor:
        return symmetrize_lower(self.total).div_(n)


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
        return self.total.div_(n)


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
        self.bias = False
        self.rows = 0  # vectors summed into A (per group): a bound on its rank

    def update(self, bj: BatchJacobian) -> None:
        kernel = bj.kernels[self.name]
        x, gy = bj.captured[self.name]
        reduce = self.approx == "reduce"
        if bj.first:  # A depends on the inputs only: once per batch, not per chunk of K
            a = kernel.inputs(x)
            self.t = a.shape[2]
            if reduce and a.shape[2] > 1:
                a = a.mean(dim=2, keepdim=True)
            grp, p = a.shape[1], a.shape[3]
            self.rows += a.shape[0] * a.shape[2]
            self.bias = kernel.mat_layout().bias
            if self.a is None:  # the bordered matrix, filled in place (no second copy)
                self.a = a.new_zeros(grp, p + self.bias, p + self.bias)
            sum_gram(a, self.a[:, :p, :p])
            if self.bias:
                self.a[:, :p, p] += a.sum(dim=(0, 2))
                self.a[:, p, p] += a.shape[0] * a.shape[2]
        g = kernel.output_grads(x, gy)
        if reduce and g.shape[3] > 1:
            g = g.sum(dim=3, keepdim=True)
        self.g = sum_gram(g.reshape(-1, *g.shape[2:]), self.g)

    def result(self, n: int) -> tuple[Tensor, Tensor]:
        t = 1 if self.approx == "reduce" else self.t
        lower = self.a.shape[0] == 1 and t == 1
        a = self.a
        if self.bias:
            p = a.shape[1] - 1
            finish_gram(a[:, :p, :p], lower)
            a[:, p, :p] = a[:, :p, p]
        else:
            finish_gram(a, lower)
        g = finish_gram(self.g, self.g.shape[0] == 1 and t == 1).div_(n * t)
        return a.div_(n), g


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
        return self.d.div_(n), self.c.div_(n)


class EigenDiagAcc(Accumulator):
    """EKFAC's diagonal ``(1/n) Σ (U_Gᵀ ∇W U_A)²`` in a fixed Kronecker eigenbasis."""

    def __init__(self, name: str, u_a: Tensor, u_g: Tensor, layout: MatLayout) -> None:
        super().__init__(name)
        self.u_a, self.u_g, self.layout = u_a, u_g, layout
        self.s: Tensor | None = None
        self.thin = u_a.shape[-1] < u_a.shape[-2]
        self.energy: Tensor | None = None  # Σ ‖∇W‖², for the complement of a thin basis

    def update(self, bj: BatchJacobian) -> None:
        one = one_position(bj, self.name)
        if one is not None:  # s += Σ_i (U_Gᵀ g_i)² ((U_Aᵀ ã_i)²)ᵀ, g² summed over k first
            a, g = one
            rg = torch.einsum("kngq,gqs->kngs", g, self.u_g)
            rg2 = bj.batch_sum(("eigendiag", self.name), (rg * rg).sum(0))  # (n, G, Q)
            if rg2 is None:
                return
            p = a.shape[2]
            # U_Aᵀ ã = U_A[:P]ᵀ a (+ the bias row U_A[P]): no folded ã = [a; 1] is built
            if self.layout.bias:
                ra = torch.baddbmm(self.u_a[:, p:], a.transpose(0, 1), self.u_a[:, :p])
            else:
                ra = torch.bmm(a.transpose(0, 1), self.u_a)
            ra.square_()  # (G, n, R)
            if self.s is None:
                self.s = a.new_zeros(rg2.shape[1], rg2.shape[2], ra.shape[2])
            self.s.baddbmm_(rg2.permute(1, 2, 0), ra)
            if self.thin:  # ‖g ãᵀ‖² = ‖g‖² ‖ã‖²
                sq_a = (a * a).sum(-1) + self.layout.bias  # (n, G)
                self._add_energy((rg2.sum(-1) * sq_a).sum())
            return
        m = mat_grads(bj, self.name, self.layout)
        r = self.u_g.transpose(-1, -2) @ m @ self.u_a
        s = (r * r).sum(dim=(0, 1))
        self.s = s if self.s is None else self.s.add_(s)
        if self.thin:
            self._add_energy((m * m).sum())

    def _add_energy(self, e: Tensor) -> None:
        self.energy = e if self.energy is None else self.energy + e

    def result(self, n: int) -> Tensor | tuple[Tensor, Tensor]:
        """``s`` ``(G, Q, R)``; for a thin basis ``(s, rest)``, ``rest`` the energy outside the
        basis per dimension (0 when it is below the rounding of the total)."""
        s = self.s.div_(n)
        if not self.thin:
            return s
        total = self.energy / n
        outside = total - s.sum()
        eps = torch.finfo(s.dtype).eps
        if outside <= 64 * eps * total:
            outside = torch.zeros_like(outside)
        return s, outside / (self.layout.numel - s.numel())
