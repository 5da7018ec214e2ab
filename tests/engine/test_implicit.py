"""PMatImplicit (matrix-free) against the dense ``torch.func`` reference.

Every operation is a pass over the loader; each must equal the same operation on the reference
Fisher. ``solve`` is conjugate gradients, compared with ``torch.linalg.solve(F + λI)``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fimntk import engine
from fimntk.engine import PMatImplicit, PVector, UnsupportedOperationError
from tests import reference as ref
from tests import zoo
from tests.engine import _structured_helpers as H

pytestmark = [H.ATTN_WARNING, H.JIT_WARNING]

TOL = 1e-10


@H.CASES
def test_operations_equal_the_reference(case):
    mat = H.fim(case, "implicit")
    assert isinstance(mat, PMatImplicit)
    expected = H.ref_fisher(case)
    v = H.rand_pvector(mat, 8)
    x = v.get_flat_representation()
    ref.assert_close(mat.vTMv(v), x @ expected @ x, TOL, "vTMv")
    ref.assert_close(mat.mv(v).get_flat_representation(), expected @ x, TOL, "mv")
    ref.assert_close(mat.trace(), expected.trace(), TOL, "trace")
    ref.assert_close(mat.get_diag(), expected.diagonal(), TOL, "diag")
    ref.assert_close(mat.norm(), torch.linalg.norm(expected), TOL, "norm")


def test_to_torch_of_a_small_model_equals_the_reference():
    ref.assert_close(H.fim("cnn_bn", "implicit").to_torch(), H.ref_fisher("cnn_bn"), TOL, "dense")


def test_cg_solve_matches_the_dense_solve_on_a_zoo_model():
    regul = 1e-2
    mat = H.fim("mlp", "implicit")
    expected = H.ref_fisher("mlp")
    v = H.rand_pvector(mat, 9)
    damped = expected + regul * torch.eye(expected.shape[0], dtype=expected.dtype)
    want = torch.linalg.solve(damped, v.get_flat_representation())
    got = mat.solve(v, regul, tol=1e-12, max_iter=300)
    assert mat.last_solve_info["relative_residual"] <= 1e-12
    ref.assert_close(got.get_flat_representation(), want, 1e-9, "CG")


def test_cg_from_a_warm_start_matches_the_dense_solve_in_fewer_iterations():
    regul = 1e-2
    mat = H.fim("mlp", "implicit")
    expected = H.ref_fisher("mlp")
    v = H.rand_pvector(mat, 9)
    damped = expected + regul * torch.eye(expected.shape[0], dtype=expected.dtype)
    want = torch.linalg.solve(damped, v.get_flat_representation())
    mat.solve(v, regul, tol=1e-12, max_iter=300)
    cold = mat.last_solve_info["iterations"]
    near = PVector(mat.layer_collection, want + 1e-6 * torch.randn_like(want))
    got = mat.solve(v, regul, tol=1e-12, max_iter=300, x0=near)
    ref.assert_close(got.get_flat_representation(), want, 1e-9, "CG from x0")
    assert mat.last_solve_info["iterations"] < cold
    exact = PVector(mat.layer_collection, want)
    mat.solve(v, regul, tol=1e-6, max_iter=300, x0=exact)
    assert mat.last_solve_info["iterations"] == 0  # already solved: one residual, no iteration


def _ill_conditioned_regression():
    """One Linear(12, 3) on inputs whose features span four decades, Gaussian likelihood: the
    Fisher is ``I ⊗ E[ã ãᵀ]``, badly conditioned, and KFAC is exact for it."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 12, generator=g) * torch.logspace(-2, 2, 12)
    y = torch.randn(40, 3, generator=g)
    return zoo.build_model_loader(nn.Linear(12, 3), x, y, batch_size=20)


def test_preconditioned_cg_matches_the_dense_solve_and_needs_fewer_iterations():
    regul = 1e-2
    model, loader = _ill_conditioned_regression()
    mat = engine.FIM(model, loader, "implicit", variant="regression")
    expected = ref.fisher(model, loader, "regression")
    damped = expected + regul * torch.eye(expected.shape[0], dtype=expected.dtype)
    assert torch.linalg.cond(damped) > 1e5
    v = H.rand_pvector(mat, 10)
    want = torch.linalg.solve(damped, v.get_flat_representation())
    ekfac = engine.FIM(model, loader, "ekfac", variant="regression").update_diag(loader)
    iterations = {}
    for name, pre in [
        ("none", None),
        ("diag", engine.FIM(model, loader, "diag", variant="regression")),
        ("kfac", engine.FIM(model, loader, "kfac", variant="regression")),
        ("ekfac", ekfac),
    ]:
        got = mat.solve(v, regul, preconditioner=pre, tol=1e-11, max_iter=200)
        info = mat.last_solve_info
        assert info["relative_residual"] <= 1e-11, (name, info)
        ref.assert_close(got.get_flat_representation(), want, 1e-8, name)
        iterations[name] = info["iterations"]
    # EKFAC after update_diag is the exact Fisher here, and its damping is exact: one step
    assert iterations["ekfac"] <= 2, iterations
    assert max(iterations["kfac"], iterations["diag"]) < iterations["none"], iterations


def test_cg_stops_at_max_iter_and_reports_it():
    mat = H.fim("mlp", "implicit")
    mat.solve(H.rand_pvector(mat), 1e-3, tol=1e-14, max_iter=3)
    assert mat.last_solve_info["iterations"] == 3
    assert mat.last_solve_info["relative_residual"] > 1e-14


def test_monte_carlo_implicit_equals_monte_carlo_dense_for_the_same_seed():
    model, loader = H.built("mlp")
    dense = engine.FIM_MonteCarlo(model, loader, "dense", trials=2, seed=5).to_torch()
    mat = engine.FIM_MonteCarlo(model, loader, "implicit", trials=2, seed=5)
    other_seed = engine.FIM_MonteCarlo(model, loader, "dense", trials=2, seed=6).to_torch()
    assert (dense - other_seed).abs().max() > 1e-6 * dense.abs().max()
    v = H.rand_pvector(mat, 11)
    x = v.get_flat_representation()
    for _ in range(2):  # every pass replays the same draws
        ref.assert_close(mat.vTMv(v), x @ dense @ x, TOL, "MC vTMv")
        ref.assert_close(mat.mv(v).get_flat_representation(), dense @ x, TOL, "MC mv")
    ref.assert_close(mat.get_diag(), dense.diagonal(), TOL, "MC diag")
    ref.assert_close(mat.to_torch(), dense, TOL, "MC to_torch")


def test_to_torch_of_a_large_model_raises_before_computing():
    """d = 4096·4097: d² entries would be 1 TiB in float32. The check needs no pass."""
    model = nn.Linear(4096, 4096)
    x = torch.randn(4, 4096)
    loader = H.CountingLoader(DataLoader(TensorDataset(x), batch_size=2), limit=1)
    mat = engine.FIM(model, loader, "implicit")
    assert loader.taken == 0  # an implicit matrix reads the loader only when operated on
    with pytest.raises(UnsupportedOperationError) as err:
        mat.to_torch()
    assert isinstance(err.value, TypeError)
    msg = str(err.value)
    assert "entries" in msg and "GiB" in msg and "mv" in msg
    assert loader.taken == 0


def test_norm_of_a_large_dataset_raises_before_computing():
    """The norm goes through the (K·n)² Gram: refused, with its size, when it would not fit."""
    model = nn.Linear(2, 3)
    x = torch.randn(6000, 2)
    loader = H.CountingLoader(DataLoader(TensorDataset(x), batch_size=3000), limit=1)
    mat = engine.FIM(model, loader, "implicit")
    with pytest.raises(UnsupportedOperationError, match="GiB"):
        mat.norm()
    assert loader.taken == 1


def test_arithmetic():
    mat = H.fim("custom", "implicit")
    expected = H.ref_fisher("custom")
    v = H.rand_pvector(mat, 12)
    x = v.get_flat_representation()
    for s in (2.5, -1.0, torch.tensor(0.5, dtype=torch.float64)):
        for scaled in (mat * s, s * mat):
            assert isinstance(scaled, PMatImplicit)
            ref.assert_close(scaled.vTMv(v), float(s) * (x @ expected @ x), TOL, f"* {s}")
            ref.assert_close(
                scaled.mv(v).get_flat_representation(), float(s) * expected @ x, TOL, f"mv * {s}"
            )
            ref.assert_close(scaled.get_diag(), float(s) * expected.diagonal(), TOL, "diag")
    ref.assert_close(mat.vTMv(v), x @ expected @ x, TOL, "the original is unchanged")
    for op in (lambda a, b: a + b, lambda a, b: a - b):
        with pytest.raises(UnsupportedOperationError) as err:
            op(mat, mat)
        assert isinstance(err.value, TypeError) and "representation" in str(err.value)
    with pytest.raises(TypeError):
        mat * "2"
    with pytest.raises(UnsupportedOperationError, match="solve"):
        mat.inv(1e-3)


def test_wrong_vector_is_rejected():
    mat = H.fim("mlp", "implicit")
    lc = engine.LayerCollection.from_model(H.built("sequence")[0])
    with pytest.raises(engine.InvalidInputError):
        mat.vTMv(PVector(lc, torch.zeros(lc.numel(), dtype=torch.float64)))


@pytest.mark.parametrize("case", ["batchnorm1d", "batchnorm1d_seq"])
def test_batchnorm_input_tangent_on_1d_inputs(case):
    """BatchNorm's input tangent ``t ⊙ γ/√(σ²+ε)`` (no torch formula) on ``(n, C)`` and
    ``(n, C, L)`` inputs: ``vᵀFv`` equals the dense reference's."""
    model, loader = zoo.build(zoo.EXTRA_CASES[zoo.EXTRA_CASE_IDS.index(case)])
    expected = ref.fisher(model, loader)
    v = torch.randn(
        expected.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    mat = engine.FIM(model, loader, "implicit")
    got = mat.vTMv(PVector(mat.layer_collection, v))
    ref.assert_close(got, v @ expected @ v, 1e-10, case)
