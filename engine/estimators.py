"""Matrix-free estimators: trace, diagonal, top eigenpairs and spectral density.

Each estimator needs only products ``M V`` with a symmetric positive semi-definite operator, so
it works on every representation, implicit ones included (they store no matrix):

* a ``PMat*`` — anything with ``mv(PVector) -> PVector`` and ``layer_collection``; when the object
  also has ``matmat`` (or ``mm``) taking a ``(d, r)`` tensor, probes go through it in blocks;
* an :class:`~fimntk.engine.fspace.FMatDense` ``(c, n, c, n)``, seen as a ``(c·n, c·n)`` operator;
* a dense ``(d, d)`` tensor;
* a callable ``matmat(V: (d, r)) -> (d, r)`` with ``dim=d`` (it receives float64 CPU tensors).

All work happens in float64 (products are taken in the operator's own dtype); every result is
float64 on the operator's device, with an error bar. Random probes come from a local
:class:`torch.Generator` seeded by ``seed`` (drawn on the CPU, so a seed gives the same probes on
every device); the global RNG is never touched.

======================  ==================================  ====================================
function                estimates                           error bar
======================  ==================================  ====================================
``hutchinson_trace``    ``tr(M)``                           standard error of the mean
``hutchpp_trace``       ``tr(M)``                           standard error of the residual part
``hutchinson_diag``     ``diag(M)``, ``(d,)``               per-entry standard error
``lanczos_eigenpairs``  top-k eigenvalues and eigenvectors  residual norms ``‖Mv − λv‖``
``slq_density``         spectral density, ``tr f(M)``       standard error across probes
======================  ==================================  ====================================

Example::

    F = FIM(model, loader, "blockdiag")
    est = hutchpp_trace(F, n_matvecs=99, seed=0)
    est.estimate, est.stderr                      # tr(F) and its standard error
    slq_density(F, n_probes=10).plot("spectrum.png")
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.fspace import FMatDense
from fimntk.engine.vector import FVector, PVector

__all__ = [
    "EigenEstimate",
    "Estimate",
    "SpectralDensity",
    "hutchinson_diag",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos_eigenpairs",
    "slq_density",
]

#: Probe vectors per operator call (bounds the ``(d, r)`` work buffers).
_BLOCK = 32
#: A Lanczos step whose new direction is below this fraction of ‖M‖ ends a Krylov space.
_BREAKDOWN = 1e-10
_DISTRIBUTIONS = ("rademacher", "gaussian")
_F64 = torch.float64


# ----- results ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A stochastic estimate and its standard error.

    Attributes:
        estimate: the estimate, ``()`` for a trace, ``(d,)`` for a diagonal (float64).
        stderr: its standard error, same shape: about 68% of seeds land within one, 99.7%
            within three for a near-Gaussian sample mean.
        n_matvecs: products ``M v`` spent.
    """

    estimate: Tensor
    stderr: Tensor
    n_matvecs: int


@dataclass(frozen=True)
class EigenEstimate:
    """Ritz approximations of the k largest eigenpairs.

    Attributes:
        eigenvalues: ``(k,)``, descending (float64).
        eigenvectors: ``(d, k)``, orthonormal columns (float64).
        residual_norms: ``(k,)``, ``‖M v_i − λ_i v_i‖``; for symmetric M, an eigenvalue of M lies
            within this distance of ``λ_i`` (and within ``‖r_i‖² / gap_i`` once converged).
        n_matvecs: products ``M v`` spent (the residual check included).
        layer_collection: the parameter layout, when M was a ``PMat*``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residual_norms: Tensor
    n_matvecs: int
    layer_collection: Any = None

    def pvectors(self, dtype: torch.dtype | None = None) -> list[PVector]:
        """The eigenvectors as k :class:`PVector` (in ``dtype``, default float64)."""
        if self.layer_collection is None:
            raise InvalidInputError("these eigenvectors do not come from a PMat: no layout")
        vecs = self.eigenvectors if dtype is None else self.eigenvectors.to(dtype)
        return [
            PVector(self.layer_collection, vecs[:, i].contiguous()) for i in range(vecs.shape[1])
        ]


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature of the spectral density ``φ(t) = (1/d) Σ_i δ(t − λ_i)``.

    Probe ``l`` gives Gauss quadrature nodes ``θ_{lj}`` (Ritz values) and weights ``τ_{lj}``
    (squared first components of the Ritz vectors of the tridiagonal matrix; they sum to 1), so

    .. math::

        φ_σ(t) ≈ \\frac{1}{n_v} \\sum_{l=1}^{n_v} \\sum_{j=1}^{m} τ_{lj}\\, g_σ(t − θ_{lj}),
        \\qquad g_σ(t) = \\frac{e^{-t^2 / 2σ^2}}{σ\\sqrt{2π}}.

    Attributes:
        grid: ``(G,)`` points where the density is evaluated.
        density: ``(G,)`` Gaussian-smoothed density (integrates to about 1 over the grid).
        stderr: ``(G,)`` standard error of the density across probes.
        nodes: ``(n_probes, m)`` Ritz values per probe (zero-padded where a Krylov space ended).
        weights: ``(n_probes, m)`` quadrature weights (zero where padded).
        sigma: the smoothing width.
        dim: d, the operator's size.
        n_matvecs: products ``M v`` spent.
    """

    grid: Tensor
    density: Tensor
    stderr: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    dim: int
    n_matvecs: int

    def trace_function(self, f: Callable[[Tensor], Tensor]) -> Estimate:
        """``tr f(M) ≈ (d / n_v) Σ_l Σ_j τ_lj f(θ_lj)`` (Ubaru, Chen & Saad 2017), with the
        standard error across probes. Exact per probe for polynomials of degree < 2m."""
        mask = self.weights > 0
        vals = torch.where(
            mask,
            f(torch.where(mask, self.nodes, torch.ones_like(self.nodes))),
            torch.zeros_like(self.nodes),
        )
        samples = self.dim * (self.weights * vals).sum(dim=1)
        return _mean_estimate(samples, 0)

    def moment(self, p: int) -> Estimate:
        """The p-th moment of the density, ``∫ t^p φ(t) dt = (1/d) tr(M^p)``."""
        p = _check_int("p", p, 0)
        est = self.trace_function(lambda t: t**p)
        return Estimate(est.estimate / self.dim, est.stderr / self.dim, 0)

    @property
    def trace_estimate(self) -> Estimate:
        """``tr(M)``: the Hutchinson estimate over the probes (``n_matvecs`` of 0: no more)."""
        return self.trace_function(lambda t: t)

    def plot(self, path: str | Path, *, log: bool = False, title: str | None = None) -> Path:
        """Write a PNG of the density with a ±2 standard-error band; returns the path.

        Uses matplotlib's object API (no pyplot, no global backend change)."""
        from matplotlib.figure import Figure

        x = self.grid.detach().cpu().numpy()
        y = self.density.detach().cpu().numpy()
        se = self.stderr.detach().cpu().numpy()
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.subplots()
        floor = max(float(y.max()) * 1e-12, 1e-300) if log else 0.0
        lo = (y - 2 * se).clip(min=floor)
        ax.fill_between(x, lo, y + 2 * se, alpha=0.3, label="±2 standard errors")
        ax.plot(x, y.clip(min=floor), lw=1.5, label=f"SLQ density (σ={self.sigma:.3g})")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        n_probes, m = self.nodes.shape
        ax.set_title(title or f"spectral density, d={self.dim}, {n_probes} probes × {m} steps")
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, format="png")
        return path


# ----- the operator -----------------------------------------------------------------------------
#: ``progress(done, total, stage)`` after each block of products; it may raise to stop the
#: estimator (the worker's cancel).
Progress = Callable[[int, int | None, str], None]


@dataclass(frozen=True)
class _Operator:
    """``V ↦ M V`` on float64 ``(d, r)`` blocks, whatever M was given as; counts its products
    and reports them to ``progress`` (``total`` products expected)."""

    dim: int
    dtype: torch.dtype
    device: torch.device
    fn: Callable[[Tensor], Tensor]
    layer_collection: Any = None
    progress: Progress | None = None
    total: int | None = None
    done: list[int] = field(default_factory=lambda: [0])

    def reporting(self, progress: Progress | None, total: int) -> _Operator:
        """This operator, reporting its products to ``progress`` out of ``total``."""
        return replace(self, progress=progress, total=total, done=[0])

    def matmat(self, V: Tensor) -> Tensor:
        """``M V`` for ``V`` of shape ``(d, r)`` in float64, by blocks of at most ``_BLOCK``."""
        outs = []
        for start in range(0, V.shape[1], _BLOCK):
            block = V[:, start : start + _BLOCK].to(device=self.device, dtype=self.dtype)
            out = self.fn(block)
            if not isinstance(out, Tensor) or tuple(out.shape) != tuple(block.shape):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise InvalidInputError(
                    f"the operator mapped a {tuple(block.shape)} block to {got}; "
                    "matmat must return a tensor of the same shape"
                )
            outs.append(out.to(device=self.device, dtype=_F64))
            self.done[0] += block.shape[1]
            if self.progress is not None:
                self.progress(self.done[0], self.total, "products")
        return torch.cat(outs, dim=1)


def _first_tensor(data: Any) -> Tensor | None:
    if isinstance(data, Tensor):
        return data if data.is_floating_point() else None
    if isinstance(data, dict):
        data = list(data.values())
    if isinstance(data, (tuple, list)):
        for x in data:
            t = _first_tensor(x)
            if t is not None:
                return t
    return None


def _dtype_device(M: Any) -> tuple[torch.dtype, torch.device]:
    """The dtype and device M computes in: its ``dtype``, stored data, or generator's model."""
    dtype = getattr(M, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype, torch.device(getattr(M, "device", "cpu"))
    t = _first_tensor(getattr(M, "data", None))
    if t is None:
        model = getattr(getattr(M, "generator", None), "model", None)
        if isinstance(model, torch.nn.Module):
            t = _first_tensor([p for p in model.parameters()])
    if t is None:
        return torch.get_default_dtype(), torch.device("cpu")
    return t.dtype, t.device


def _mv_loop(mv: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def fn(V: Tensor) -> Tensor:
        return torch.stack([mv(V[:, j].contiguous()) for j in range(V.shape[1])], dim=1)

    return fn


def _as_operator(M: Any, dim: int | None = None) -> _Operator:
    """Normalise the accepted inputs (see the module docstring) to one :class:`_Operator`."""
    if isinstance(M, Tensor):
        if M.dim() != 2 or M.shape[0] != M.shape[1] or not M.is_floating_point():
            raise InvalidInputError(
                f"a tensor operator must be a square floating (d, d) matrix; got "
                f"{tuple(M.shape)} of {M.dtype}"
            )
        op = _Operator(M.shape[0], M.dtype, M.device, lambda V: M @ V)
    elif isinstance(M, FMatDense):
        c, n = M.shape[:2]
        op = _Operator(
            c * n,
            M.data.dtype,
            M.data.device,
            _mv_loop(
                lambda x: M.mv(FVector(x.reshape(c, n))).get_flat_representation().reshape(-1)
            ),
        )
    elif getattr(M, "layer_collection", None) is not None and (
        callable(getattr(M, "matmat", None))
        or callable(getattr(M, "mm", None))
        or callable(getattr(M, "mv", None))
    ):
        lc = M.layer_collection
        dtype, device = _dtype_device(M)
        block = getattr(M, "matmat", None) or getattr(M, "mm", None)
        if callable(block):
            fn = block
        else:
            fn = _mv_loop(lambda x: M.mv(PVector(lc, x)).get_flat_representation())
        op = _Operator(lc.numel(), dtype, device, fn, lc)
    elif callable(M):
        if dim is None:
            raise InvalidInputError("a bare matmat callable needs its size: pass dim=d")
        op = _Operator(_check_int("dim", dim, 1), _F64, torch.device("cpu"), M)
    else:
        raise InvalidInputError(
            f"cannot take products with a {type(M).__name__}: pass a PMat (or any object with "
            "mv(PVector) and layer_collection), an FMatDense, a (d, d) tensor, or a callable "
            "matmat(V: (d, r)) -> (d, r) with dim=d"
        )
    if dim is not None and _check_int("dim", dim, 1) != op.dim:
        raise InvalidInputError(f"dim={dim} but the operator has size {op.dim}")
    return op


# ----- argument checks and shared helpers -------------------------------------------------------
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool):
        raise InvalidInputError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise InvalidInputError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise InvalidInputError(f"{name} must be at least {minimum}, got {value}")
    return value


def _generator(seed: Any) -> torch.Generator:
    seed = _check_int("seed", seed, 0)
    return torch.Generator(device="cpu").manual_seed(seed)


def _check_distribution(distribution: str) -> str:
    if distribution not in _DISTRIBUTIONS:
        raise InvalidInputError(
            f"distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}"
        )
    return distribution


def _probes(g: torch.Generator, op: _Operator, r: int, distribution: str) -> Tensor:
    """``(d, r)`` float64 probes with ``E[z zᵀ] = I``, drawn on the CPU then moved."""
    if distribution == "rademacher":
        z = torch.randint(0, 2, (r, op.dim), generator=g).to(_F64).mul_(2).sub_(1)
    else:
        z = torch.randn(r, op.dim, generator=g, dtype=_F64)
    return z.t().to(op.device)


def _mean_estimate(samples: Tensor, n_matvecs: int) -> Estimate:
    """Sample mean over dim 0 and its standard error ``s / √n``."""
    n = samples.shape[0]
    return Estimate(samples.mean(dim=0), samples.std(dim=0) / math.sqrt(n), n_matvecs)


# ----- trace and diagonal -----------------------------------------------------------------------
def hutchinson_trace(
    M: Any,
    n_samples: int = 100,
    seed: int = 0,
    distribution: str = "rademacher",
    *,
    dim: int | None = None,
    progress: Progress | None = None,
) -> Estimate:
    """Hutchinson's trace estimator (Hutchinson 1989).

    .. math::

        \\operatorname{tr}(M) ≈ \\frac{1}{s} \\sum_{i=1}^{s} z_i^\\top M z_i,
        \\qquad \\mathbb{E}[z z^\\top] = I,

    with Rademacher (variance ``2 ‖M‖_F² − 2 Σ_j M_jj²`` per sample, the least) or Gaussian
    (``2 ‖M‖_F²``) probes. The error bar is the standard error of the sample mean.

    Args:
        M: the operator (module docstring), ``(d, d)``.
        n_samples: number of probes s (≥ 2), one product each.
        seed: seeds the local generator of the probes.
        distribution: ``"rademacher"`` or ``"gaussian"``.
        dim: d, only for a bare callable.
        progress: ``progress(done, total, stage)`` after each block of products; it may
            raise to stop the estimator.

    Returns:
        :class:`Estimate` with ``estimate`` and ``stderr`` of shape ``()``.

    Example (a diagonal matrix: every Rademacher sample is the trace)::

        >>> est = hutchinson_trace(torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0])), n_samples=8)
        >>> float(est.estimate), float(est.stderr), est.n_matvecs
        (10.0, 0.0, 8)
    """
    n_samples = _check_int("n_samples", n_samples, 2)
    op = _as_operator(M, dim).reporting(progress, n_samples)
    distribution = _check_distribution(distribution)
    g = _generator(seed)
    samples = []
    for start in range(0, n_samples, _BLOCK):
        Z = _probes(g, op, min(_BLOCK, n_samples - start), distribution)
        samples.append((Z * op.matmat(Z)).sum(dim=0))
    return _mean_estimate(torch.cat(samples), n_samples)


def hutchpp_trace(
    M: Any,
    n_matvecs: int = 99,
    seed: int = 0,
    distribution: str = "rademacher",
    *,
    dim: int | None = None,
    progress: Progress | None = None,
) -> Estimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal stochastic trace
    estimation"): the trace of a sketched top subspace exactly, plus Hutchinson on the rest.

    With ``k = ⌊m/3⌋`` sketch probes ``S``, ``Q = orth(M S)`` ``(d, k)`` and ``s = m − 2k`` probes
    ``G``,

    .. math::

        \\operatorname{tr}(M) ≈ \\operatorname{tr}(Q^\\top M Q)
        + \\frac{1}{s} \\sum_{i=1}^{s} g_i^\\top (I − QQ^\\top) M (I − QQ^\\top) g_i,

    which needs ``O(1/ε)`` products for relative error ε on PSD M, against ``O(1/ε²)`` for
    Hutchinson. Given Q the first term is exact, so the error bar is the standard error of the
    residual Hutchinson term (small when M's spectrum decays fast).

    Args:
        M: the operator, ``(d, d)``, symmetric PSD.
        n_matvecs: total products m (≥ 4): k for the sketch, k for ``M Q``, m − 2k for the
            residual.
        seed: seeds the local generator of ``S`` and ``G``.
        distribution: of the probes, ``"rademacher"`` or ``"gaussian"``.
        dim: d, only for a bare callable.
        progress: ``progress(done, total, stage)`` after each block of products; it may
            raise to stop the estimator.

    Returns:
        :class:`Estimate` with ``estimate`` and ``stderr`` of shape ``()``.

    Example (rank 2 < k: the sketch captures M and the residual vanishes)::

        >>> u = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
        >>> est = hutchpp_trace(u @ u.T, n_matvecs=9)
        >>> round(float(est.estimate), 10), round(float(est.stderr), 10)
        (5.0, 0.0)
    """
    n_matvecs = _check_int("n_matvecs", n_matvecs, 4)
    op = _as_operator(M, dim).reporting(progress, n_matvecs)
    distribution = _check_distribution(distribution)
    g = _generator(seed)
    k = n_matvecs // 3
    s = n_matvecs - 2 * k
    Q, _ = torch.linalg.qr(op.matmat(_probes(g, op, k, distribution)))  # (d, min(d, k))
    top = (Q * op.matmat(Q)).sum()
    samples = []
    for start in range(0, s, _BLOCK):
        G = _probes(g, op, min(_BLOCK, s - start), distribution)
        G = G - Q @ (Q.t() @ G)
        samples.append((G * op.matmat(G)).sum(dim=0))
    rest = _mean_estimate(torch.cat(samples), 0)
    return Estimate(top + rest.estimate, rest.stderr, 2 * k + s)


def hutchinson_diag(
    M: Any,
    n_samples: int = 100,
    seed: int = 0,
    distribution: str = "rademacher",
    *,
    dim: int | None = None,
    progress: Progress | None = None,
) -> Estimate:
    """The stochastic diagonal estimator of Bekas, Kokiopoulou & Saad (2007).

    .. math::

        \\operatorname{diag}(M) ≈ \\frac{1}{s} \\sum_{i=1}^{s} z_i ⊙ M z_i,

    unbiased for probes with ``E[z zᵀ] = I``; with Rademacher probes entry j has variance
    ``Σ_{k≠j} M_jk²`` (zero for a diagonal M). The error bar is the per-entry standard error,
    accumulated blockwise (Chan, Golub & LeVeque 1983) so memory stays ``O(d)``.

    Args:
        M: the operator, ``(d, d)``.
        n_samples: number of probes s (≥ 2).
        seed: seeds the local generator of the probes.
        distribution: ``"rademacher"`` or ``"gaussian"``.
        dim: d, only for a bare callable.
        progress: ``progress(done, total, stage)`` after each block of products; it may
            raise to stop the estimator.

    Returns:
        :class:`Estimate` with ``estimate`` and ``stderr`` of shape ``(d,)``.

    Example::

        >>> est = hutchinson_diag(torch.diag(torch.tensor([1.0, 5.0])), n_samples=4)
        >>> est.estimate.tolist(), est.stderr.tolist()
        ([1.0, 5.0], [0.0, 0.0])
    """
    n_samples = _check_int("n_samples", n_samples, 2)
    op = _as_operator(M, dim).reporting(progress, n_samples)
    distribution = _check_distribution(distribution)
    g = _generator(seed)
    count, mean = 0, torch.zeros(op.dim, dtype=_F64, device=op.device)
    m2 = torch.zeros_like(mean)
    for start in range(0, n_samples, _BLOCK):
        Z = _probes(g, op, min(_BLOCK, n_samples - start), distribution)
        X = Z * op.matmat(Z)  # (d, r) samples
        r = X.shape[1]
        mean_b = X.mean(dim=1)
        m2_b = ((X - mean_b[:, None]) ** 2).sum(dim=1)
        delta = mean_b - mean
        total = count + r
        mean = mean + delta * (r / total)
        m2 = m2 + m2_b + delta**2 * (count * r / total)
        count = total
    stderr = (m2 / (count - 1)).sqrt() / math.sqrt(count)
    return Estimate(mean, stderr, n_samples)


# ----- Lanczos ----------------------------------------------------------------------------------
def _lanczos(
    op: _Operator, v0: Tensor, n_iter: int, restart: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Lanczos with full (twice-applied) reorthogonalisation, in float64.

    Returns ``alpha (m,)``, ``beta (m − 1,)`` (the tridiagonal ``T = Vᵀ M V``), the basis
    ``V (d, m)`` and the products spent. When a Krylov space ends (``β ≈ 0``) it stops with
    ``m < n_iter``, unless ``restart`` is a generator: then a fresh random direction orthogonal to
    the basis continues it (``β = 0`` there), so the Ritz values still cover the spectrum.
    """
    d = op.dim
    V = torch.zeros(d, n_iter, dtype=_F64, device=op.device)
    alpha = torch.zeros(n_iter, dtype=_F64, device=op.device)
    beta = torch.zeros(n_iter, dtype=_F64, device=op.device)
    V[:, 0] = v0 / torch.linalg.vector_norm(v0)
    scale, m = 0.0, n_iter
    for j in range(n_iter):
        w = op.matmat(V[:, j : j + 1])[:, 0]
        basis = V[:, : j + 1]
        for _ in range(2):  # "twice is enough" (Parlett 1998)
            h = basis.t() @ w
            w = w - basis @ h
            alpha[j] += h[j]
        if j == n_iter - 1:
            break
        b = torch.linalg.vector_norm(w)
        scale = max(scale, float(alpha[j].abs()), float(b), float(beta[j - 1]) if j else 0.0)
        if float(b) > _BREAKDOWN * scale:
            beta[j] = b
            V[:, j + 1] = w / b
            continue
        if restart is None:
            m = j + 1
            break
        fresh = torch.randn(d, generator=restart, dtype=_F64).to(op.device)
        for _ in range(2):
            fresh = fresh - basis @ (basis.t() @ fresh)
        norm = torch.linalg.vector_norm(fresh)
        if float(norm) <= 1e-8:  # the basis spans the whole space
            m = j + 1
            break
        V[:, j + 1] = fresh / norm
    return alpha[:m], beta[: m - 1], V[:, :m], m


def _tridiag(alpha: Tensor, beta: Tensor) -> Tensor:
    return torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)


def lanczos_eigenpairs(
    M: Any,
    k: int = 5,
    n_iter: int | None = None,
    seed: int = 0,
    *,
    dim: int | None = None,
    progress: Progress | None = None,
) -> EigenEstimate:
    """The k largest eigenpairs of a symmetric M by the Lanczos method (Lanczos 1950).

    After m steps from a random start, ``M V_m = V_m T_m + β_m v_{m+1} e_mᵀ`` with ``T_m``
    tridiagonal; the Ritz pairs ``(θ_i, V_m s_i)`` of ``T_m = S Θ Sᵀ`` approximate the extreme
    eigenpairs of M, the largest first. Full reorthogonalisation keeps ``V_m`` orthonormal (no
    spurious copies), and a Krylov space that closes early (a low-rank Fisher) is continued from a
    fresh random direction. The error bar is the explicit residual; for symmetric M,

    .. math::

        \\min_i |λ_i(M) − θ| ≤ ‖M v − θ v‖ \\quad (‖v‖ = 1)

    (Parlett 1998, *The Symmetric Eigenvalue Problem*, Thm 4.5.1).

    Args:
        M: the operator, ``(d, d)``, symmetric.
        k: number of eigenpairs, ``1 ≤ k ≤ d``.
        n_iter: Lanczos steps m (``k ≤ m``; capped at d); default ``min(d, max(2k + 20, 40))``.
        seed: seeds the start vector (and restarts).
        dim: d, only for a bare callable.
        progress: ``progress(done, total, stage)`` after each block of products; it may
            raise to stop the estimator.

    Returns:
        :class:`EigenEstimate`: eigenvalues ``(k,)`` descending, eigenvectors ``(d, k)``,
        residual norms ``(k,)``; ``n_matvecs`` is m + k (k for the residuals).

    Example::

        >>> M = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> est = lanczos_eigenpairs(M, k=2)
        >>> [round(x, 8) for x in est.eigenvalues.tolist()]
        [10.0, 9.0]
        >>> bool(est.residual_norms.max() < 1e-8)
        True
    """
    op = _as_operator(M, dim)
    k = _check_int("k", k, 1)
    if k > op.dim:
        raise InvalidInputError(f"k={k} exceeds the operator's size d={op.dim}")
    if n_iter is None:
        n_iter = max(2 * k + 20, 40)
    n_iter = min(_check_int("n_iter", n_iter, k), op.dim)
    op = op.reporting(progress, n_iter + k)
    g = _generator(seed)
    v0 = torch.randn(op.dim, generator=g, dtype=_F64).to(op.device)
    alpha, beta, V, m = _lanczos(op, v0, n_iter, restart=g)
    theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
    theta, S = theta.flip(0)[:k], S.flip(1)[:, :k]
    Y = V @ S
    residuals = torch.linalg.vector_norm(op.matmat(Y) - Y * theta, dim=0)
    return EigenEstimate(theta, Y, residuals, m + k, op.layer_collection)


# ----- spectral density -------------------------------------------------------------------------
def slq_density(
    M: Any,
    n_probes: int = 10,
    n_iter: int = 30,
    seed: int = 0,
    grid: Tensor | Sequence[float] | None = None,
    sigma: float | None = None,
    *,
    dim: int | None = None,
    progress: Progress | None = None,
) -> SpectralDensity:
    """The spectral density by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Lin, Saad &
    Yang 2016), as used for network Hessians by Ghorbani, Krishnan & Xiao (2019).

    For a Rademacher probe ``z`` (``‖z‖² = d``), ``v = z/√d`` and m Lanczos steps from v,
    ``vᵀ f(M) v ≈ Σ_j τ_j f(θ_j)`` is the m-point Gauss quadrature of the measure
    ``Σ_i (vᵀu_i)² δ_{λ_i}``, whose mean over v is the density ``φ = (1/d) Σ_i δ_{λ_i}``. Each
    probe's measure is smoothed by a Gaussian of width σ and the probes averaged; see
    :class:`SpectralDensity` for the formula, the error bar and ``trace_function``.

    Args:
        M: the operator, ``(d, d)``, symmetric.
        n_probes: number of probes (≥ 2).
        n_iter: Lanczos steps m per probe (capped at d; fewer when a Krylov space closes).
        seed: seeds the local generator of the probes.
        grid: ``(G,)`` points; default 1000 points over the nodes' range ± 5σ.
        sigma: smoothing width (> 0); default 1% of the nodes' range.
        dim: d, only for a bare callable.
        progress: ``progress(done, total, stage)`` after each block of products; it may
            raise to stop the estimator.

    Returns:
        :class:`SpectralDensity`; ``n_matvecs`` is at most ``n_probes · n_iter``.

    Example::

        >>> sd = slq_density(torch.diag(torch.tensor([1.0, 1.0, 3.0, 3.0])), n_iter=4)
        >>> round(float(sd.trace_estimate.estimate), 10), sd.nodes.shape
        (8.0, torch.Size([10, 4]))
    """
    op = _as_operator(M, dim)
    n_probes = _check_int("n_probes", n_probes, 2)
    n_iter = min(_check_int("n_iter", n_iter, 1), op.dim)
    op = op.reporting(progress, n_probes * n_iter)
    if sigma is not None:
        sigma = float(sigma)
        if not (math.isfinite(sigma) and sigma > 0):
            raise InvalidInputError(f"sigma must be a positive number, got {sigma}")
    if grid is not None:
        grid = torch.as_tensor(grid, dtype=_F64)
        if grid.dim() != 1 or grid.numel() < 2 or not torch.isfinite(grid).all():
            raise InvalidInputError("grid must be a 1-D sequence of at least 2 finite points")
    g = _generator(seed)
    nodes = torch.zeros(n_probes, n_iter, dtype=_F64, device=op.device)
    weights = torch.zeros_like(nodes)
    n_matvecs = 0
    for probe in range(n_probes):
        z = _probes(g, op, 1, "rademacher")[:, 0]
        alpha, beta, _, m = _lanczos(op, z, n_iter)
        theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
        nodes[probe, :m] = theta
        weights[probe, :m] = S[0] ** 2
        n_matvecs += m
    used = nodes[weights > 0]
    lo, hi = float(used.min()), float(used.max())
    if sigma is None:
        spread = hi - lo if hi > lo else max(abs(hi), 1.0)
        sigma = 0.01 * spread
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, 1000, dtype=_F64)
    grid = grid.to(op.device)
    per_probe = torch.stack(
        [  # (n_probes, G), one probe at a time to bound memory
            (w[:, None] * torch.exp(-0.5 * ((grid[None, :] - t[:, None]) / sigma) ** 2)).sum(dim=0)
            for t, w in zip(nodes, weights)
        ]
    ) / (sigma * math.sqrt(2 * math.pi))
    est = _mean_estimate(per_probe, n_matvecs)
    return SpectralDensity(grid, est.estimate, est.stderr, nodes, weights, sigma, op.dim, n_matvecs)
