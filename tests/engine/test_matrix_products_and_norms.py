"""Spectral norms, products with matrices and PushForward maps, solves of maps, NNGeometry's
mixed weight/bias order, ``inv(use_pi=False)`` and the CG argument spellings: each checked
against the same operation on the dense ``(d, d)`` matrix, whose entries the rest of the suite
checks against ``torch.func``, on an MLP, a CNN with BatchNorm and a grouped convolution."""

from __future__ import annotations

import pytest
import torch

from fimntk.engine import (
    FIM,
    InvalidInputError,
    LayerCollection,
    PFMapDense,
    PMatEye,
    PVector,
    UnsupportedOperationError,
)
from fimntk.engine.errors import InvalidNormOrderError
from tests import zoo

CASES = ["mlp", "cnn_bn", "grouped_conv", "attention"]
REPS = ["dense", "diag", "blockdiag", "lowrank", "kfac", "ekfac", "quasidiag", "implicit"]


def _case(name):
    return zoo.build(zoo.CASES[zoo.CASE_IDS.index(name)])


def _close(actual, expected, atol, what):
    """``max|actual − expected| ≤ atol`` (absolute: norms of singular matrices are 0)."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"{what}: max error {err:.3e} > {atol:.1e}"


def _dense(rep):
    m = rep.to_torch().double()
    return (m + m.t()) / 2


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("rep", REPS)
def test_spectral_norms_and_eigenvalues(name, rep):
    """``norm(2)``/``norm(-2)`` are ``torch.linalg.norm``'s on the dense matrix; ``eigenvalues``
    its ascending spectrum (the Kronecker products, EKFAC's corrected diagonal, a low-rank
    factor's Gram and its zeros, each block's spectrum)."""
    model, loader = _case(name)
    mat = FIM(model, loader, rep)
    dense = _dense(mat)
    scale = dense.norm(2).item()
    expected = torch.linalg.eigvalsh(dense)
    _close(mat.eigenvalues().double(), expected, 1e-6 * scale, "eigenvalues")
    for ord in (2, -2, "fro", None):
        want = torch.linalg.norm(dense, ord=ord if ord is not None else "fro")
        _close(mat.norm(ord).double(), want, 1e-6 * scale, f"norm({ord})")
    with pytest.raises(InvalidNormOrderError, match="Frobenius"):
        mat.norm("nuc")
    with pytest.raises(RuntimeError):  # torch.linalg.norm's error type too
        mat.norm(3)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("rep", REPS)
def test_products_with_maps_vectors_and_solves(name, rep):
    """``M @ J`` (a PushForward map) is ``J M`` row by row, ``M @ v`` is ``M v``,
    ``M.matmat(V)`` is ``M V``, and ``solve(J)`` solves each row."""
    model, loader = _case(name)
    mat = FIM(model, loader, rep)
    lc = mat.layer_collection
    d = lc.numel()
    dense = mat.to_torch().double()
    g = torch.Generator().manual_seed(0)
    j = PFMapDense(lc, data=torch.randn(2, 3, d, generator=g, dtype=torch.float64))
    scale = dense.norm().item()
    product = mat @ j
    assert isinstance(product, PFMapDense) and product.data.shape == (2, 3, d)
    _close(product.to_torch(), j.data @ dense, 1e-6 * scale, "M @ J")
    _close(mat.mmap(j).to_torch(), j.data @ dense, 1e-6 * scale, "mmap")
    v = PVector(lc, torch.randn(d, generator=g, dtype=torch.float64))
    _close((mat @ v).to_torch(), dense @ v.to_torch(), 1e-6 * scale, "M @ v")
    cols = torch.randn(d, 4, generator=g, dtype=torch.float64)
    _close(mat.matmat(cols), dense @ cols, 1e-6 * scale, "matmat")
    if rep in ("implicit", "lowrank", "quasidiag", "ekfac", "kfac"):
        return  # CG / damped-factor solves: their own tests compare with the exact solve
    regul = 1e-2 * scale
    solved = mat.solve(j, regul=regul)
    eye = torch.eye(d, dtype=torch.float64)
    want = torch.linalg.solve(dense + regul * eye, j.data.reshape(-1, d).t()).t()
    _close(solved.to_torch().reshape(-1, d), want, 1e-6 * want.abs().max().item(), "solve(J)")


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("rep", ["dense", "diag", "blockdiag", "kfac"])
def test_product_of_two_matrices_keeps_the_representation(name, rep):
    """``M₁ M₂`` for two matrices of one representation (KFAC: ``G₁G₂ ⊗ A₁A₂`` per layer)."""
    model, loader = _case(name)
    m1 = FIM(model, loader, rep)
    m2 = FIM(model, [next(iter(loader))], rep)  # another matrix: the first batch only
    prod = m1.mm(m2)
    assert type(prod) is type(m1)
    want = m1.to_torch().double() @ m2.to_torch().double()
    _close(prod.to_torch().double(), want, 1e-6 * want.norm().item(), "M1 M2")


def test_product_of_different_representations_is_refused():
    model, loader = _case("mlp")
    with pytest.raises(UnsupportedOperationError, match="PMatDense"):
        FIM(model, loader, "diag").mm(FIM(model, loader, "dense"))
    with pytest.raises(NotImplementedError):  # NNGeometry's error type too
        FIM(model, loader, "diag").mm(FIM(model, loader, "dense"))
    with pytest.raises(InvalidInputError, match="mv"):
        FIM(model, loader, "diag").mm(PVector.from_model(model))


@pytest.mark.parametrize("name", CASES)
def test_mixed_weight_bias_order_is_a_plain_kronecker_product(name):
    """``to_torch(split_weight_bias=False)`` orders each layer as its matrix view, where the
    block of a Linear layer is exactly ``kron(G, A)``; the split order is the usual one."""
    model, loader = _case(name)
    kfac = FIM(model, loader, "kfac")
    split = kfac.to_torch(split_weight_bias=True)
    _close(split, kfac.to_torch(), 0.0, "split order")
    mixed = kfac.to_torch(split_weight_bias=False)
    _close(mixed.diagonal(), kfac.get_diag(split_weight_bias=False), 0.0, "diag")
    offsets = kfac.layer_collection.offsets()
    for layer, block in kfac.data.items():
        start, end = offsets[layer]
        if not hasattr(block, "a") or block.a.shape[0] != 1:
            continue
        want = torch.kron(block.g[0].double(), block.a[0].double())
        got = mixed[start:end, start:end].double()
        _close(got, want, 1e-6 * want.norm().item(), f"kron {layer}")
    # the same entries, permuted
    assert torch.allclose(torch.sort(split.flatten()).values, torch.sort(mixed.flatten()).values)


def test_kfac_inverse_without_pi_correction():
    """``inv(regul, use_pi=False)`` damps both factors by ``√regul``."""
    model, loader = _case("mlp")
    kfac = FIM(model, loader, "kfac")
    regul = 1e-2
    inv = kfac.inv(regul, use_pi=False)
    for layer, block in kfac.data.items():
        eye_a = torch.eye(block.a.shape[-1], dtype=torch.float64)
        eye_g = torch.eye(block.g.shape[-1], dtype=torch.float64)
        a = torch.linalg.inv(block.a[0].double() + regul**0.5 * eye_a)
        g = torch.linalg.inv(block.g[0].double() + regul**0.5 * eye_g)
        _close(inv.data[layer].a[0].double(), a, 1e-8 * a.norm().item(), "A")
        _close(inv.data[layer].g[0].double(), g, 1e-8 * g.norm().item(), "G")
    with pytest.warns(DeprecationWarning):
        kfac.inverse(regul, use_pi=False)
    with_pi = kfac.inv(regul)
    assert not torch.allclose(with_pi.to_torch(), inv.to_torch())


def test_power_operator_and_eye_pinv():
    model, loader = _case("mlp")
    diag = FIM(model, loader, "diag")
    sq = diag.get_diag() ** 2
    _close((diag**2).get_diag(), sq, 1e-12 * sq.max().item(), "M ** 2")
    lc = LayerCollection.from_model(model)
    eye = PMatEye(lc, scaling=-1.5)
    _close(eye.pinv(atol=1.0).to_torch(), eye.inv(0.0).to_torch(), 1e-7, "pinv")
    assert eye.pinv(atol=10.0).to_torch().abs().sum() == 0


def test_cg_takes_scipy_spellings():
    """``M=`` and ``rtol=`` are ``preconditioner=`` and ``tol=``."""
    model, loader = _case("mlp")
    implicit = FIM(model, loader, "implicit")
    blockdiag = FIM(model, loader, "blockdiag")
    v = PVector.from_model(model)
    a = implicit.solve(v, regul=1e-2, preconditioner=blockdiag, tol=1e-8)
    b = implicit.solve(v, regul=1e-2, M=blockdiag, rtol=1e-8)
    _close(b.to_torch(), a.to_torch(), 1e-6 * a.norm().item(), "M=, rtol=")
    with pytest.raises(InvalidInputError, match="once"):
        implicit.solve(v, regul=1e-2, preconditioner=blockdiag, M=blockdiag)


def test_vector_to_dict_and_add_to_model():
    model, _ = _case("mlp")
    lc = LayerCollection.from_model(model)
    before = PVector.from_model(model)
    step = PVector.random(lc, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert set(step.to_dict()) == set(step.get_dict_representation())
    step.add_to_model(model)
    after = PVector.from_model(model)
    _close(after.to_torch(), before.to_torch() + step.to_torch(), 1e-12, "θ + v")


@pytest.mark.parametrize("name", CASES)
def test_stored_eigendecompositions_rebuild_the_matrix(name):
    """``compute_eigendecomposition`` (NNGeometry's API) on dense (eigh, svd) and low-rank
    (svd): ``V diag(λ) Vᵀ`` is the matrix; an unknown solver is refused."""
    model, loader = _case(name)
    for rep, impls in (("dense", ("eigh", "svd")), ("lowrank", ("svd",))):
        mat = FIM(model, loader, rep)
        dense = mat.to_torch().double()
        for impl in impls:
            mat.compute_eigendecomposition(impl=impl)
            evals, evecs = mat.get_eigendecomposition()
            rebuilt = (evecs.double() * evals.double()) @ evecs.double().t()
            _close(rebuilt, dense, 1e-8 * dense.norm().item(), f"{rep} {impl}")
        with pytest.raises(NotImplementedError):
            mat.compute_eigendecomposition(impl="qr")


@pytest.mark.parametrize("name", CASES)
def test_pushforward_layer_views(name):
    """``to_torch_layer`` gives each parameter's columns of ``J`` in its own shape."""
    model, _ = _case(name)
    lc = LayerCollection.from_model(model)
    g = torch.Generator().manual_seed(3)
    j = PFMapDense(lc, data=torch.randn(2, 3, lc.numel(), generator=g, dtype=torch.float64))
    for e in lc:
        start, end = lc.offsets()[e.name]
        parts = j.to_torch_layer(e.name)
        assert [tuple(p.shape[2:]) for p in parts] == [s for _, s in e.params]
        flat = torch.cat([p.reshape(2, 3, -1) for p in parts], dim=2)
        assert torch.equal(flat, j.data[:, :, start:end])
    with pytest.raises(InvalidInputError, match="unknown layer"):
        j.to_torch_layer("nope")
