"""Metrics: Monte Carlo and empirical Fisher, the NTK Gram matrix, FMatDense, the KL check.

Convention under test: ``F = (1/n) Σ_i E_y[∇ log p ∇ log pᵀ]`` (n = examples seen); the NTK
``(c, n, c, n)`` is not divided by n.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fimntk import engine
from fimntk.engine import FMatDense, FVector, PVector
from tests import reference as ref
from tests import zoo

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

CASES = pytest.mark.parametrize("case", zoo.CASES, ids=zoo.CASE_IDS)
VARIANTS = ["classif_logits", "classif_binary_logits", "regression"]
SIGMA = 0.7


def _case(name: str) -> zoo.Case:
    return zoo.CASES[zoo.CASE_IDS.index(name)]


# ----- Monte Carlo Fisher ---------------------------------------------------------------------


def _mc_errors(model, loader, variant, trials_list, seed=0):
    """Squared Frobenius errors ``‖F_MC − F‖²`` and their expectations, per number of trials."""
    exact = ref.fisher(model, loader, variant, sigma=SIGMA)
    out = []
    for t in trials_list:
        mc = engine.FIM_MonteCarlo(
            model, loader, "dense", variant=variant, trials=t, seed=seed, sigma=SIGMA
        ).to_torch()
        err = ((mc - exact) ** 2).sum().item()
        expected = ref.mc_fisher_expected_sq_error(model, loader, t, variant, SIGMA).item()
        out.append((t, err, expected))
    return out


def _check_mc(errors):
    """Fixed seeds make the draws deterministic; the bounds would hold for most seeds anyway.

    Upper: Markov, ``P(err² > 20·E[err²]) ≤ 5%``. Lower: at few trials the error is a sum of many
    independent terms, far from zero (catches an 'MC' that secretly computes the exact F).
    """
    for t, err, expected in errors:
        assert err <= 20 * expected, f"trials={t}: err² {err:.3e} > 20 × E[err²] {expected:.3e}"
    (t0, err0, exp0), (_, _, _), (t2, err2, _) = errors
    assert err0 >= 0.01 * exp0, f"trials={t0}: error {err0:.3e} suspiciously small"
    assert err2 < err0 / 10, f"error does not shrink: {err0:.3e} at {t0} → {err2:.3e} at {t2}"


@CASES
def test_monte_carlo_fisher_converges(case):
    model, loader = zoo.build(case)
    _check_mc(_mc_errors(model, loader, "classif_logits", (4, 64, 1024)))


@pytest.mark.parametrize("variant", ["classif_binary_logits", "regression"])
@pytest.mark.parametrize("case", [_case("mlp"), _case("custom")], ids=["mlp", "custom"])
def test_monte_carlo_fisher_converges_other_variants(case, variant):
    model, loader = zoo.build_variant(case, variant)
    _check_mc(_mc_errors(model, loader, variant, (4, 64, 1024)))


def test_monte_carlo_fisher_seed_reproducible_and_representations_agree():
    model, loader = zoo.build(_case("custom"))
    a = engine.FIM_MonteCarlo(model, loader, "dense", trials=3, seed=7).to_torch()
    b = engine.FIM_MonteCarlo(model, loader, "dense", trials=3, seed=7).to_torch()
    c = engine.FIM_MonteCarlo(model, loader, "dense", trials=3, seed=8).to_torch()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    diag = engine.FIM_MonteCarlo(model, loader, "diag", trials=3, seed=7)
    ref.assert_close(diag.get_diag(), a.diagonal(), 1e-10, "same draws for diag")
    blocks = engine.FIM_MonteCarlo(model, loader, "blockdiag", trials=3, seed=7)
    ref.assert_close(blocks.to_torch(), a * ref.block_mask(model), 1e-10, "same draws, blocks")


# ----- empirical Fisher -----------------------------------------------------------------------


@pytest.mark.parametrize("centering", [False, True], ids=["plain", "centered"])
@CASES
def test_empirical_fisher(case, centering):
    model, loader = zoo.build(case)
    expected = ref.empirical_fisher(model, loader, centering=centering)
    dense = engine.EmpiricalFIM(model, loader, "dense", centering=centering)
    ref.assert_close(dense.to_torch(), expected, 1e-10, "dense")
    diag = engine.EmpiricalFIM(model, loader, "diag", centering=centering)
    ref.assert_close(diag.get_diag(), expected.diagonal(), 1e-10, "diag")
    blocks = engine.FIM_empirical(model, loader, "blockdiag", centering=centering)
    ref.assert_close(blocks.to_torch(), expected * ref.block_mask(model), 1e-10, "blockdiag")


def test_empirical_fisher_alias():
    assert engine.FIM_empirical is engine.EmpiricalFIM


@pytest.mark.parametrize("centering", [False, True], ids=["plain", "centered"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_empirical_fisher_variants(variant, centering):
    model, loader = zoo.build_variant(_case("custom"), variant)
    mat = engine.EmpiricalFIM(
        model, loader, "dense", variant=variant, sigma=SIGMA, centering=centering
    )
    expected = ref.empirical_fisher_variant(model, loader, variant, SIGMA, centering)
    ref.assert_close(mat.to_torch(), expected, 1e-10, variant)


@pytest.mark.parametrize("rep", ["dense", "diag", "blockdiag"])
def test_centered_empirical_fisher_keeps_paths(rep):
    """Results say which path each layer took — the centered one too."""
    model, loader = zoo.build(_case("custom"))
    expected = {"0": "hooks", "1": "torch.func", "2": "hooks"}
    assert engine.EmpiricalFIM(model, loader, rep).paths == expected
    assert engine.EmpiricalFIM(model, loader, rep, centering=True).paths == expected


# ----- NTK ------------------------------------------------------------------------------------


@CASES
def test_ntk_equals_jacobian_gram(case):
    model, loader = zoo.build(case)
    gram = engine.GramMatrix(model, loader)
    assert isinstance(gram, FMatDense)
    assert gram.shape == (case.c, 13, case.c, 13)
    expected = ref.ntk(model, loader)
    ref.assert_close(gram.to_torch(), expected, 1e-10, "NTK")
    ref.assert_close(engine.NTK(model, loader).to_torch(), expected, 1e-10, "NTK alias")


@CASES
def test_ntk_is_not_divided_by_n(case):
    """trace K = Σ_i ‖J_i‖² = n · trace F_regression(σ=1); duplicated data repeats entries."""
    model, loader = zoo.build(case, n=8, batch_size=3)
    gram = engine.NTK(model, loader)
    fim = engine.FIM(model, loader, "diag", variant="regression", sigma=1.0)
    ref.assert_close(gram.trace(), 8 * fim.trace(), 1e-10, "trace K = n trace F")
    x, y = loader.dataset.tensors
    twice = DataLoader(TensorDataset(torch.cat([x, x]), torch.cat([y, y])), batch_size=5)
    big = engine.NTK(model, twice).to_torch()
    small = gram.to_torch()
    for i in (slice(0, 8), slice(8, 16)):
        for j in (slice(0, 8), slice(8, 16)):
            ref.assert_close(big[:, i, :, j], small, 1e-10, "duplicated data")


def test_fmat_dense_operations():
    model, loader = zoo.build(_case("custom"))
    gram = engine.NTK(model, loader)
    k = ref.ntk(model, loader)
    c, n = k.shape[:2]
    flat = k.reshape(c * n, c * n)
    v = FVector(torch.randn(c, n, generator=torch.Generator().manual_seed(0), dtype=k.dtype))
    x = v.get_flat_representation().reshape(-1)
    ref.assert_close(gram.mv(v).get_flat_representation(), (flat @ x).reshape(c, n), 1e-10, "mv")
    ref.assert_close(gram.vTMv(v), x @ flat @ x, 1e-10, "vTMv")
    ref.assert_close(gram.trace(), torch.trace(flat), 1e-10, "trace")
    ref.assert_close(gram.norm(), torch.linalg.matrix_norm(flat), 1e-10, "norm")
    ref.assert_close(gram.norm(), torch.linalg.matrix_norm(flat), 1e-10, "fro")
    ref.assert_close(gram.get_dense_tensor(), k, 1e-10, "get_dense_tensor")
    evals, evecs = gram.eigenpairs(k=4)
    ref.assert_close(evals, torch.linalg.eigvalsh(flat).flip(0)[:4], 1e-10, "eigenvalues")
    assert evecs.shape == (4, c, n)
    for lam, e in zip(evals, evecs):
        ref.assert_close(gram.mv(FVector(e)).get_flat_representation(), lam * e, 1e-9, "K e")
    ref.assert_close((gram + gram).to_torch(), 2 * k, 1e-10, "+")
    ref.assert_close((gram - gram).to_torch(), torch.zeros_like(k), 0.0, "-")
    ref.assert_close((3 * gram).to_torch(), 3 * k, 1e-10, "*")
    with pytest.raises(ValueError, match="shape"):
        gram.mv(FVector(torch.zeros(c, n + 1, dtype=k.dtype)))


# ----- KL check -------------------------------------------------------------------------------


def _kl_check(model, loader, variant, seed=0, eps=1e-4):
    """``2·KL(p_w ‖ p_{w+dw}) ≈ dwᵀ F dw`` (mean over examples) for a small step ``dw``."""
    fim = engine.FIM(model, loader, "dense", variant=variant, sigma=SIGMA)
    w = PVector.from_model(model)
    dw = PVector.random(
        w.layer_collection, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    for name, module in model.named_modules():
        # PyTorch defines no gradient for the padding row, yet the forward reads it.
        if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
            dw.get_dict_representation()[name][0][module.padding_idx].zero_()
    dw = dw * (eps / dw.norm().item())
    before = ref.outputs(model, loader)
    (w + dw).copy_to_model(model)
    after = ref.outputs(model, loader)
    w.copy_to_model(model)
    kl2 = 2 * ref.mean_kl(before, after, variant, SIGMA)
    quad = fim.vTMv(dw)
    assert abs(kl2 / quad - 1) < 1e-3, f"2 KL = {kl2:.6e}, dwᵀ F dw = {quad:.6e}"


@CASES
def test_kl_matches_quadratic_form(case):
    model, loader = zoo.build(case)
    _kl_check(model, loader, "classif_logits")


@pytest.mark.parametrize("variant", ["classif_binary_logits", "regression"])
@pytest.mark.parametrize("case", [_case("mlp"), _case("cnn_bn")], ids=["mlp", "cnn_bn"])
def test_kl_matches_quadratic_form_other_variants(case, variant):
    model, loader = zoo.build_variant(case, variant)
    _kl_check(model, loader, variant)


# ----- n_output -------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["FIM", "FIM_MonteCarlo", "EmpiricalFIM", "NTK"])
def test_n_output_accepted_and_checked(metric):
    model, loader = zoo.build(_case("mlp"))
    fn = getattr(engine, metric)
    args = () if metric == "NTK" else ("dense",)
    kwargs = {"seed": 0} if metric == "FIM_MonteCarlo" else {}
    plain = fn(model, loader, *args, **kwargs).to_torch()
    checked = fn(model, loader, *args, n_output=3, **kwargs).to_torch()
    assert torch.equal(plain, checked)
    with pytest.raises(ValueError, match="n_output"):
        fn(model, loader, *args, n_output=4, **kwargs)


# ----- the convention is stated where users read it -------------------------------------------


def _plain(text: str) -> str:
    """Markup and line breaks removed."""
    return " ".join(text.replace("*", "").replace("`", "").split())


def test_convention_is_stated_in_docstrings_and_readme():
    readme = _plain((Path(__file__).resolve().parents[2] / "README.md").read_text())
    for text in (_plain(engine.__doc__), _plain(engine.metrics.__doc__), readme):
        assert "F = (1/n) Σ_i E_" in text
        assert "not divided by n" in text
    assert "drop_last" in engine.metrics.__doc__ and "drop_last" in readme
    assert "(1/n)" in engine.FIM.__doc__
    assert "not divided by n" in _plain(engine.GramMatrix.__doc__)
