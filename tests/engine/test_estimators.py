"""Matrix-free estimators against exact values: a dense Fisher of a zoo model (float64, rank 26 of
d = 122) and synthetic PSD matrices with a known spectrum.

Every draw is seeded, so the "within 3 standard errors for most seeds" counts are fixed numbers;
the thresholds leave a margin below the counts observed.
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from fimntk import engine
from fimntk.engine import estimators
from fimntk.engine.estimators import (
    EigenEstimate,
    Estimate,
    SpectralDensity,
    hutchinson_diag,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_eigenpairs,
    slq_density,
)
from fimntk.engine.pspace import PMatDense
from tests import zoo

F64 = torch.float64
SEEDS = range(20)


def _psd(eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    """``Q diag(λ) Qᵀ`` with a seeded random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    d = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    a = q @ torch.diag(eigenvalues.to(F64)) @ q.t()
    return (a + a.t()) / 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small matrices gain nothing from intra-op threads, and lose a lot on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mlp():
    model, loader = zoo.build(zoo.CASES[zoo.CASE_IDS.index("mlp")])
    return model, loader


@pytest.fixture(scope="module")
def fisher(mlp):
    """The dense FIM (PMatDense) and its (d, d) tensor."""
    F = engine.FIM(*mlp, "dense")
    return F, F.to_torch()


@pytest.fixture(scope="module")
def low_rank_plus_small():
    """10 eigenvalues in [10, 50] and 190 in [0, 0.05]."""
    g = torch.Generator().manual_seed(5)
    lams = torch.cat(
        [torch.linspace(50, 10, 10, dtype=F64), 0.05 * torch.rand(190, generator=g, dtype=F64)]
    )
    return _psd(lams, 1)


@pytest.fixture(scope="module")
def smooth_spectrum():
    """Eigenvalues ``(i / 199)²``, i < 200: a spread, continuous-looking spectrum in [0, 1]."""
    lams = torch.linspace(0, 1, 200, dtype=F64) ** 2
    return _psd(lams, 2), lams


def _covered(est: Estimate, exact, z: float = 3.0, atol: float = 1e-12) -> torch.Tensor:
    exact = torch.as_tensor(exact, dtype=F64)
    return (est.estimate - exact).abs() <= z * est.stderr + atol * (1 + exact.abs())


# ----- Hutchinson trace ----------------------------------------------------------------------
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_trace_converges(fisher, distribution):
    F, A = fisher
    exact = float(A.trace())
    errors, stderrs = [], []
    for n in (10, 100, 1000):
        ests = [hutchinson_trace(F, n, seed=s, distribution=distribution) for s in range(10)]
        errors.append(sum(abs(float(e.estimate) - exact) for e in ests) / 10)
        stderrs.append(sum(float(e.stderr) for e in ests) / 10)
        assert all(e.n_matvecs == n for e in ests)
    # expected ratio √10 ≈ 3.2 per step
    assert errors[1] < errors[0] / 1.5 and errors[2] < errors[1] / 1.5
    assert 0.05 < stderrs[2] / stderrs[0] < 0.2


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_trace_error_bar_covers(fisher, low_rank_plus_small, distribution):
    for A, M in ((fisher[1], fisher[0]), (low_rank_plus_small, low_rank_plus_small)):
        exact = A.trace()
        hits = sum(bool(_covered(hutchinson_trace(M, 30, s, distribution), exact)) for s in SEEDS)
        assert hits >= 17, hits


def test_hutchinson_trace_exact_on_diagonal():
    est = hutchinson_trace(torch.diag(torch.arange(1.0, 6.0, dtype=F64)), 7, seed=3)
    assert float(est.estimate) == pytest.approx(15.0, abs=1e-12)
    assert float(est.stderr) == pytest.approx(0.0, abs=1e-12)


# ----- Hutch++ -------------------------------------------------------------------------------
def test_hutchpp_beats_hutchinson_at_equal_matvecs(low_rank_plus_small):
    A = low_rank_plus_small
    exact = float(A.trace())
    for m in (30, 99):
        h = [abs(float(hutchinson_trace(A, m, s).estimate) - exact) for s in SEEDS]
        hpp = [hutchpp_trace(A, m, s) for s in SEEDS]
        assert all(e.n_matvecs == m for e in hpp)
        hpp_err = [abs(float(e.estimate) - exact) for e in hpp]
        assert sum(hpp_err) < sum(h) / 10


def test_hutchpp_error_bar_covers_and_converges(fisher, low_rank_plus_small, smooth_spectrum):
    for A in (low_rank_plus_small, smooth_spectrum[0]):
        exact = A.trace()
        hits = sum(bool(_covered(hutchpp_trace(A, 30, s), exact)) for s in SEEDS)
        assert hits >= 17, hits
        errors = [
            sum(abs(float(hutchpp_trace(A, m, s).estimate - exact)) for s in range(10))
            for m in (12, 48, 192)
        ]
        assert errors[2] < errors[1] < errors[0]
    # sketch of rank ≥ rank(F) = 26: exact up to rounding
    F, A = fisher
    est = hutchpp_trace(F, 90, seed=0)
    assert float(est.estimate) == pytest.approx(float(A.trace()), rel=1e-10)
    assert float(est.stderr) < 1e-10


# ----- Hutchinson diagonal -------------------------------------------------------------------
def test_hutchinson_diag_converges_and_covers(fisher, smooth_spectrum):
    for M, A in (fisher, (smooth_spectrum[0], smooth_spectrum[0])):
        exact = torch.diagonal(A)
        errors = []
        for n in (10, 100, 1000):
            est = hutchinson_diag(M, n, seed=1)
            assert est.estimate.shape == est.stderr.shape == exact.shape
            errors.append(float(torch.linalg.vector_norm(est.estimate - exact)))
        assert errors[1] < errors[0] / 1.5 and errors[2] < errors[1] / 1.5
        for s in range(5):
            frac = float(_covered(hutchinson_diag(M, 30, seed=s), exact).double().mean())
            assert frac >= 0.9, frac


def test_hutchinson_diag_exact_on_pmatdiag(mlp):
    D = engine.FIM(*mlp, "diag")
    est = hutchinson_diag(D, 5, seed=0)
    torch.testing.assert_close(est.estimate, D.get_diag(), rtol=1e-12, atol=1e-15)
    assert float(est.stderr.max()) < 1e-12


# ----- Lanczos -------------------------------------------------------------------------------
def test_lanczos_matches_eigh_on_synthetic():
    lams = 10 * 0.8 ** torch.arange(150, dtype=F64)
    A = _psd(lams, 3)
    est = lanczos_eigenpairs(A, k=6, seed=0)
    assert isinstance(est, EigenEstimate)
    torch.testing.assert_close(est.eigenvalues, lams[:6], rtol=0, atol=1e-8)
    assert float(est.residual_norms.max()) < 1e-6
    _, evecs = torch.linalg.eigh(A)
    overlap = (evecs.flip(1)[:, :6] * est.eigenvectors).sum(dim=0).abs()
    torch.testing.assert_close(overlap, torch.ones(6, dtype=F64), rtol=0, atol=1e-8)
    gram = est.eigenvectors.t() @ est.eigenvectors
    torch.testing.assert_close(gram, torch.eye(6, dtype=F64), rtol=0, atol=1e-10)
    assert est.n_matvecs == 40 + 6


@pytest.mark.parametrize("k", [1, 5, 30])
def test_lanczos_matches_eigh_on_fisher(fisher, k):
    """k = 30 > rank(F) = 26: the Krylov space closes and is restarted."""
    F, A = fisher
    exact = torch.linalg.eigvalsh(A).flip(0)[:k]
    est = lanczos_eigenpairs(F, k=k, seed=0)
    torch.testing.assert_close(est.eigenvalues, exact, rtol=0, atol=1e-8)
    assert float(est.residual_norms.max()) < 1e-8
    assert bool(((est.eigenvalues - exact).abs() <= est.residual_norms + 1e-12).all())
    vs = est.pvectors()
    assert len(vs) == k and vs[0].layer_collection == F.layer_collection


def test_lanczos_residual_is_an_honest_error_bar(smooth_spectrum):
    """Few steps on a clustered spectrum: not converged, and the residual says so — an exact
    eigenvalue lies within each Ritz value's residual (Parlett 1998, Thm 4.5.1)."""
    A, lams = smooth_spectrum
    for seed in range(5):
        est = lanczos_eigenpairs(A, k=3, n_iter=8, seed=seed)
        assert float((est.eigenvalues - lams.flip(0)[:3]).abs().max()) > 1e-3
        nearest = (est.eigenvalues[:, None] - lams[None, :]).abs().min(dim=1).values
        assert bool((nearest <= est.residual_norms).all())
        assert float(est.residual_norms.min()) > 1e-3


# ----- stochastic Lanczos quadrature ---------------------------------------------------------
def test_slq_density_is_normalised(fisher, smooth_spectrum):
    for M, A in (fisher, (smooth_spectrum[0], smooth_spectrum[0])):
        sd = slq_density(M, n_probes=8, n_iter=30, seed=0)
        assert isinstance(sd, SpectralDensity)
        assert float(torch.trapezoid(sd.density, sd.grid)) == pytest.approx(1.0, abs=1e-3)
        torch.testing.assert_close(sd.weights.sum(dim=1), torch.ones(8, dtype=F64))
        evals = torch.linalg.eigvalsh(A)
        used = sd.nodes[sd.weights > 0]
        assert float(used.min()) >= float(evals[0]) - 1e-8
        assert float(used.max()) <= float(evals[-1]) + 1e-8
        assert sd.grid.shape == sd.density.shape == sd.stderr.shape
        assert bool((sd.density >= 0).all())


def test_slq_trace_and_moments_converge(fisher, smooth_spectrum):
    A = smooth_spectrum[0]
    exact = float(A.trace())
    errors = [
        sum(
            abs(float(slq_density(A, n, 4, seed=s).trace_estimate.estimate) - exact)
            for s in range(10)
        )
        for n in (4, 16, 64)
    ]
    assert errors[1] < errors[0] / 1.3 and errors[2] < errors[1] / 1.3  # expected ratio 2
    for M, X in (fisher, (A, A)):
        exact = X.trace()
        m2 = (X * X).sum() / X.shape[0]  # Gauss quadrature is exact for t²: unbiased
        hits_trace = hits_m2 = 0
        for s in SEEDS:
            sd = slq_density(M, 10, 4, seed=s)
            hits_trace += bool(_covered(sd.trace_estimate, exact))
            hits_m2 += bool(_covered(sd.moment(2), m2))
        assert hits_trace >= 17 and hits_m2 >= 17, (hits_trace, hits_m2)


def test_slq_density_converges_to_smoothed_spectrum(smooth_spectrum):
    A, lams = smooth_spectrum
    grid = torch.linspace(-0.3, 1.3, 401, dtype=F64)
    sigma = 0.05
    exact = torch.exp(-0.5 * ((grid[:, None] - lams[None, :]) / sigma) ** 2).sum(dim=1)
    exact = exact / (lams.numel() * sigma * math.sqrt(2 * math.pi))

    def l1(n, seed):
        sd = slq_density(A, n, 20, seed=seed, grid=grid, sigma=sigma)
        return float(torch.trapezoid((sd.density - exact).abs(), grid)), sd

    few = sum(l1(4, s)[0] for s in range(4))
    many = sum(l1(64, s)[0] for s in range(4))
    assert many < few / 2  # expected ratio 4
    _, sd = l1(20, 0)
    frac = float(((sd.density - exact).abs() <= 3 * sd.stderr + 1e-6).double().mean())
    assert frac >= 0.9, frac


def test_slq_plot_writes_png(fisher, tmp_path):
    pytest.importorskip("matplotlib")
    sd = slq_density(fisher[0], n_probes=3, n_iter=10)
    for log in (False, True):
        path = sd.plot(tmp_path / f"density_{log}.png", log=log)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----- every representation ------------------------------------------------------------------
class _ImplicitLike:
    """Only ``mv`` and ``layer_collection``, no stored matrix (like PMatImplicit)."""

    dtype = F64

    def __init__(self, A, lc):
        self._A, self.layer_collection, self.calls = A, lc, 0

    def mv(self, v):
        self.calls += 1
        return engine.PVector(self.layer_collection, self._A @ v.get_flat_representation())


class _Blocked(_ImplicitLike):
    """Also ``matmat`` on ``(d, r)`` blocks: used instead of looping ``mv``."""

    def matmat(self, V):
        self.calls += 1
        return self._A @ V


def _operators(mlp, fisher):
    F, A = fisher
    lc = F.layer_collection
    D = engine.FIM(*mlp, "diag")
    B = engine.FIM(*mlp, "blockdiag")
    K = engine.NTK(*mlp)
    L = engine.FIM(*mlp, "lowrank")
    KF = engine.FIM(*mlp, "kfac")
    c, n = K.shape[:2]
    return {
        "PMatDense": (F, A),
        "PMatDense_float32": (PMatDense(lc, data=A.float()), A.float().double()),
        "PMatDiag": (D, D.to_torch()),
        "PMatBlockDiag": (B, B.to_torch()),
        "PMatLowRank": (L, L.to_torch()),
        "PMatKFAC": (KF, KF.to_torch()),
        "FMatDense": (K, K.to_torch().reshape(c * n, c * n)),
        "tensor": (A, A),
        "implicit_like": (_ImplicitLike(A, lc), A),
        "blocked": (_Blocked(A, lc), A),
    }


REPS = [
    "PMatDense",
    "PMatDense_float32",
    "PMatDiag",
    "PMatBlockDiag",
    "PMatLowRank",
    "PMatKFAC",
    "FMatDense",
    "tensor",
    "implicit_like",
    "blocked",
]


@pytest.mark.parametrize("rep", REPS)
def test_every_representation(mlp, fisher, rep):
    M, A = _operators(mlp, fisher)[rep]
    d = A.shape[0]
    tol = 1e-5 if rep.endswith("float32") else 1e-8
    exact_trace = float(A.trace())
    est = hutchinson_trace(M, 400, seed=0)
    assert bool(_covered(est, exact_trace, z=4.0))
    est = hutchpp_trace(M, 3 * d, seed=0)  # a full sketch: exact
    assert float(est.estimate) == pytest.approx(exact_trace, rel=tol, abs=tol)
    est = hutchinson_diag(M, 50, seed=0)
    assert float(_covered(est, torch.diagonal(A), atol=tol).double().mean()) >= 0.9
    evals = torch.linalg.eigvalsh(A).flip(0)[:3]
    eig = lanczos_eigenpairs(M, k=3, seed=0)
    torch.testing.assert_close(eig.eigenvalues, evals, rtol=0, atol=tol)
    assert eig.eigenvectors.shape == (d, 3)
    sd = slq_density(M, 4, 20, seed=0)
    assert float(torch.trapezoid(sd.density, sd.grid)) == pytest.approx(1.0, abs=1e-3)
    assert est.estimate.dtype == eig.eigenvalues.dtype == sd.density.dtype == F64


def test_implicit_gives_the_dense_results(mlp, fisher):
    """PMatImplicit stores no matrix (each product is a pass over the data): same probes, same
    numbers as on the dense tensor, up to rounding."""
    M, A = engine.FIM(*mlp, "implicit"), fisher[1]
    for fn, kwargs in (
        (hutchinson_trace, {"n_samples": 8}),
        (hutchpp_trace, {"n_matvecs": 9}),
        (hutchinson_diag, {"n_samples": 4}),
    ):
        a, b = fn(M, seed=1, **kwargs), fn(A, seed=1, **kwargs)
        torch.testing.assert_close(a.estimate, b.estimate, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a.stderr, b.stderr, rtol=1e-9, atol=1e-12)
    a, b = lanczos_eigenpairs(M, k=2, seed=1), lanczos_eigenpairs(A, k=2, seed=1)
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=0, atol=1e-10)
    a, b = slq_density(M, 2, 6, seed=1), slq_density(A, 2, 6, seed=1)
    torch.testing.assert_close(a.density, b.density, rtol=1e-8, atol=1e-10)


def test_block_operator_batches_probes(fisher):
    F, A = fisher
    blocked, looped = _Blocked(A, F.layer_collection), _ImplicitLike(A, F.layer_collection)
    a = hutchinson_trace(blocked, 64, seed=0)
    b = hutchinson_trace(looped, 64, seed=0)
    assert blocked.calls == 2 and looped.calls == 64
    torch.testing.assert_close(a.estimate, b.estimate)


def test_callable_with_dim(fisher):
    A = fisher[1]
    est = lanczos_eigenpairs(lambda V: A @ V, k=2, dim=A.shape[0])
    torch.testing.assert_close(
        est.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:2], rtol=0, atol=1e-8
    )
    with pytest.raises(ValueError, match="dim="):
        hutchinson_trace(lambda V: A @ V)
    with pytest.raises(ValueError, match="dim=5"):
        hutchinson_trace(A, dim=5)
    with pytest.raises(ValueError, match="same shape"):
        hutchinson_trace(lambda V: V[:1], dim=A.shape[0])


# ----- determinism and arguments -------------------------------------------------------------
def _run_all(M, seed):
    return [
        hutchinson_trace(M, 10, seed).estimate,
        hutchinson_trace(M, 10, seed, "gaussian").estimate,
        hutchpp_trace(M, 12, seed).estimate,
        hutchinson_diag(M, 10, seed).estimate,
        lanczos_eigenpairs(M, 2, n_iter=5, seed=seed).eigenvectors,
        slq_density(M, 3, 5, seed).density,
    ]


def test_deterministic_under_seed_and_global_rng_untouched(fisher):
    F = fisher[0]
    state = torch.get_rng_state()
    a, b, c = _run_all(F, 7), _run_all(F, 7), _run_all(F, 8)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(not torch.equal(x, z) for x, z in zip(a, c))


A4 = torch.eye(4, dtype=F64)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: hutchinson_trace(A4, n_samples=1), "n_samples"),
        (lambda: hutchinson_trace(A4, n_samples=2.5), "n_samples"),
        (lambda: hutchinson_trace(A4, distribution="uniform"), "distribution"),
        (lambda: hutchinson_trace(A4, seed=-1), "seed"),
        (lambda: hutchinson_trace(A4, seed=True), "seed"),
        (lambda: hutchpp_trace(A4, n_matvecs=3), "n_matvecs"),
        (lambda: hutchinson_diag(A4, n_samples=0), "n_samples"),
        (lambda: lanczos_eigenpairs(A4, k=5), "k=5"),
        (lambda: lanczos_eigenpairs(A4, k=0), "k"),
        (lambda: lanczos_eigenpairs(A4, k=3, n_iter=2), "n_iter"),
        (lambda: slq_density(A4, n_probes=1), "n_probes"),
        (lambda: slq_density(A4, n_iter=0), "n_iter"),
        (lambda: slq_density(A4, sigma=0.0), "sigma"),
        (lambda: slq_density(A4, grid=[1.0]), "grid"),
        (lambda: hutchinson_trace(torch.ones(3, 4)), "square"),
        (lambda: hutchinson_trace(torch.eye(3, dtype=torch.int64)), "square"),
        (lambda: hutchinson_trace("matrix"), "cannot take products"),
        (lambda: EigenEstimate(A4, A4, A4[0], 0).pvectors(), "layout"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_docstring_examples():
    assert doctest.testmod(estimators).failed == 0
