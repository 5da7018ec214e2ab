"""Every operation of PMatDense, PMatDiag and PMatBlockDiag against the dense reference.

The reference of each representation is built from the dense ``torch.func`` Fisher: itself, its
diagonal, or its per-layer diagonal blocks. One test id per (representation, zoo model).
"""

from __future__ import annotations

import functools

import pytest
import torch

from fimntk import engine
from fimntk.engine import PMatBlockDiag, PMatDense, PMatDiag, PVector, UnsupportedOperationError
from tests import reference as ref
from tests import zoo

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

CASES = pytest.mark.parametrize("case", zoo.CASES, ids=zoo.CASE_IDS)
REPS = pytest.mark.parametrize(
    "rep", [PMatDense, PMatDiag, PMatBlockDiag], ids=["dense", "diag", "blockdiag"]
)


@functools.cache
def _reference(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    case = zoo.CASES[zoo.CASE_IDS.index(name)]
    model, loader = zoo.build(case)
    return ref.fisher(model, loader), ref.block_mask(model)


def expected_matrix(case: zoo.Case, rep: type) -> torch.Tensor:
    """The dense matrix that representation ``rep`` of the Fisher stands for."""
    full, mask = _reference(case.name)
    if rep is PMatDense:
        return full.clone()
    if rep is PMatDiag:
        return torch.diag(full.diagonal())
    return full * mask


def setup(case: zoo.Case, rep: type):
    model, loader = zoo.build(case)
    return model, engine.FIM(model, loader, rep), expected_matrix(case, rep)


def random_vector(mat, seed: int = 0) -> PVector:
    return PVector.random(
        mat.layer_collection, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


@REPS
@CASES
def test_dense_tensor(case, rep):
    _, mat, expected = setup(case, rep)
    d = expected.shape[0]
    assert isinstance(mat, rep)
    assert mat.shape == (d, d) and mat.size() == (d, d)
    ref.assert_close(mat.to_torch(), expected, 1e-10, "to_torch")
    ref.assert_close(mat.get_dense_tensor(), expected, 1e-10, "get_dense_tensor")


@REPS
@CASES
def test_mv_and_vTMv(case, rep):
    _, mat, expected = setup(case, rep)
    v = random_vector(mat)
    x = v.get_flat_representation()
    out = mat.mv(v)
    assert isinstance(out, PVector) and out.layer_collection == mat.layer_collection
    ref.assert_close(out.get_flat_representation(), expected @ x, 1e-10, "mv")
    quad = mat.vTMv(v)
    assert quad.dim() == 0
    ref.assert_close(quad, x @ expected @ x, 1e-10, "vTMv")


@REPS
@CASES
def test_trace_norm_diag(case, rep):
    _, mat, expected = setup(case, rep)
    ref.assert_close(mat.trace(), torch.trace(expected), 1e-10, "trace")
    fro = torch.linalg.matrix_norm(expected)
    ref.assert_close(mat.norm(), fro, 1e-10, "norm")
    ref.assert_close(mat.norm("fro"), fro, 1e-10, "norm('fro')")
    with pytest.warns(DeprecationWarning, match="norm"):
        deprecated = mat.frobenius_norm()
    ref.assert_close(deprecated, fro, 1e-10, "frobenius_norm")
    ref.assert_close(mat.get_diag(), expected.diagonal(), 1e-10, "get_diag")


def _regul(expected: torch.Tensor) -> float:
    """A damping that keeps (M + λI) well conditioned (cond ≤ ~1e3)."""
    return 1e-3 * torch.linalg.matrix_norm(expected).item()


@REPS
@CASES
def test_solve(case, rep):
    _, mat, expected = setup(case, rep)
    regul = _regul(expected)
    v = random_vector(mat, seed=1)
    b = v.get_flat_representation()
    x = mat.solve(v, regul)
    assert isinstance(x, PVector)
    a = expected + regul * torch.eye(expected.shape[0], dtype=expected.dtype)
    xf = x.get_flat_representation()
    residual = torch.linalg.vector_norm(a @ xf - b)
    scale = torch.linalg.matrix_norm(a) * torch.linalg.vector_norm(xf)
    assert residual <= 1e-12 * scale, f"residual {residual:.2e} vs scale {scale:.2e}"
    ref.assert_close(xf, torch.linalg.solve(a, b), 1e-9, "solve vs torch.linalg.solve")


@REPS
@CASES
def test_inv(case, rep):
    _, mat, expected = setup(case, rep)
    regul = _regul(expected)
    a = expected + regul * torch.eye(expected.shape[0], dtype=expected.dtype)
    inv = mat.inv(regul)
    assert isinstance(inv, rep)
    ref.assert_close(inv.to_torch(), torch.linalg.inv(a), 1e-9, "inv")
    with pytest.warns(DeprecationWarning, match=r"use inv\(regul\)"):
        alias = mat.inverse(regul)
    ref.assert_close(alias.to_torch(), inv.to_torch(), 0.0, "inverse alias")
    ref.assert_close(inv.to_torch() @ a, torch.eye(a.shape[0], dtype=a.dtype), 1e-9, "inv·A")


@REPS
@CASES
def test_arithmetic(case, rep):
    model, mat, expected = setup(case, rep)
    other = engine.FIM(model, zoo.build(case, seed=5)[1], rep)  # same layout, other data
    other_expected = other.to_torch()
    for result, want, what in [
        (mat + other, expected + other_expected, "+"),
        (mat - other, expected - other_expected, "-"),
        (mat * 3.0, 3.0 * expected, "* float"),
        (2 * mat, 2.0 * expected, "int *"),
        (mat * torch.tensor(0.5), 0.5 * expected, "* 0-d tensor"),
    ]:
        assert isinstance(result, rep), what
        ref.assert_close(result.to_torch(), want, 1e-10, what)
    ref.assert_close((mat - mat).to_torch(), torch.zeros_like(expected), 0.0, "M - M")


@CASES
def test_adding_different_representations_raises(case):
    model, loader = zoo.build(case)
    mats = [engine.FIM(model, loader, r) for r in ("dense", "diag", "blockdiag")]
    for a in mats:
        for b in mats:
            if a is b:
                continue
            for op in (lambda x, y: x + y, lambda x, y: x - y):
                with pytest.raises(UnsupportedOperationError) as err:
                    op(a, b)
                assert isinstance(err.value, TypeError)
                assert "to_torch" in str(err.value)


@CASES
def test_blockdiag_has_exact_zeros_across_layers(case):
    _, mat, _ = setup(case, PMatBlockDiag)
    full, mask = _reference(case.name)
    dense = mat.to_torch()
    assert torch.count_nonzero(dense[~mask]) == 0
    assert torch.count_nonzero(full[~mask]) > 0  # the cross-layer zeros are not trivial
    ref.assert_close(dense[mask], full[mask], 1e-10, "diagonal blocks")
    # the operations use only the blocks, too
    v = random_vector(mat, seed=2)
    ref.assert_close(
        mat.mv(v).get_flat_representation(), (full * mask) @ v.to_torch(), 1e-10, "blockdiag mv"
    )


@pytest.mark.parametrize(
    "name, cls",
    [
        ("dense", PMatDense),
        ("diag", PMatDiag),
        ("blockdiag", PMatBlockDiag),
        ("PMatDense", PMatDense),
        ("PMatDiag", PMatDiag),
        ("PMatBlockDiag", PMatBlockDiag),
        ("block_diag", PMatBlockDiag),
        ("DENSE", PMatDense),
    ],
)
def test_representation_names_and_classes(name, cls):
    assert engine.resolve_representation(name) is cls
    assert engine.resolve_representation(cls) is cls
    case = zoo.CASES[zoo.CASE_IDS.index("custom")]
    model, loader = zoo.build(case)
    by_name = engine.FIM(model, loader, name)
    by_class = engine.FIM(model, loader, cls)
    assert type(by_name) is cls and type(by_class) is cls
    ref.assert_close(by_name.to_torch(), by_class.to_torch(), 0.0, name)
    ref.assert_close(by_name.to_torch(), expected_matrix(case, cls), 1e-10, name)


def test_unknown_representation_name():
    model, loader = zoo.build(zoo.CASES[0])
    with pytest.raises(ValueError, match="unknown representation") as err:
        engine.FIM(model, loader, "kfacc")
    assert "dense" in str(err.value)


def test_representation_from_data_round_trip():
    model, loader = zoo.build(zoo.CASES[0])
    mat = engine.FIM(model, loader, "blockdiag")
    again = PMatBlockDiag(mat.layer_collection, data=mat.data)
    ref.assert_close(again.to_torch(), mat.to_torch(), 0.0, "data=")
    with pytest.raises(ValueError, match="data="):
        PMatDense(mat.layer_collection)


def test_pmat_dense_eigenpairs():
    model, loader = zoo.build(zoo.CASES[0])
    mat = engine.FIM(model, loader, "dense")
    expected = ref.fisher(model, loader)
    evals, evecs = mat.eigenpairs(k=5)
    ref.assert_close(evals, torch.linalg.eigvalsh(expected).flip(0)[:5], 1e-10, "eigenvalues")
    assert evecs.shape == (expected.shape[0], 5)
    ref.assert_close(expected @ evecs, evecs * evals, 1e-9, "M v = λ v")


def test_operations_check_the_vector_layout():
    model, loader = zoo.build(zoo.CASES[0])
    mat = engine.FIM(model, loader, "dense")
    with pytest.raises(ValueError, match="PVector"):
        mat.mv(torch.zeros(mat.shape[0], dtype=torch.float64))
    sub = mat.layer_collection.sub(["0"])
    with pytest.raises(ValueError, match="layer collection"):
        mat.mv(PVector.random(sub, dtype=torch.float64))
