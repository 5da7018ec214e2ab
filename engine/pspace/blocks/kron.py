"""Kronecker-factored per-layer block ``G ⊗ A`` (KFAC)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError, UnsupportedOperationError
from fimntk.engine.layers.layout import MatLayout
from fimntk.engine.linalg import (
    RANGE_OVERSAMPLING,
    pi_correction,
    range_eigh,
    spd_solve_batched,
    sym_pow,
)
from fimntk.engine.pspace.blocks.base import Block, require_layout


class KronBlock(Block):
    """``G ⊗ A`` per group (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions).

    With the layer's gradient seen as the matrix ``X = [∇W | ∇b]`` of shape ``(groups, Q, P+1)``
    (:class:`~fimntk.engine.layers.layout.MatLayout`), the block acts as ``X ↦ G X A`` with
    ``A: (groups, P+1, P+1)`` and ``G: (groups, Q, Q)``.

    ``solve(x, λ)`` and ``pow(e, λ)`` damp the factors, not the product:
    ``(G + √λ/π I)^e ⊗ (A + π√λ I)^e`` with the π-correction of Martens & Grosse (2015, §6.3);
    with ``λ = 0`` they are exact.
    """

    kind = "kfac"

    def __init__(self, a: Tensor, g: Tensor, layout: MatLayout, rows: int | None = None) -> None:
        self.a, self.g, self._layout = a, g, layout
        self.rows = rows  # vectors summed into A (per group), when known: a bound on its rank
        self._thin_a: tuple[Tensor, Tensor] | None = None
        self._thin_tried = False

    def thin_eigh_a(self) -> tuple[Tensor, Tensor] | None:
        """Eigenpairs of ``A`` in a thin basis (:func:`range_eigh`) when ``rows`` bounds its
        rank to at most half its size and the basis passes its probe (computed once), else
        None."""
        c = self.a.shape[-1]
        if self.rows is None or 2 * (self.rows + RANGE_OVERSAMPLING) > c:
            return None
        if not self._thin_tried:
            self._thin_a = range_eigh(self.a, self.rows + RANGE_OVERSAMPLING)
            self._thin_tried = True
        return self._thin_a

    @property
    def layout(self) -> MatLayout:
        return self._layout

    def tensors(self) -> dict[str, Tensor]:
        return {"a": self.a, "g": self.g}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], layout: MatLayout | None) -> KronBlock:
        return cls(t["a"], t["g"], require_layout(layout))

    def mm(self, x: Tensor) -> Tensor:
        m = self._layout.to_mat(x)
        return self._layout.from_mat(self.g @ m @ self.a)

    def trace(self) -> Tensor:
        return (
            torch.diagonal(self.a, dim1=-2, dim2=-1).sum(-1)
            * torch.diagonal(self.g, dim1=-2, dim2=-1).sum(-1)
        ).sum()

    def frob_sq(self) -> Tensor:
        return ((self.a.double() ** 2).sum((-2, -1)) * (self.g.double() ** 2).sum((-2, -1))).sum()

    def eigenvalues(self) -> Tensor:
        """``eig(G ⊗ A) = {μ_i λ_j}``: per group, the products of the factors' eigenvalues
        (Van Loan 2000, "The ubiquitous Kronecker product"), in float64."""
        ea = torch.linalg.eigvalsh(self.a.double())
        eg = torch.linalg.eigvalsh(self.g.double())
        return (eg[..., :, None] * ea[..., None, :]).reshape(-1)

    def diag(self) -> Tensor:
        da = torch.diagonal(self.a, dim1=-2, dim2=-1)
        dg = torch.diagonal(self.g, dim1=-2, dim2=-1)
        return self._layout.from_mat(dg[..., :, None] * da[..., None, :])

    def _damped(self, regul: float, use_pi: bool = True) -> tuple[Tensor, Tensor]:
        """Shifts ``(π√λ, √λ/π)`` of ``A`` and ``G``; ``use_pi=False`` takes ``π = 1``."""
        if regul == 0:
            z = torch.zeros(self.a.shape[0], dtype=torch.float64, device=self.a.device)
            return z, z
        pi = pi_correction(self.a.double(), self.g.double())
        if not use_pi:
            pi = torch.ones_like(pi)
        return math.sqrt(regul) * pi, math.sqrt(regul) / pi

    def _thin_damped_a(self, sa: Tensor, exponent: float) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(U, d, c)`` with ``(A + sa·I)^e = U diag(d) Uᵀ + c·I`` from A's thin eigenbasis:
        on its complement A is zero, so ``d = (λ + sa)^e − sa^e`` and ``c = sa^e``. None when
        A has no thin basis, or ``sa^e`` would be infinite (``sa = 0``, ``e ≤ 0``)."""
        thin = self.thin_eigh_a()
        if thin is None or (exponent <= 0 and bool((sa <= 0).any())):
            return None
        evals, u = thin
        shift = sa.double()[:, None]
        rest = shift**exponent
        return u, (evals.clamp_min(0) + shift) ** exponent - rest, rest[:, 0]

    def pow(self, exponent: float, regul: float, use_pi: bool = True) -> KronBlock:
        """``(G + √λ/π I)^e ⊗ (A + π√λ I)^e`` (``π = 1`` with ``use_pi=False``)."""
        sa, sg = self._damped(regul, use_pi)
        thin = self._thin_damped_a(sa, exponent)
        if thin is None:
            a = sym_pow(self.a, exponent, sa)
        else:
            u, d, rest = thin
            a = (u * d.to(u.dtype)[..., None, :]) @ u.transpose(-1, -2)
            a.diagonal(dim1=-2, dim2=-1).add_(rest.to(a.dtype)[:, None])
        return KronBlock(
            a.to(self.a.dtype), sym_pow(self.g, exponent, sg).to(self.g.dtype), self._layout
        )

    def solve(self, x: Tensor, regul: float) -> Tensor:
        """``(G + √λ/π I)⁻¹ X (A + π√λ I)⁻¹`` in float64, by Cholesky factorizations of the
        damped factors (damped in place on one float64 copy each, no identity built), or by LU
        where an undamped factor is too close to singular for Cholesky. A damped ``A`` with a
        thin eigenbasis is inverted through it (:meth:`_thin_damped_a`), with no ``c³`` work."""
        sa, sg = self._damped(regul)
        m = self._layout.to_mat(x).double()
        try:
            y = spd_solve_batched(self.g, sg, m)
            thin = self._thin_damped_a(sa, -1.0)
            if thin is None:
                y = spd_solve_batched(self.a, sa, y.transpose(-1, -2)).transpose(-1, -2)
            else:
                u, d, rest = thin
                u = u.double()
                y = ((y @ u) * d[..., None, :]) @ u.transpose(-1, -2) + y * rest[:, None, None]
        except RuntimeError as err:
            raise InvalidInputError("a Kronecker factor is singular: use a positive regul") from err
        return self._layout.from_mat(y).to(x.dtype)

    def product(self, other: Block) -> Block | None:
        """``(G₁ ⊗ A₁)(G₂ ⊗ A₂) = G₁G₂ ⊗ A₁A₂`` (the mixed-product property). The block acts
        as ``X ↦ G X A`` (``A`` on the right, i.e. ``G ⊗ Aᵀ`` on the row-major view), so the
        product ``X ↦ G₁G₂ X A₂A₁`` stores ``A₂A₁``."""
        if not isinstance(other, KronBlock):
            return super().product(other)
        return KronBlock(other.a @ self.a, self.g @ other.g, self._layout)

    def scaled(self, s: float) -> KronBlock:
        return KronBlock(self.a * s, self.g, self._layout, self.rows)

    def combine(self, other: Block, sign: float) -> Block:
        raise UnsupportedOperationError(
            "the sum of two KFAC matrices is not a Kronecker product: convert with to_torch() "
            "and use PMatDense, or combine their EKFAC forms"
        )
