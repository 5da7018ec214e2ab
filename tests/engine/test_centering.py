"""The centred Jacobian (``Jacobian(..., centering=True)``) against the ``torch.func``
Jacobian of :func:`tests.reference.jacobian` with its mean over the examples subtracted by
hand, ``J̃ = J − mean_i J``, for every representation built from it; and one batch passed as
a tuple of tensors."""

from __future__ import annotations

import pytest
import torch

from fimntk.engine import (
    FMatDense,
    FVector,
    Jacobian,
    LayerCollection,
    PFMapDense,
    PFMapImplicit,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatKFAC,
    PMatLowRank,
    PVector,
    UnsupportedOperationError,
)
from tests import reference, zoo

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

CASES = ["mlp", "cnn_bn", "shared_twice"]


def _setup(name):
    model, loader = zoo.build(zoo.CASES[zoo.CASE_IDS.index(name)])
    lc = LayerCollection.from_model(model)
    j = reference.jacobian(model, loader).permute(1, 0, 2)  # (c, n, d)
    centred = j - j.mean(dim=1, keepdim=True)
    return model, loader, lc, centred


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8 * float(want.abs().max()))


@pytest.mark.parametrize("name", CASES)
def test_centred_covariances(name):
    model, loader, lc, jt = _setup(name)
    n, d = jt.shape[1], jt.shape[2]
    want = torch.einsum("kia,kib->ab", jt, jt) / n
    gen = Jacobian(model, lc, centering=True)
    _close(PMatDense(lc, generator=gen, examples=loader).to_torch(), want)
    _close(PMatDiag(lc, generator=gen, examples=loader).get_diag(), torch.diagonal(want))
    mask = reference.block_mask(model)
    _close(PMatBlockDiag(lc, generator=gen, examples=loader).to_torch(), want * mask)
    _close(PMatLowRank(lc, generator=gen, examples=loader).to_torch(), want)
    assert want.shape == (d, d)


@pytest.mark.parametrize("name", CASES)
def test_centred_jacobian_gram_and_maps(name):
    model, loader, lc, jt = _setup(name)
    gen = Jacobian(model, lc, centering=True)
    _close(gen.get_jacobian(loader), jt)
    c, n = jt.shape[:2]
    gram = torch.einsum("kia,lja->kilj", jt, jt)
    _close(FMatDense.from_generator(gen, loader).to_torch(), gram)
    g = torch.Generator().manual_seed(0)
    v = PVector(lc, torch.randn(lc.numel(), generator=g, dtype=torch.float64))
    u = FVector(torch.randn(c, n, generator=g, dtype=torch.float64))
    for pf in (PFMapDense(lc, generator=gen, examples=loader), PFMapImplicit(lc, gen, loader)):
        _close(pf.jvp(v).get_flat_representation(), jt @ v.get_flat_representation())
        _close(
            pf.vjp(u).get_flat_representation(),
            jt.reshape(c * n, -1).t() @ u.get_flat_representation().reshape(-1),
        )


def test_one_pass_statistics_refuse_centering():
    model, loader, lc, _ = _setup("mlp")
    with pytest.raises(UnsupportedOperationError, match="centering"):
        PMatKFAC(lc, generator=Jacobian(model, lc, centering=True), examples=loader)


@pytest.mark.parametrize("name", ["mlp", "cnn_bn"])
def test_tuple_of_tensors_is_one_batch(name):
    model, loader = zoo.build(zoo.CASES[zoo.CASE_IDS.index(name)])
    lc = LayerCollection.from_model(model)
    batch = next(iter(loader))
    one = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    j = reference.jacobian(model, [one]).permute(1, 0, 2)
    want = torch.einsum("kia,kib->ab", j, j) / j.shape[1]
    _close(PMatDense(lc, generator=Jacobian(model, lc), examples=one).to_torch(), want)
    lists = Jacobian(model, lc, lists_are_batches=True)
    _close(PMatDense(lc, generator=lists, examples=list(one)).to_torch(), want)


@pytest.mark.parametrize("impl", ["eigh", "svd"])
def test_fmatdense_eigendecomposition(impl):
    model, loader, lc, _ = _setup("mlp")
    fmat = FMatDense.from_generator(Jacobian(model, lc, centering=True), loader)
    fmat.compute_eigendecomposition(impl=impl)
    evals, evecs = fmat.get_eigendecomposition()
    flat = fmat.to_torch().reshape(evecs.shape[0], -1)
    _close(evecs @ torch.diag(evals) @ evecs.t(), flat)
    _close(torch.sort(evals).values, torch.linalg.eigvalsh(flat))
