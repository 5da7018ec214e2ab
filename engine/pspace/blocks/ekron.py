"""Kronecker-factored block in its eigenbasis, with corrected eigenvalues (EKFAC)."""

from __future__ import annotations

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError, UnsupportedOperationError
from fimntk.engine.layers.layout import MatLayout
from fimntk.engine.linalg import eigh, pinv_values, row_major
from fimntk.engine.pspace.blocks.base import Block, require_layout
from fimntk.engine.pspace.blocks.kron import KronBlock


class EKronBlock(Block):
    """EKFAC (George et al. 2018): ``(U_G ⊗ U_A) diag(s) (U_G ⊗ U_A)ᵀ [+ rest · (I − P)]``.

    ``u_a: (groups, P+1, R)`` and ``u_g: (groups, Q, Q)`` are the eigenbases of the KFAC
    factors; ``s: (groups, Q, R)`` the eigenvalues in that basis, initially the products of the
    factors' eigenvalues (= KFAC) and after ``update_diag`` the second moments
    ``E[(U_Gᵀ ∇W U_A)²]`` of the per-example gradients. Damping is exact: ``s + λ``.

    When ``A`` was summed from fewer vectors than its size (a wide Linear layer on few
    examples), its basis is thin (``R < P+1``, see :func:`range_eigh`): ``P = U U ᵀ`` projects
    onto the range of ``U = U_G ⊗ U_A`` and the complement, where ``A`` is zero, carries the
    single eigenvalue ``rest`` (0 for KFAC and for ``update_diag`` on the data that built the
    basis, where every per-example gradient lies in that range; otherwise the mean energy of the
    gradients outside it per dimension, which keeps the trace exact). A full basis has no
    complement and ``rest`` is ``None``.
    """

    kind = "ekfac"

    def __init__(
        self, u_a: Tensor, u_g: Tensor, s: Tensor, layout: MatLayout, rest: Tensor | None = None
    ) -> None:
        self.u_a, self.u_g, self.s, self._layout = u_a, u_g, s, layout
        if rest is None and self.thin:
            rest = s.new_zeros(())
        self.rest = rest if self.thin else None

    @property
    def thin(self) -> bool:
        return self.u_a.shape[-1] < self.u_a.shape[-2]

    @classmethod
    def from_kron(cls, k: KronBlock) -> EKronBlock:
        """The eigenbasis of ``k``'s factors, in their own dtype: only the basis is kept, and
        :meth:`~fimntk.engine.pspace.PMatEKFAC.update_diag` re-estimates the eigenvalues in it, so a
        float32 factor needs no float64 copy (KFAC's own inverses still factor in float64).
        Where ``k.rows`` bounds the rank of ``A`` to at most half its size, the basis of ``A``
        is thin (:meth:`KronBlock.thin_eigh_a`)."""
        thin = k.thin_eigh_a()
        ea, ua = thin if thin is not None else eigh(k.a, promote=False)
        eg, ug = eigh(k.g, promote=False)
        s = eg.clamp_min(0)[..., :, None] * ea.clamp_min(0)[..., None, :]
        dt = k.a.dtype
        return cls(row_major(ua.to(dt)), row_major(ug.to(dt)), s.to(dt), k.layout)

    @property
    def layout(self) -> MatLayout:
        return self._layout

    def tensors(self) -> dict[str, Tensor]:
        out = {"u_a": self.u_a, "u_g": self.u_g, "s": self.s}
        if self.rest is not None:
            out["rest"] = self.rest
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], layout: MatLayout | None) -> EKronBlock:
        return cls(t["u_a"], t["u_g"], t["s"], require_layout(layout), t.get("rest"))

    def _with(self, s: Tensor, rest: Tensor | None) -> EKronBlock:
        return EKronBlock(self.u_a, self.u_g, s, self._layout, rest)

    @property
    def _rest_dims(self) -> int:
        """Dimensions of the complement of the thin basis."""
        return self._layout.numel - self.s.numel()

    def rotate(self, m: Tensor) -> Tensor:
        """``U_Gᵀ M U_A`` for matrices ``(..., groups, Q, P+1)``."""
        return self.u_g.transpose(-1, -2) @ m @ self.u_a

    def unrotate(self, m: Tensor) -> Tensor:
        return self.u_g @ m @ self.u_a.transpose(-1, -2)

    def _outside(self, m: Tensor) -> Tensor:
        """``M − M U_A U_Aᵀ``: the part of ``M`` outside the thin basis (``U_G`` is square)."""
        return m - (m @ self.u_a) @ self.u_a.transpose(-1, -2)

    def _apply(self, x: Tensor, eig: Tensor, rest: Tensor | None) -> Tensor:
        m = self._layout.to_mat(x)
        y = self.unrotate(eig * self.rotate(m))
        if rest is not None and bool(rest != 0):
            y = y + rest * self._outside(m)
        return self._layout.from_mat(y)

    def mm(self, x: Tensor) -> Tensor:
        return self._apply(x, self.s, self.rest)

    def trace(self) -> Tensor:
        if self.rest is not None:
            return self.s.sum() + self.rest * self._rest_dims
        return self.s.sum()

    def frob_sq(self) -> Tensor:
        out = (self.s.double() ** 2).sum()
        if self.rest is not None:
            out = out + self.rest.double() ** 2 * self._rest_dims
        return out

    def eigenvalues(self) -> Tensor:
        """``s`` (the eigenvalues in the basis ``U_G ⊗ U_A``), and ``rest`` once for each
        dimension of the complement of a thin basis."""
        s = self.s.reshape(-1)
        if self.rest is None:
            return s
        groups, rows, cols = self.u_g.shape[0], self.u_g.shape[-1], self.u_a.shape[-2]
        missing = groups * rows * cols - s.numel()
        return torch.cat([s, self.rest.to(s.dtype).expand(missing)])

    def diag(self) -> Tensor:
        d = (self.u_g**2) @ self.s @ (self.u_a**2).transpose(-1, -2)
        if self.rest is not None:  # rest · diag(I − U_A U_Aᵀ), equal on every row (U_G square)
            d = d + self.rest * (1 - (self.u_a**2).sum(-1))[..., None, :]
        return self._layout.from_mat(d)

    def solve(self, x: Tensor, regul: float) -> Tensor:
        denom = self.s + regul
        rest = None if self.rest is None else self.rest + regul
        if regul == 0 and ((denom <= 0).any() or (rest is not None and rest <= 0)):
            raise InvalidInputError("EKFAC has zero eigenvalues: use a positive regul")
        return self._apply(x, 1 / denom, None if rest is None else 1 / rest)

    def pow(self, exponent: float, regul: float) -> EKronBlock:
        rest = None if self.rest is None else (self.rest.clamp_min(0) + regul) ** exponent
        return self._with((self.s.clamp_min(0) + regul) ** exponent, rest)

    def pinv(self, atol: float) -> EKronBlock:
        """The same basis with ``s⁺`` (:func:`pinv_values`), ``rest`` likewise."""
        rest = None if self.rest is None else pinv_values(self.rest, atol)
        return self._with(pinv_values(self.s, atol), rest)

    def scaled(self, s: float) -> EKronBlock:
        return self._with(self.s * s, None if self.rest is None else self.rest * s)

    def combine(self, other: Block, sign: float) -> Block:
        if not (
            isinstance(other, EKronBlock)
            and torch.equal(other.u_a, self.u_a)
            and torch.equal(other.u_g, self.u_g)
        ):
            raise UnsupportedOperationError(
                "EKFAC matrices add only when they share their eigenbasis: convert with "
                "to_torch() and use PMatDense"
            )
        rest = None if self.rest is None or other.rest is None else self.rest + sign * other.rest
        return self._with(self.s + sign * other.s, rest)
