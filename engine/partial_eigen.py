"""The k largest eigenpairs of a dense symmetric matrix without a full eigendecomposition.

A full ``eigh`` of a ``d × d`` matrix costs about ``9 d³`` flops whatever k is: at d = 17 000
that is tens of minutes on a CPU, with no point at which it can report progress or stop.
For k ≪ d, Lanczos with full reorthogonalisation (Lanczos 1950; Parlett 1998, ch. 13) needs m
matrix-vector products (``2 d²`` flops each) and ``O(d m²)`` for the basis, with m a small
multiple of k. The Ritz pairs are accepted once every residual satisfies

.. math::

    ‖M y_i − θ_i y_i‖ ≤ \\mathrm{tol}_i, \\qquad
    \\mathrm{tol}_i = \\max(10^{-6} |θ_i|,\\; 64\\, ε\\, θ_1),

which bounds the distance of ``θ_i`` to an eigenvalue of M by ``tol_i`` (Parlett 1998,
Thm 4.5.1); ``ε`` is the matrix dtype's machine epsilon, the floor a full ``eigh`` in that
dtype has too. Otherwise m doubles; once m would pass ``d / 4`` the full ``eigh`` is cheaper
and is used instead. Each product reports progress, so a caller can stop the computation
between two products.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: ``progress(done, total, stage)``; it may raise to stop the computation.
Progress = Callable[[int, int | None, str], None]

_F64 = torch.float64


def top_eigenpairs(
    matrix: Tensor, k: int, progress: Progress | None = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """The k largest eigenvalues (descending) of a symmetric matrix and their eigenvectors.

    Args:
        matrix: ``(d, d)``, symmetric.
        k: Number of eigenpairs, ``1 ≤ k ≤ d``.
        progress: Called after each matrix-vector product and at each stage.
        seed: Seeds the Lanczos start vector.

    Returns:
        Eigenvalues ``(k,)`` descending and eigenvectors ``(d, k)`` as columns, in the matrix's
        dtype.

    Raises:
        ValueError: ``k`` outside ``[1, d]``.
    """
    d = matrix.shape[0]
    if not 1 <= k <= d:
        raise ValueError(f"k must be within [1, {d}], got {k}")
    report = progress or (lambda done, total, stage: None)
    m = max(2 * k + 20, 40)
    eps = torch.finfo(matrix.dtype).eps
    generator = torch.Generator().manual_seed(seed)
    while 4 * m <= d:
        theta, vectors, residuals = _lanczos_ritz(matrix, k, m, generator, report)
        tol = torch.maximum(1e-6 * theta.abs(), 64 * eps * theta[0].abs())
        if bool((residuals <= tol).all()):
            return theta.to(matrix.dtype), vectors.to(matrix.dtype)
        m *= 2
    report(0, 1, "eigenpairs: full eigendecomposition")
    evals, evecs = torch.linalg.eigh(matrix)
    report(1, 1, "eigenpairs: full eigendecomposition")
    return evals.flip(0)[:k], evecs.flip(1)[:, :k]


def _lanczos_ritz(
    matrix: Tensor, k: int, m: int, generator: torch.Generator, report: Progress
) -> tuple[Tensor, Tensor, Tensor]:
    """m Lanczos steps (full reorthogonalisation, twice) and the top-k Ritz pairs with their
    residual norms, in float64."""
    d = matrix.shape[0]
    device = matrix.device

    def matvec(v: Tensor) -> Tensor:
        return (matrix @ v.to(matrix.dtype)).to(_F64)

    basis = torch.zeros(d, m, dtype=_F64, device=device)
    alpha = torch.zeros(m, dtype=_F64, device=device)
    beta = torch.zeros(m, dtype=_F64, device=device)
    start = torch.randn(d, generator=generator, dtype=_F64).to(device)
    basis[:, 0] = start / torch.linalg.vector_norm(start)
    steps = m
    stage = f"eigenpairs: lanczos ({m} steps)"
    for j in range(m):
        w = matvec(basis[:, j])
        alpha[j] = basis[:, j] @ w
        for _ in range(2):  # "twice is enough" (Parlett 1998)
            w = w - basis[:, : j + 1] @ (basis[:, : j + 1].t() @ w)
        report(j + 1, m, stage)
        if j == m - 1:
            break
        b = torch.linalg.vector_norm(w)
        if float(b) <= 1e-12 * max(float(alpha[: j + 1].abs().max()), 1e-300):
            fresh = torch.randn(d, generator=generator, dtype=_F64).to(device)
            for _ in range(2):
                fresh = fresh - basis[:, : j + 1] @ (basis[:, : j + 1].t() @ fresh)
            norm = torch.linalg.vector_norm(fresh)
            if float(norm) <= 1e-8:
                steps = j + 1
                break
            basis[:, j + 1] = fresh / norm  # beta stays 0: an invariant subspace ended
            continue
        beta[j] = b
        basis[:, j + 1] = w / b
    basis, alpha, beta = basis[:, :steps], alpha[:steps], beta[: steps - 1]
    tridiagonal = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    theta, s = torch.linalg.eigh(tridiagonal)
    kk = min(k, steps)
    theta, s = theta.flip(0)[:kk], s.flip(1)[:, :kk]
    vectors = basis @ s
    report(0, kk, "eigenpairs: residuals")
    residuals = torch.linalg.vector_norm(matvec_block(matrix, vectors) - vectors * theta, dim=0)
    if kk < k:  # the whole space was spanned with fewer than k vectors: impossible for k ≤ d
        residuals = torch.full((k,), float("inf"), dtype=_F64)
    return theta, vectors, residuals


def matvec_block(matrix: Tensor, vectors: Tensor) -> Tensor:
    """``matrix @ vectors`` in float64 from a matrix in any dtype."""
    return (matrix @ vectors.to(matrix.dtype)).to(_F64)
