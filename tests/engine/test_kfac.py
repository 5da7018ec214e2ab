"""PMatKFAC against its definitions (Martens & Grosse 2015; KFC, Grosse & Martens 2016).

The factors are recomputed here from the documented formulas with plain autograd (our own forward
hooks add a perturbation to each layer's output and read its input; tests/engine/
_structured_helpers.py), never from the engine's generator. The dense matrix of a factor pair is
built with ``torch.kron`` and an index map derived from the module's own attributes, so a
transposed factor, a wrong factor of n or T, or a lost bias column all fail.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fimntk import engine
from fimntk.engine import PMatDiag, PMatKFAC, PVector, UnsupportedOperationError
from tests import reference as ref
from tests import zoo
from tests.engine import _structured_helpers as H

pytestmark = H.ATTN_WARNING

TOL = 1e-10


def kron_layers(case: str) -> list[str]:
    """Layers that must get a Kronecker block: hook-path Linear/Conv1d/Conv2d/Embedding and packed
    attention."""
    mods = H.modules(case)
    return [n for n in H.offsets(case) if H.on_hooks(case, n) and H.is_kron(mods[n])]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@H.CASES
def test_factors_equal_their_definition(case, approx):
    model, loader = H.built(case)
    mat = H.fim(case, "kfac", kfac_approx=approx)
    mods = H.modules(case)
    assert sorted(mat.factors) == sorted(kron_layers(case))
    for name, (a, g) in mat.factors.items():
        view = H.view_of(mods[name])
        assert a.shape == (view.groups, view.cols, view.cols), name
        assert g.shape == (view.groups, view.q, view.q), name
        ea, eg = H.kfac_factors(model, loader, mods[name], approx)
        ref.assert_close(a, ea, TOL, f"{case} {name} A")
        ref.assert_close(g, eg, TOL, f"{case} {name} G")


@H.CASES
def test_to_torch_is_the_kronecker_product_and_exact_elsewhere(case):
    """Kronecker layers: ``G ⊗ A`` in the flat layout (weight rows, then bias); every other layer:
    its exact Fisher block (dense below 4096 parameters); zero between layers."""
    mat = H.fim(case, "kfac")
    full = mat.to_torch()
    expected = H.ref_fisher(case)
    mods = H.modules(case)
    kron = kron_layers(case)
    for name, off in H.offsets(case).items():
        got = H.block(full, off)
        if name in kron:
            a, g = mat.factors[name]
            ref.assert_close(got, H.kron_dense(a, g, H.view_of(mods[name])), TOL, name)
            assert mat.kinds[name] == "kfac"
        else:
            assert mat.kinds[name] == "dense"
            ref.assert_close(got, H.block(expected, off), TOL, f"{name} exact block")
    ref.assert_close(
        full - H.block_diagonal_part(full, case), torch.zeros_like(full), 0.0, "between layers"
    )


@H.CASES
def test_operations_match_own_dense_matrix(case):
    mat = H.fim(case, "kfac")
    full = mat.to_torch()
    v = H.rand_pvector(mat)
    x = v.get_flat_representation()
    ref.assert_close(mat.mv(v).get_flat_representation(), full @ x, TOL, "mv")
    ref.assert_close(mat.vTMv(v), x @ full @ x, TOL, "vTMv")
    ref.assert_close(mat.trace(), full.trace(), TOL, "trace")
    ref.assert_close(mat.get_diag(), full.diagonal(), TOL, "diag")
    ref.assert_close(mat.norm(), torch.linalg.norm(full), TOL, "norm")
    ref.assert_close(mat.norm(), torch.linalg.norm(full), TOL, "frobenius_norm")


@pytest.mark.parametrize("case", ["mlp", "cnn_bn", "sequence"])
def test_solve_without_damping_inverts_mv(case):
    """Regression variant (``H = I``): the factors (and cnn_bn's dense BatchNorm block) are
    invertible, so ``λ = 0`` is exact."""
    model, loader = zoo.build_regression(H.BY_NAME[case])
    mat = engine.FIM(model, loader, "kfac", variant="regression")
    for a, g in mat.factors.values():
        assert torch.linalg.cond(a).max() * torch.linalg.cond(g).max() < 1e8
    v = H.rand_pvector(mat, 1)
    back = mat.solve(mat.mv(v), regul=0.0)
    ref.assert_close(back.get_flat_representation(), v.get_flat_representation(), 1e-7, "λ=0")


@pytest.mark.parametrize(
    "case", ["mlp", "cnn_bn", "grouped_conv", "embedding", "custom", "norms", "convtranspose"]
)
def test_damped_solve_is_the_pi_corrected_kronecker_inverse(case):
    """``solve(v, λ)`` is ``(G + π√λ I)⁻¹ ⊗ (A + √λ/π I)⁻¹`` per Kronecker layer, with
    ``π = √((tr A / dim A) / (tr G / dim G))``, and the exact ``(F_l + λI)⁻¹`` elsewhere."""
    regul = 1e-2
    mat = H.fim(case, "kfac")
    mods = H.modules(case)
    v = H.rand_pvector(mat, 2)
    x = v.get_flat_representation()
    got = mat.solve(v, regul).get_flat_representation()
    inv_of_regularised = mat.inv(regul)
    for name, (s, e) in H.offsets(case).items():
        if name in mat.factors:
            a, g = mat.factors[name]
            inverse = H.pi_damped_kron_inverse(a, g, H.view_of(mods[name]), regul)
        else:
            blk = H.block(mat.to_torch(), (s, e))
            inverse = torch.linalg.inv(blk + regul * torch.eye(e - s, dtype=blk.dtype))
        ref.assert_close(got[s:e], inverse @ x[s:e], 1e-9, f"{case} {name} solve")
        ref.assert_close(
            H.block(inv_of_regularised.to_torch(), (s, e)), inverse, 1e-9, f"{case} {name} inv"
        )
    assert isinstance(inv_of_regularised, PMatKFAC)
    ref.assert_close(inv_of_regularised.mv(v).get_flat_representation(), got, 1e-9, "inv.mv")


@pytest.mark.parametrize("case", ["mlp", "cnn_bn", "embedding", "norms"])
def test_pow(case):
    mat = H.fim(case, "kfac")
    full = mat.to_torch()
    root = mat.pow(0.5)
    assert isinstance(root, PMatKFAC)
    r = root.to_torch()
    ref.assert_close(r, r.t(), TOL, "sqrt symmetric")
    ref.assert_close(r @ r, full, 1e-9, "sqrt squared")
    ref.assert_close(mat.pow(1.0).to_torch(), full, 1e-9, "power 1")
    ref.assert_close(mat.pow(-1.0, 1e-2).to_torch(), mat.inv(1e-2).to_torch(), 1e-9, "pow(-1)")


# ----- exactness --------------------------------------------------------------------------------


def _repeated(model: nn.Module, x: torch.Tensor, n: int = 9):
    return zoo.build_model_loader(model, x.expand(n, *x.shape[1:]).clone(), batch_size=4)


def test_exact_when_one_input_is_repeated():
    """Every example the same input ã and ``T = 1``: a layer's per-example gradients are
    ``g_k ãᵀ``, so ``F_l = E_k[g gᵀ] ⊗ ã ãᵀ = G ⊗ A`` exactly (any approx)."""
    torch.manual_seed(0)
    model, loader = _repeated(H.BY_NAME["mlp"].build_model(), torch.randn(1, 5))
    expected = ref.fisher(model, loader) * ref.block_mask(model)
    for approx in ("expand", "reduce"):
        mat = engine.FIM(model, loader, "kfac", kfac_approx=approx)
        ref.assert_close(mat.to_torch(), expected, TOL, approx)
    # the test can fail: with distinct inputs KFAC is not the block-diagonal Fisher
    model2 = H.built("mlp")[0]
    gap = H.fim("mlp", "kfac").to_torch() - H.ref_fisher("mlp") * ref.block_mask(model2)
    assert gap.abs().max() > 1e-4 * H.ref_fisher("mlp").abs().max()


def test_exact_for_an_embedding_with_one_repeated_token():
    torch.manual_seed(0)
    model = zoo.TokenNet()
    model, loader = _repeated(model, torch.tensor([[4]]))
    mat = engine.FIM(model, loader, "kfac")
    assert mat.kinds == {"emb": "kfac", "lin": "kfac"}
    ref.assert_close(
        mat.to_torch(), ref.fisher(model, loader) * ref.block_mask(model), TOL, "embedding"
    )


def test_kfc_exact_for_a_convolution_with_one_output_position():
    """KFC (``expand``): a kernel as large as the image gives ``T = 1``; with one input repeated
    each conv gradient is ``g ãᵀ`` and the Kronecker form is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), zoo.Flatten(), nn.Linear(3, 3))
    model, loader = _repeated(model, torch.randn(1, 2, 3, 3))
    mat = engine.FIM(model, loader, "kfac")
    assert mat.kinds == {"0": "kfac", "3": "kfac"}
    ref.assert_close(
        mat.to_torch(), ref.fisher(model, loader) * ref.block_mask(model), TOL, "T=1 conv"
    )


def _all_ones_convnet():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 2),
        nn.Tanh(),
        nn.Conv2d(3, 4, 2, groups=1),
        nn.Tanh(),
        zoo.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    )
    return _repeated(model, torch.ones(1, 2, 4, 4))


def test_reduce_exact_for_all_ones_conv_inputs():
    """All-ones images without padding: every patch of the first conv is the same ã, so its output
    is constant over positions and so are the second conv's patches. Per example the gradient is
    ``Σ_t g_t ãᵀ = ĝ ãᵀ``; with one input repeated ``F_l = E[ĝ ĝᵀ] ⊗ ã ãᵀ``, which is exactly
    ``reduce``'s ``G ⊗ A`` (``â = ã``, ``ĝ = Σ_t g_t``). KFC (``expand``) instead assumes
    uncorrelated positions (``Σ_t E[g_t g_tᵀ]``) and is not exact here."""
    model, loader = _all_ones_convnet()
    expected = ref.fisher(model, loader) * ref.block_mask(model)
    reduce = engine.FIM(model, loader, "kfac", kfac_approx="reduce")
    ref.assert_close(reduce.to_torch(), expected, TOL, "reduce")
    expand = engine.FIM(model, loader, "kfac", kfac_approx="expand").to_torch()
    conv = slice(0, ref.layer_offsets(model)["2"][1])
    gap = (expand[conv, conv] - expected[conv, conv]).abs().max()
    assert gap > 1e-3 * expected[conv, conv].abs().max()


def test_sequence_with_identical_steps_reduce_exact_and_expand_scaled_by_T():
    """SeqNet sums its T outputs: with every step and example the same input, ``g_t`` is the same
    for every t. reduce: ``A = ã ãᵀ``, ``G = E[(T g)(T g)ᵀ]`` = the exact block; expand:
    ``A = T ã ãᵀ``, ``G = E[g gᵀ]``, i.e. exactly ``1/T`` of it (the documented scaling)."""
    torch.manual_seed(0)
    t = 3
    model, loader = _repeated(zoo.SeqNet(), torch.randn(1, 1, 4).expand(1, t, 4))
    expected = ref.fisher(model, loader) * ref.block_mask(model)
    reduce = engine.FIM(model, loader, "kfac", kfac_approx="reduce").to_torch()
    expand = engine.FIM(model, loader, "kfac", kfac_approx="expand").to_torch()
    ref.assert_close(reduce, expected, TOL, "reduce")
    ref.assert_close(expand, expected / t, TOL, "expand")


def test_grouped_conv_keeps_groups_apart():
    """One Kronecker pair per group: zero between the groups of a layer, although the true Fisher
    couples them."""
    case = "grouped_conv"
    mat = H.fim(case, "kfac")
    full, exact = mat.to_torch(), H.ref_fisher(case)
    mods = H.modules(case)
    for name in ("0", "2"):
        view = H.view_of(mods[name])
        assert view.groups > 1 and mat.factors[name][0].shape[0] == view.groups
        idx = view.flat_index() + H.offsets(case)[name][0]
        g0, g1 = idx[0].reshape(-1), idx[1].reshape(-1)
        assert full[g0[:, None], g1[None, :]].abs().max() == 0
        assert exact[g0[:, None], g1[None, :]].abs().max() > 0


# ----- arithmetic and options -------------------------------------------------------------------


def test_scalar_multiplication():
    mat = H.fim("cnn_bn", "kfac")
    full = mat.to_torch()
    for s in (2.5, -0.5, torch.tensor(3.0, dtype=torch.float64)):
        for scaled in (mat * s, s * mat):
            assert isinstance(scaled, PMatKFAC)
            ref.assert_close(scaled.to_torch(), full * float(s), TOL, f"* {s}")


def test_adding_kfac_matrices_raises_a_type_error_naming_the_alternative():
    mat = H.fim("mlp", "kfac")
    for other in (mat, H.fim("mlp", "diag")):
        for op in (lambda a, b: a + b, lambda a, b: a - b):
            with pytest.raises(UnsupportedOperationError) as err:
                op(mat, other)
            assert isinstance(err.value, TypeError)
            assert "to_torch" in str(err.value) and "PMatDense" in str(err.value)
    assert isinstance(H.fim("mlp", "diag"), PMatDiag)


def test_unknown_kfac_approx_is_rejected():
    model, loader = H.built("mlp")
    with pytest.raises(engine.InvalidInputError, match="kfac_approx"):
        engine.FIM(model, loader, "kfac", kfac_approx="average")


def test_solve_checks_the_vector():
    mat = H.fim("mlp", "kfac")
    lc = engine.LayerCollection.from_model(H.built("sequence")[0])
    other = PVector(lc, torch.zeros(lc.numel(), dtype=torch.float64))
    with pytest.raises(engine.InvalidInputError):
        mat.solve(other, 1e-3)
    with pytest.raises(engine.InvalidInputError):
        mat.solve(H.rand_pvector(mat), -1.0)


def test_pi_damping_keeps_the_solve_close_to_the_damped_kronecker_product():
    """With the π-correction on the right factors (A + π√λ, G + √λ/π), the damped KFAC solve
    points where ``(G ⊗ A + λ I)⁻¹ v`` does; damping the factors the other way round does not.
    The layer's factors have very different scales (inputs ×30), where the choice matters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x = torch.randn(40, 6, dtype=torch.float64) * 30
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=20)
    F = engine.FIM(model, loader, PMatKFAC)
    kron = F.to_torch()
    g = torch.Generator().manual_seed(1)
    for regul in (1e-2, 1e-1, 1.0):
        lam = regul * kron.diagonal().mean().item()
        for _ in range(3):
            v = PVector(
                F.layer_collection, torch.randn(kron.shape[0], generator=g, dtype=torch.float64)
            )
            exact = torch.linalg.solve(
                kron + lam * torch.eye(kron.shape[0], dtype=kron.dtype), v.get_flat_representation()
            )
            got = F.solve(v, lam).get_flat_representation()
            cos = torch.dot(exact, got) / (exact.norm() * got.norm())
            assert cos > 0.8, (regul, cos.item())


def test_a_low_rank_input_factor_is_inverted_through_its_thin_basis(monkeypatch, tmp_path):
    """norms' Linear(100 → 6) has A summed from 13 vectors: solve and pow go through A's thin
    eigenbasis (no factorization of the 101² factor; their values are checked above against
    the π-damped Kronecker inverse), and the rank bound survives a file round trip."""
    from fimntk.engine.pspace.blocks import kron

    mat = H.fim("norms", "kfac")
    blk = mat.data["4"]
    assert blk.rows == 13 and blk.thin_eigh_a() is not None
    sizes = []
    real_solve, real_pow = kron.spd_solve_batched, kron.sym_pow
    monkeypatch.setattr(
        kron, "spd_solve_batched", lambda f, s, r: sizes.append(f.shape[-1]) or real_solve(f, s, r)
    )
    monkeypatch.setattr(
        kron, "sym_pow", lambda m, e, s: sizes.append(m.shape[-1]) or real_pow(m, e, s)
    )
    v = H.rand_pvector(mat, 3)
    mat.solve(v, 1e-2)
    mat.pow(-0.5, 1e-2)
    assert sizes and 101 not in sizes
    engine.save(mat, tmp_path / "k.safetensors")
    assert engine.load(tmp_path / "k.safetensors").data["4"].rows == 13


def test_a_wrong_rank_bound_is_caught_by_the_probe(tmp_path):
    """A file claiming A was summed from 1 vector (its rank is 13): the range finder's random
    probes fall outside the thin basis, so solve and pow take the full factorization and stay
    equal to the π-damped Kronecker inverse."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    mat = H.fim("norms", "kfac")
    path = tmp_path / "k.safetensors"
    engine.save(mat, path)
    with safe_open(str(path), framework="pt") as f:
        doc = json.loads(f.metadata()["fimntk"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    i = [b["layer"] for b in doc["blocks"]].index("4")
    doc["blocks"][i]["rows"] = 1
    save_file(tensors, str(path), metadata={"fimntk": json.dumps(doc)})
    lied = engine.load(path)
    blk = lied.data["4"]
    assert blk.rows == 1 and blk.thin_eigh_a() is None
    regul = 1e-2
    v = H.rand_pvector(mat, 5)
    ref.assert_close(
        lied.solve(v, regul).get_flat_representation(),
        mat.solve(v, regul).get_flat_representation(),
        1e-9,
        "solve",
    )
    s, e = H.offsets("norms")["4"]
    a, g = mat.factors["4"]
    inverse = H.pi_damped_kron_inverse(a, g, H.view_of(H.modules("norms")["4"]), regul)
    ref.assert_close(H.block(lied.inv(regul).to_torch(), (s, e)), inverse, 1e-9, "inv")


@H.CASES
def test_compute_eigendecomposition_gives_the_spectrum_of_each_block(case):
    """The factors' eigenpairs rebuild the factors, and ``λ_G ⊗ λ_A`` is the spectrum of the
    layer's block in the dense matrix (eigenvalues do not depend on the flat layout)."""
    mat = H.fim(case, "kfac")
    full = mat.to_torch()
    decompositions = mat.compute_eigendecomposition()
    assert sorted(decompositions) == sorted(mat.factors)
    offsets = H.offsets(case)
    for name, ((la, ua), (lg, ug)) in decompositions.items():
        a, g = mat.factors[name]
        if a.shape[0] == 1:  # one group: NNGeometry's 2-D factors
            a, g = a[0], g[0]
        ref.assert_close(ua @ torch.diag_embed(la) @ ua.mT, a, TOL, f"{name} A")
        ref.assert_close(ug @ torch.diag_embed(lg) @ ug.mT, g, TOL, f"{name} G")
        evals, evecs = mat.get_eigendecomposition()
        assert evecs[name][0] is ua and evals[name][1] is lg
        if la.dim() != 1:  # grouped layers: the dense block mixes groups' layouts
            continue
        spectrum = torch.sort((lg[:, None] * la[None, :]).reshape(-1)).values
        block = H.block(full, offsets[name])
        ref.assert_close(torch.linalg.eigvalsh(block), spectrum, 1e-8, f"{name} spectrum")


def test_get_eigendecomposition_before_compute_names_the_fix():
    with pytest.raises(ValueError, match="compute_eigendecomposition"):
        model, loader = H.built("mlp")
        engine.FIM(model, loader, "kfac").get_eigendecomposition()
