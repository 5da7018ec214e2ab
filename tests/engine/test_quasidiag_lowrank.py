"""PMatQuasiDiag (Ollivier 2015) and PMatLowRank against their dense definitions.

QuasiDiag: the reference Fisher's diagonal plus, inside each Linear/Conv/normalisation layer with a
bias (hook path), the entries between each output unit's bias and the weights of its row; zero
everywhere else. LowRank: ``F = Jᵀ J`` exactly (J the stacked pseudo-output Jacobian / √n).
"""

from __future__ import annotations

import functools

import pytest
import torch

from fimntk import engine
from fimntk.engine import PMatLowRank, PMatQuasiDiag, UnsupportedOperationError
from tests import reference as ref
from tests.engine import _structured_helpers as H

pytestmark = H.ATTN_WARNING

TOL = 1e-10


@functools.cache
def quasi_expected(case: str) -> torch.Tensor:
    return H.ref_fisher(case) * H.quasidiag_mask(case)


def check_operations(mat, expected: torch.Tensor, what: str) -> None:
    v = H.rand_pvector(mat, 5)
    x = v.get_flat_representation()
    ref.assert_close(mat.mv(v).get_flat_representation(), expected @ x, TOL, f"{what} mv")
    ref.assert_close(mat.vTMv(v), x @ expected @ x, TOL, f"{what} vTMv")
    ref.assert_close(mat.trace(), expected.trace(), TOL, f"{what} trace")
    ref.assert_close(mat.get_diag(), expected.diagonal(), TOL, f"{what} diag")
    ref.assert_close(mat.norm(), torch.linalg.norm(expected), TOL, f"{what} norm")


# ----- QuasiDiag ------------------------------------------------------------------------------


@H.CASES
def test_quasidiag_equals_its_definition(case):
    mat = H.fim(case, "quasidiag")
    assert isinstance(mat, PMatQuasiDiag)
    expected = quasi_expected(case)
    ref.assert_close(mat.to_torch(), expected, TOL, "to_torch")
    mods = H.modules(case)
    for name in H.offsets(case):
        m = mods[name]
        quasi = (
            H.on_hooks(case, name)
            and H.weight_and_bias(m)[1] is not None
            and (H.is_kron(m) or type(m).__name__ in H.NORM_TYPES)
        )
        assert mat.kinds[name] == ("quasidiag" if quasi else "diag"), name
    check_operations(mat, expected, "quasidiag")


@H.CASES
def test_quasidiag_solve(case):
    regul = 1e-3
    mat = H.fim(case, "quasidiag")
    expected = quasi_expected(case)
    v = H.rand_pvector(mat, 6)
    x = mat.solve(v, regul).get_flat_representation()
    damped = expected + regul * torch.eye(expected.shape[0], dtype=expected.dtype)
    ref.assert_close(damped @ x, v.get_flat_representation(), 1e-9, "residual")


def test_quasidiag_arithmetic():
    mat = H.fim("norms", "quasidiag")
    other = engine.FIM(*H.built("norms"), "quasidiag", variant="regression")
    a, b = mat.to_torch(), other.to_torch()
    ref.assert_close((mat + other).to_torch(), a + b, TOL, "+")
    ref.assert_close((mat - other).to_torch(), a - b, TOL, "-")
    ref.assert_close((2.5 * mat).to_torch(), 2.5 * a, TOL, "*")
    assert isinstance(mat + other, PMatQuasiDiag)
    with pytest.raises(UnsupportedOperationError, match="PMatDense"):
        mat + H.fim("norms", "diag")


# ----- LowRank ----------------------------------------------------------------------------------


@H.CASES
def test_lowrank_equals_the_fisher(case):
    mat = H.fim(case, "lowrank")
    assert isinstance(mat, PMatLowRank)
    expected = H.ref_fisher(case)
    d = expected.shape[0]
    assert mat.data.shape == (3 * 13, d)  # K·n rows: c pseudo-outputs per example
    ref.assert_close(mat.to_torch(), expected, TOL, "to_torch")
    check_operations(mat, expected, "lowrank")


@H.CASES
def test_lowrank_eigenpairs(case):
    mat = H.fim(case, "lowrank")
    expected = H.ref_fisher(case)
    want = torch.linalg.eigvalsh(expected).flip(0)
    scale = want[0]
    evals, vecs = mat.eigenpairs()
    rank = mat.data.shape[0]
    assert evals.shape == (rank,) and vecs.shape == (expected.shape[0], rank)
    ref.assert_close(evals, want[:rank], TOL, "eigenvalues")
    keep = evals > 1e-8 * scale
    v, lam = vecs[:, keep], evals[keep]
    ref.assert_close(expected @ v, v * lam, 1e-8, "F v = λ v")
    ref.assert_close(v.t() @ v, torch.eye(v.shape[1], dtype=v.dtype), 1e-8, "orthonormal")
    top, top_vecs = mat.eigenpairs(k=4)
    ref.assert_close(top, want[:4], TOL, "top-4")
    assert top_vecs.shape == (expected.shape[0], 4)


@H.CASES
def test_lowrank_woodbury_solve(case):
    regul = 1e-3
    mat = H.fim(case, "lowrank")
    expected = H.ref_fisher(case)
    v = H.rand_pvector(mat, 7)
    damped = expected + regul * torch.eye(expected.shape[0], dtype=expected.dtype)
    want = torch.linalg.solve(damped, v.get_flat_representation())
    ref.assert_close(mat.solve(v, regul).get_flat_representation(), want, 1e-8, "solve")


def test_lowrank_singular_solve_and_inverse_are_refused():
    mat = H.fim("mlp", "lowrank")
    with pytest.raises(engine.InvalidInputError, match="regul"):
        mat.solve(H.rand_pvector(mat), 0.0)
    with pytest.raises(UnsupportedOperationError, match="solve"):
        mat.inv(1e-3)


def test_lowrank_arithmetic():
    mat = H.fim("mlp", "lowrank")
    other = engine.FIM(*H.built("mlp"), "lowrank", variant="regression")
    a, b = mat.to_torch(), other.to_torch()
    total = mat + other
    assert isinstance(total, PMatLowRank) and total.data.shape[0] == 2 * mat.data.shape[0]
    ref.assert_close(total.to_torch(), a + b, TOL, "+")
    ref.assert_close((2.5 * mat).to_torch(), 2.5 * a, TOL, "*")
    ref.assert_close((mat * 0).to_torch(), 0 * a, TOL, "* 0")
    for bad in (lambda: mat - other, lambda: -1.0 * mat, lambda: mat + H.fim("mlp", "dense")):
        with pytest.raises(UnsupportedOperationError, match="PMatDense"):
            bad()
