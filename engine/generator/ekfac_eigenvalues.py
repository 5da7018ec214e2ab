"""EKFAC: eigenvalues re-estimated in the Kronecker eigenbasis, ``E[(U_Gᵀ ∇W U_A)²]``
(George, Laurent, Bouthillier, Ballas & Vincent, NeurIPS 2018), accumulated over a loader."""

from __future__ import annotations

import torch
from torch import Tensor

from fimntk.engine.generator.accumulators import (
    Accumulator,
    mat_grads,
    one_position,
)
from fimntk.engine.generator.batch_jacobian import BatchJacobian
from fimntk.engine.layers.layout import MatLayout
from fimntk.engine.layers.outer_product import OuterKernel

#: Elements of the rotated per-example gradients formed at once (a chunk of examples).
_ROTATED_CHUNK = 1 << 22


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
        if not self.thin and self._add_rotated_positions(bj):
            return
        m = mat_grads(bj, self.name, self.layout)
        r = self.u_g.transpose(-1, -2) @ m @ self.u_a
        s = (r * r).sum(dim=(0, 1))
        self.s = s if self.s is None else self.s.add_(s)
        if self.thin:
            self._add_energy((m * m).sum())

    def _add_rotated_positions(self, bj: BatchJacobian) -> bool:
        """With several positions, ``U_Gᵀ (Σ_t g_t ã_tᵀ) U_A = Σ_t (U_Gᵀ g_t)(U_Aᵀ ã_t)ᵀ``:
        rotate each position's ``g`` and ``ã`` first (``T·(Q² + P·R)`` per example), then form the
        rotated per-example gradients (``T·Q·R``), instead of rotating per-example gradients
        (``Q²·P + Q·P·R``: for a convolution with ``P = C_in·k²`` the second dominates). Adds
        to ``s`` and returns True for a hooked outer-product layer, else returns False."""
        kernel = bj.kernels.get(self.name)
        if self.name not in bj.captured or not isinstance(kernel, OuterKernel):
            return False
        x, gy = bj.captured[self.name]
        key = ("eigen_inputs", self.name)
        ra = bj.cache.get(key)
        if ra is None:  # U_Aᵀ ã per position (n, G, T, R), once per batch
            a = kernel.inputs(x)
            p = a.shape[-1]
            ra = torch.einsum("ngtp,gpr->ngtr", a, self.u_a[:, :p])
            if self.layout.bias:
                ra += self.u_a[:, p][None, :, None]
            if not bj.last:
                bj.cache[key] = ra
        rg = torch.einsum("kngtq,gqs->kngts", kernel.output_grads(x, gy), self.u_g)
        k, n, grp, _, q = rg.shape
        step = max(1, _ROTATED_CHUNK // max(1, k * grp * q * ra.shape[-1]))
        for i in range(0, n, step):
            r = torch.einsum("kngtq,ngtr->kngqr", rg[:, i : i + step], ra[i : i + step])
            part = r.square_().sum(dim=(0, 1))
            self.s = part if self.s is None else self.s.add_(part)
        if bj.last:
            bj.cache.pop(key, None)
        return True

    def _add_energy(self, e: Tensor) -> None:
        self.energy = e if self.energy is None else self.energy + e

    def result(self, n: int) -> Tensor | tuple[Tensor, Tensor]:
        """``s`` ``(G, Q, R)``; for a thin basis ``(s, rest)``, ``rest`` the energy outside the
        basis per dimension (0 when it is below the rounding of the total)."""
        assert self.s is not None, "no batch was accumulated"
        s = self.s.div_(n)
        if not self.thin:
            return s
        assert self.energy is not None
        total = self.energy / n
        outside = total - s.sum()
        eps = torch.finfo(s.dtype).eps
        if outside <= 64 * eps * total:
            outside = torch.zeros_like(outside)
        return s, outside / (self.layout.numel - s.numel())
