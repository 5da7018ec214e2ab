"""Shared numerics of the engine: symmetric solves, eigenbases (full and thin), damping, and the
symmetric rank-k accumulation of Gram matrices.

Every representation's solve, inverse and power goes through these functions, so that a
factorisation is done one way (float64 where affordable, Cholesky before LU) everywhere.

Symmetric rank-k accumulation ``M += Jᵀ J`` computes only the lower triangle:
``Jᵀ J`` is symmetric, so a strip of rows ``[s, e)`` needs only columns ``[0, e)``: with s
strips of height b = d/s the products cost ``(s + 1)/(2s)`` of a full one, with ordinary matrix
products (torch has no ``syrk``). Narrower strips save more flops but run as smaller products;
:func:`strip_height` balances the two (measured on one CPU core: a ``(250, 784)`` J takes 0.62×
the time of the full product, a ``(250, 8193)`` J 0.54×).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError

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


def spd_solve(m: Tensor, rhs: Tensor, regul: float) -> Tensor:
    """Solve ``(m + regul·I) x = rhs`` for a symmetric PSD ``m`` (Cholesky, else LU).

    ``rhs`` may be ``(d,)`` or ``(d, r)``.
    """
    a = m + regul * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    vec = rhs.dim() == 1
    b = rhs.unsqueeze(1) if vec else rhs
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        x = torch.cholesky_solve(b, chol)
    else:
        try:
            x = torch.linalg.solve(a, b)
        except RuntimeError as err:
            raise InvalidInputError(
                f"the matrix plus regul={regul}·I is singular: use a positive regul"
            ) from err
    return x.squeeze(1) if vec else x


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


def row_major(m: Tensor) -> Tensor:
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


def sym_pow(m: Tensor, exponent: float, shift: Tensor) -> Tensor:
    """``(m + shift·I)^exponent`` for a batch of symmetric PSD matrices (see :func:`eigh`), in
    the eigenvectors' dtype."""
    evals, evecs = eigh(m)
    evals = (evals.clamp_min(0) + shift.double()[..., None]) ** exponent
    return (evecs * evals.to(evecs.dtype)[..., None, :]) @ evecs.transpose(-1, -2)


def pinv_values(values: Tensor, atol: float) -> Tensor:
    """``1/λ`` for ``λ > atol``, else 0: the eigenvalues of the pseudo-inverse of a symmetric
    positive semi-definite matrix (NNGeometry's ``pinv(atol)``)."""
    safe = torch.where(values > atol, values, torch.ones_like(values))
    return torch.where(values > atol, 1 / safe, torch.zeros_like(values))


def sym_pinv(m: Tensor, atol: float) -> Tensor:
    """The pseudo-inverse of a symmetric PSD matrix ``m`` (symmetrised against round-off),
    eigenvalues ``≤ atol`` dropped (:func:`pinv_values`), in ``m``'s dtype."""
    evals, evecs = eigh((m + m.transpose(-1, -2)) / 2)
    inverse = evecs * pinv_values(evals, atol).to(evecs.dtype)[..., None, :]
    return (inverse @ evecs.transpose(-1, -2)).to(m.dtype)


#: Extra columns of the random test matrix of the range finder (Halko et al. 2011, §4.2).
RANGE_OVERSAMPLING = 8


def mm_float64(m: Tensor, x: Tensor) -> Tensor:
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


def range_eigh(m: Tensor, rank: int) -> tuple[Tensor, Tensor] | None:
    """Eigenpairs of a batch of PSD matrices ``m (groups, c, c)`` of rank at most ``rank - 8``
    in a thin float64 basis ``(groups, c, rank)``: the randomized range finder of Halko,
    Martinsson & Tropp (2011, Alg. 4.1 and 5.3), exact (to rounding) when the rank bound holds,
    since then ``range(m Ω) = range(m)``: ``Q = qr(m Ω)``, ``Qᵀ m Q = V Λ Vᵀ``, ``U = Q V``.
    Costs two ``c² · rank`` products instead of a ``c³`` eigendecomposition and a ``c²`` basis,
    in float64 without a float64 copy of ``m`` (:func:`mm_float64`). Deterministic (fixed
    seed). Two random probes ``m x`` must lie in ``range(Q)`` (Halko et al. §4.3): if they do
    not, the rank bound was wrong (e.g. a tampered file) and None is returned."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    omega = torch.randn(m.shape[-1], rank + 2, generator=gen, dtype=torch.float64).to(m.device)
    q = torch.linalg.qr(mm_float64(m, omega[:, :rank])).Q
    probe = mm_float64(m, omega[:, rank:])
    outside = probe - q @ (q.transpose(-1, -2) @ probe)
    if outside.norm() > RANGE_PROBE_TOLERANCE * torch.finfo(m.dtype).eps * probe.norm():
        return None
    evals, v = torch.linalg.eigh(q.transpose(-1, -2) @ mm_float64(m, q))
    return evals, q @ v


def spd_solve_batched(f: Tensor, shift: Tensor, rhs: Tensor) -> Tensor:
    """``(f + shift·I)⁻¹ rhs`` for a batch of PSD factors ``f (groups, c, c)``, in float64."""
    damped = f.to(torch.float64, copy=True)
    damped.diagonal(dim1=-2, dim2=-1).add_(shift.double()[:, None])
    chol, info = torch.linalg.cholesky_ex(damped)
    if not bool((info == 0).all()):
        del chol
        return torch.linalg.solve(damped, rhs)
    del damped
    return torch.cholesky_solve(rhs, chol)


def kronecker(a: Tensor, b: Tensor) -> Tensor:
    """The Kronecker product ``A ⊗ B`` of two matrices: ``(p·r, q·s)`` for ``A`` ``(p, q)`` and
    ``B`` ``(r, s)``, with ``(A ⊗ B)[i·r + k, j·s + l] = A[i, j] · B[k, l]`` (the layout of a
    KFAC block ``G ⊗ A`` on the row-major ``[W | b]`` matrix)."""
    if a.dim() != 2 or b.dim() != 2:
        raise InvalidInputError(
            f"kronecker takes two matrices; got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    p, q = a.shape
    r, s = b.shape
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(p * r, q * s)
