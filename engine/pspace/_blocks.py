"""Per-layer blocks of the layered representations (KFAC, EKFAC, QuasiDiag, Mixed).

Each block acts on its layer's slice ``x`` of a flat vector, with the operations of
:class:`~fimntk.engine.pspace.base.PMatAbstract` restricted to one layer. Factorisations run in
float64 (a float32 solve on large Kronecker factors loses digits) and results come back in the
block's dtype.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError, UnsupportedOperationError
from fimntk.engine.layers.layout import MatLayout
from fimntk.engine.pspace.base import spd_solve


class Block(ABC):
    """One layer's block; ``tensors()`` lists what is stored (for arithmetic and files)."""

    kind: str = "block"

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]: ...

    @classmethod
    @abstractmethod
    def from_tensors(cls, t: dict[str, Tensor], layout: MatLayout | None) -> Block: ...

    @abstractmethod
    def mm(self, x: Tensor) -> Tensor:
        """``B x`` for ``x`` of shape ``(..., d_l)``."""

    @abstractmethod
    def trace(self) -> Tensor: ...

    @abstractmethod
    def frob_sq(self) -> Tensor:
        """``‖B‖_F²`` in float64."""

    @abstractmethod
    def diag(self) -> Tensor: ...

    @abstractmethod
    def solve(self, x: Tensor, regul: float) -> Tensor:
        """``(B + regul·I)⁻¹ x`` (KFAC: its damped-factor approximation, see the class)."""

    def inv(self, regul: float) -> Block:
        return self.pow(-1.0, regul)

    def pow(self, exponent: float, regul: float) -> Block:
        raise UnsupportedOperationError(f"a {self.kind} block has no power")

    def dense(self) -> Tensor:
        d = self.diag().numel()
        eye = torch.eye(d, dtype=self.diag().dtype, device=self.diag().device)
        return self.mm(eye)

    @property
    def layout(self) -> MatLayout | None:
        return None

    def scaled(self, s: float) -> Block:
        raise UnsupportedOperationError(f"a {self.kind} block cannot be scaled")

    def combine(self, other: Block, sign: float) -> Block:
        """``self + sign · other`` for blocks of the same kind."""
        if type(other) is not type(self):
            raise UnsupportedOperationError(
                f"cannot add a {other.kind} block to a {self.kind} block: convert with "
                "to_torch() and use PMatDense"
            )
        t1, t2 = self.tensors(), other.tensors()
        return type(self).from_tensors({k: t1[k] + sign * t2[k] for k in t1}, self.layout)


class DenseBlock(Block):
    """An exact ``(d_l, d_l)`` block."""

    kind = "dense"

    def __init__(self, m: Tensor) -> None:
        self.m = m

    def tensors(self) -> dict[str, Tensor]:
        return {"m": self.m}

    @classmethod
    def from_tensors(cls, t, layout=None) -> DenseBlock:
        return cls(t["m"])

    def mm(self, x: Tensor) -> Tensor:
        return x @ self.m

    def trace(self) -> Tensor:
        return torch.diagonal(self.m).sum()

    def frob_sq(self) -> Tensor:
        return (self.m.double() ** 2).sum()

    def diag(self) -> Tensor:
        return torch.diagonal(self.m).clone()

    def dense(self) -> Tensor:
        return self.m

    def solve(self, x: Tensor, regul: float) -> Tensor:
        return (
            spd_solve(self.m, x.t() if x.dim() > 1 else x, regul).t()
            if x.dim() > 1
            else spd_solve(self.m, x, regul)
        )

    def pow(self, exponent: float, regul: float) -> DenseBlock:
        evals, evecs = torch.linalg.eigh(self.m.double())
        evals = (evals.clamp_min(0) + regul) ** exponent
        return DenseBlock(((evecs * evals) @ evecs.t()).to(self.m.dtype))

    def scaled(self, s: float) -> DenseBlock:
        return DenseBlock(self.m * s)


class DiagBlock(Block):
    """A diagonal block ``(d_l,)``."""

    kind = "diag"

    def __init__(self, d: Tensor) -> None:
        self.d = d

    def tensors(self) -> dict[str, Tensor]:
        return {"d": self.d}

    @classmethod
    def from_tensors(cls, t, layout=None) -> DiagBlock:
        return cls(t["d"])

    def mm(self, x: Tensor) -> Tensor:
        return x * self.d

    def trace(self) -> Tensor:
        return self.d.sum()

    def frob_sq(self) -> Tensor:
        return (self.d.double() ** 2).sum()

    def diag(self) -> Tensor:
        return self.d.clone()

    def dense(self) -> Tensor:
        return torch.diag(self.d)

    def solve(self, x: Tensor, regul: float) -> Tensor:
        return x / (self.d + regul)

    def pow(self, exponent: float, regul: float) -> DiagBlock:
        return DiagBlock((self.d + regul) ** exponent)

    def scaled(self, s: float) -> DiagBlock:
        return DiagBlock(self.d * s)


def pi_correction(a: Tensor, g: Tensor) -> Tensor:
    """Martens & Grosse (2015, §6.3): ``π = sqrt((tr A / dim A) / (tr G / dim G))``, per group;
    the damped factors are ``A + π√λ I`` and ``G + √λ/π I``."""
    ta = torch.diagonal(a, dim1=-2, dim2=-1).mean(-1)
    tg = torch.diagonal(g, dim1=-2, dim2=-1).mean(-1)
    ok = (ta > 0) & (tg > 0)
    return torch.where(ok, (ta / torch.where(ok, tg, 1)).sqrt(), torch.ones_like(ta))


#: Factors up to this size are eigendecomposed in float64; larger ones in their own dtype
#: (a float64 eigendecomposition of an 8193² input factor takes minutes on a CPU).
EIGH_FLOAT64_LIMIT = 4096


def eigh(m: Tensor, promote: bool = True) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a batch of symmetric matrices: float64 eigenvalues; eigenvectors in
    float64 where affordable and ``promote``, else in ``m``'s dtype (no float64 copy of a large
    basis)."""
    work = m.double() if promote and m.shape[-1] <= EIGH_FLOAT64_LIMIT else m
    evals, evecs = torch.linalg.eigh(work)
    return evals.double(), evecs


_TRANSPOSE_BLOCK = 512


def _row_major(m: Tensor) -> Tensor:
    """``m`` (a batch of square matrices) in row-major layout, in place when it is column-major
    (as LAPACK returns eigenvectors): a copy of an 8193² basis would cost as much memory again
    as the factor. Swaps transposed blocks of the storage, one block of scratch at a time."""
    if m.is_contiguous():
        return m
    r = m.transpose(-1, -2)
    if not r.is_contiguous():
        return m.contiguous()
    n, b = r.shape[-1], _TRANSPOSE_BLOCK
    for mat in r.reshape(-1, n, n):
        for i in range(0, n, b):
            diag = mat[i : i + b, i : i + b]
            diag.copy_(diag.t().clone())
            for j in range(i + b, n, b):
                upper = mat[i : i + b, j : j + b].clone()
                mat[i : i + b, j : j + b] = mat[j : j + b, i : i + b].t()
                mat[j : j + b, i : i + b] = upper.t()
    return r


def _sym_pow(m: Tensor, exponent: float, shift: Tensor) -> Tensor:
    """``(m + shift·I)^exponent`` for a batch of symmetric PSD matrices (see :func:`eigh`), in
    the eigenvectors' dtype."""
    evals, evecs = eigh(m)
    evals = (evals.clamp_min(0) + shift.double()[..., None]) ** exponent
    return (evecs * evals.to(evecs.dtype)[..., None, :]) @ evecs.transpose(-1, -2)


#: Extra columns of the random test matrix of the range finder (Halko et al. 2011, §4.2).
RANGE_OVERSAMPLING = 8


def _mm_float64(m: Tensor, x: Tensor) -> Tensor:
    """``m @ x`` in float64 for ``m (groups, c, c)`` of any dtype and ``x (groups|1, c, k)``,
    converting ``m`` a block of rows (about 32 MB) at a time, never whole."""
    out = torch.empty(m.shape[0], m.shape[1], x.shape[-1], dtype=torch.float64, device=m.device)
    step = max(1, (32 << 20) // (8 * m.shape[-1]))
    for i in range(0, m.shape[1], step):
        torch.matmul(m[:, i : i + step].double(), x, out=out[:, i : i + step])
    return out


#: Largest relative residual ``‖(I − QQᵀ) m x‖ / ‖m x‖`` of two random probes, in units of the
#: factor's machine epsilon, for which the range finder's basis is accepted (about 10 is seen).
RANGE_PROBE_TOLERANCE = 1000


def _range_eigh(m: Tensor, rank: int) -> tuple[Tensor, Tensor] | None:
    """Eigenpairs of a batch of PSD matrices ``m (groups, c, c)`` of rank at most ``rank - 8``
    in a thin float64 basis ``(groups, c, rank)``: the randomized range finder of Halko,
    Martinsson & Tropp (2011, Alg. 4.1 and 5.3), exact (to rounding) when the rank bound holds,
    since then ``range(m Ω) = range(m)``: ``Q = qr(m Ω)``, ``Qᵀ m Q = V Λ Vᵀ``, ``U = Q V``.
    Costs two ``c² · rank`` products instead of a ``c³`` eigendecomposition and a ``c²`` basis,
    in float64 without a float64 copy of ``m`` (:func:`_mm_float64`). Deterministic (fixed
    seed). Two random probes ``m x`` must lie in ``range(Q)`` (Halko et al. §4.3): if they do
    not, the rank bound was wrong (e.g. a tampered file) and None is returned."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    omega = torch.randn(m.shape[-1], rank + 2, generator=gen, dtype=torch.float64).to(m.device)
    q = torch.linalg.qr(_mm_float64(m, omega[:, :rank])).Q
    probe = _mm_float64(m, omega[:, rank:])
    outside = probe - q @ (q.transpose(-1, -2) @ probe)
    if outside.norm() > RANGE_PROBE_TOLERANCE * torch.finfo(m.dtype).eps * probe.norm():
        return None
    evals, v = torch.linalg.eigh(q.transpose(-1, -2) @ _mm_float64(m, q))
    return evals, q @ v


def _spd_solve(f: Tensor, shift: Tensor, rhs: Tensor) -> Tensor:
    """``(f + shift·I)⁻¹ rhs`` for a batch of PSD factors ``f (groups, c, c)``, in float64."""
    damped = f.to(torch.float64, copy=True)
    damped.diagonal(dim1=-2, dim2=-1).add_(shift.double()[:, None])
    chol, info = torch.linalg.cholesky_ex(damped)
    if not bool((info == 0).all()):
        del chol
        return torch.linalg.solve(damped, rhs)
    del damped
    return torch.cholesky_solve(rhs, chol)


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
        """Eigenpairs of ``A`` in a thin basis (:func:`_range_eigh`) when ``rows`` bounds its
        rank to at most half its size and the basis passes its probe (computed once), else
        None."""
        c = self.a.shape[-1]
        if self.rows is None or 2 * (self.rows + RANGE_OVERSAMPLING) > c:
            return None
        if not self._thin_tried:
            self._thin_a = _range_eigh(self.a, self.rows + RANGE_OVERSAMPLING)
            self._thin_tried = True
        return self._thin_a

    @property
    def layout(self) -> MatLayout:
        return self._layout

    def tensors(self) -> dict[str, Tensor]:
        return {"a": self.a, "g": self.g}

    @classmethod
    def from_tensors(cls, t, layout) -> KronBlock:
        return cls(t["a"], t["g"], layout)

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

    def diag(self) -> Tensor:
        da = torch.diagonal(self.a, dim1=-2, dim2=-1)
        dg = torch.diagonal(self.g, dim1=-2, dim2=-1)
        return self._layout.from_mat(dg[..., :, None] * da[..., None, :])

    def _damped(self, regul: float) -> tuple[Tensor, Tensor]:
        if regul == 0:
            z = torch.zeros(self.a.shape[0], dtype=torch.float64, device=self.a.device)
            return z, z
        pi = pi_correction(self.a.double(), self.g.double())
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

    def pow(self, exponent: float, regul: float) -> KronBlock:
        sa, sg = self._damped(regul)
        thin = self._thin_damped_a(sa, exponent)
        if thin is None:
            a = _sym_pow(self.a, exponent, sa)
        else:
            u, d, rest = thin
            a = (u * d.to(u.dtype)[..., None, :]) @ u.transpose(-1, -2)
            a.diagonal(dim1=-2, dim2=-1).add_(rest.to(a.dtype)[:, None])
        return KronBlock(
            a.to(self.a.dtype), _sym_pow(self.g, exponent, sg).to(self.g.dtype), self._layout
        )

    def solve(self, x: Tensor, regul: float) -> Tensor:
        """``(G + √λ/π I)⁻¹ X (A + π√λ I)⁻¹`` in float64, by Cholesky factorizations of the
        damped factors (damped in place on one float64 copy each, no identity built), or by LU
        where an undamped factor is too close to singular for Cholesky. A damped ``A`` with a
        thin eigenbasis is inverted through it (:meth:`_thin_damped_a`), with no ``c³`` work."""
        sa, sg = self._damped(regul)
        m = self._layout.to_mat(x).double()
        try:
            y = _spd_solve(self.g, sg, m)
            thin = self._thin_damped_a(sa, -1.0)
            if thin is None:
                y = _spd_solve(self.a, sa, y.transpose(-1, -2)).transpose(-1, -2)
            else:
                u, d, rest = thin
                u = u.double()
                y = ((y @ u) * d[..., None, :]) @ u.transpose(-1, -2) + y * rest[:, None, None]
        except RuntimeError as err:
            raise InvalidInputError("a Kronecker factor is singular: use a positive regul") from err
        return self._layout.from_mat(y).to(x.dtype)

    def scaled(self, s: float) -> KronBlock:
        return KronBlock(self.a * s, self.g, self._layout, self.rows)

    def combine(self, other: Block, sign: float) -> Block:
        raise UnsupportedOperationError(
            "the sum of two KFAC matrices is not a Kronecker product: convert with to_torch() "
            "and use PMatDense, or combine their EKFAC forms"
        )


class EKronBlock(Block):
    """EKFAC (George et al. 2018): ``(U_G ⊗ U_A) diag(s) (U_G ⊗ U_A)ᵀ [+ rest · (I − P)]``.

    ``u_a: (groups, P+1, R)`` and ``u_g: (groups, Q, Q)`` are the eigenbases of the KFAC
    factors; ``s: (groups, Q, R)`` the eigenvalues in that basis, initially the products of the
    factors' eigenvalues (= KFAC) and after ``update_diag`` the second moments
    ``E[(U_Gᵀ ∇W U_A)²]`` of the per-example gradients. Damping is exact: ``s + λ``.

    When ``A`` was summed from fewer vectors than its size (a wide Linear layer on few
    examples), its basis is thin (``R < P+1``, see :func:`_range_eigh`): ``P = U U ᵀ`` projects
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
        return cls(_row_major(ua.to(dt)), _row_major(ug.to(dt)), s.to(dt), k.layout)

    @property
    def layout(self) -> MatLayout:
        return self._layout

    def tensors(self) -> dict[str, Tensor]:
        out = {"u_a": self.u_a, "u_g": self.u_g, "s": self.s}
        if self.thin:
            out["rest"] = self.rest
        return out

    @classmethod
    def from_tensors(cls, t, layout) -> EKronBlock:
        return cls(t["u_a"], t["u_g"], t["s"], layout, t.get("rest"))

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
        if self.thin:
            return self.s.sum() + self.rest * self._rest_dims
        return self.s.sum()

    def frob_sq(self) -> Tensor:
        out = (self.s.double() ** 2).sum()
        if self.thin:
            out = out + self.rest.double() ** 2 * self._rest_dims
        return out

    def diag(self) -> Tensor:
        d = (self.u_g**2) @ self.s @ (self.u_a**2).transpose(-1, -2)
        if self.thin:  # rest · diag(I − U_A U_Aᵀ), the same on every row (U_G is square)
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
        rest = None if self.rest is None else self.rest + sign * other.rest
        return self._with(self.s + sign * other.s, rest)


class QuasiDiagBlock(Block):
    """Ollivier (2015), "Riemannian metrics for neural networks I": the diagonal plus, for each
    output unit q, the interactions between its bias and the weights of its row.

    ``d: (groups, Q, P+1)`` is the diagonal in matrix view; ``c: (groups, Q, P)`` the entries
    ``F[W_qp, b_q]``. Solves are exact (one arrowhead system per output unit).
    """

    kind = "quasidiag"

    def __init__(self, d: Tensor, c: Tensor, layout: MatLayout) -> None:
        self.d, self.c, self._layout = d, c, layout

    @property
    def layout(self) -> MatLayout:
        return self._layout

    def tensors(self) -> dict[str, Tensor]:
        return {"d": self.d, "c": self.c}

    @classmethod
    def from_tensors(cls, t, layout) -> QuasiDiagBlock:
        return cls(t["d"], t["c"], layout)

    def mm(self, x: Tensor) -> Tensor:
        m = self._layout.to_mat(x)
        w, b = m[..., :-1], m[..., -1:]
        yw = self.d[..., :-1] * w + self.c * b
        yb = self.d[..., -1:] * b + (self.c * w).sum(-1, keepdim=True)
        return self._layout.from_mat(torch.cat([yw, yb], dim=-1))

    def trace(self) -> Tensor:
        return self.d.sum()

    def frob_sq(self) -> Tensor:
        return (self.d.double() ** 2).sum() + 2 * (self.c.double() ** 2).sum()

    def diag(self) -> Tensor:
        return self._layout.from_mat(self.d)

    def solve(self, x: Tensor, regul: float) -> Tensor:
        m = self._layout.to_mat(x)
        vw, vb = m[..., :-1], m[..., -1:]
        dw, db = self.d[..., :-1] + regul, self.d[..., -1:] + regul
        if (dw <= 0).any() or (db <= 0).any():
            raise InvalidInputError("the quasi-diagonal matrix is singular: use a positive regul")
        schur = db - (self.c**2 / dw).sum(-1, keepdim=True)
        xb = (vb - (self.c * vw / dw).sum(-1, keepdim=True)) / schur
        xw = (vw - self.c * xb) / dw
        return self._layout.from_mat(torch.cat([xw, xb], dim=-1))

    def scaled(self, s: float) -> QuasiDiagBlock:
        return QuasiDiagBlock(self.d * s, self.c * s, self._layout)


BLOCKS: dict[str, type[Block]] = {
    cls.kind: cls for cls in (DenseBlock, DiagBlock, KronBlock, EKronBlock, QuasiDiagBlock)
}
