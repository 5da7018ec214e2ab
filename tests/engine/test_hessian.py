"""The loss Hessian against ``torch.func.hessian`` (:func:`tests.reference.loss_hessian`) on an
MLP, a CNN with BatchNorm in eval mode and a Conv1d net, in every representation; and against
the Fisher where they must agree (models linear in their parameters, summed losses)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fimntk.engine import (
    FIM,
    Hessian,
    InvalidInputError,
    LayerCollection,
    PVector,
    TrainModeBatchNormError,
    UnsupportedOperationError,
)
from tests import reference, zoo

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

CASES = ["mlp", "cnn_bn", "conv1d"]


def ce_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def _case(name):
    return zoo.build(zoo.CASES[zoo.CASE_IDS.index(name)])


def _vector(lc, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PVector(lc, torch.randn(lc.numel(), generator=g, dtype=torch.float64))


@pytest.mark.parametrize("name", CASES)
def test_dense_blockdiag_diag(name):
    model, loader = _case(name)
    want = reference.loss_hessian(model, loader, ce_sum)
    lc = LayerCollection.from_model(model)
    dense = Hessian(model, loader, "dense", loss=ce_sum)
    reference.assert_close(dense.to_torch(), want, 1e-10, "dense")
    mask = reference.block_mask(model)
    block = Hessian(model, loader, "blockdiag", loss=ce_sum)
    reference.assert_close(block.to_torch(), want * mask, 1e-10, "blockdiag")
    diag = Hessian(model, loader, "diag", loss=ce_sum)
    reference.assert_close(diag.get_diag(), torch.diagonal(want), 1e-10, "diag")
    v = _vector(lc)
    reference.assert_close(dense.vTMv(v), v.to_torch() @ want @ v.to_torch(), 1e-10, "vTMv")


@pytest.mark.parametrize("name", CASES)
def test_implicit(name):
    model, loader = _case(name)
    want = reference.loss_hessian(model, loader, ce_sum)
    h = Hessian(model, loader, "implicit", loss=ce_sum)
    v = _vector(h.layer_collection, 1)
    x = v.to_torch()
    reference.assert_close(h.mv(v).to_torch(), want @ x, 1e-10, "mv")
    reference.assert_close(h.vTMv(v), x @ want @ x, 1e-10, "vTMv")
    reference.assert_close((2.5 * h).mv(v).to_torch(), 2.5 * want @ x, 1e-10, "2.5 H")
    for op in (h.trace, h.get_diag, h.to_torch):
        with pytest.raises(UnsupportedOperationError, match="representation='dense'"):
            op()
    with pytest.raises(UnsupportedOperationError, match="positive definite"):
        h.solve(v)


def _linear_models():
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.AdaptiveAvgPool2d(1), zoo.Flatten())
    return {
        "linear": (nn.Linear(5, 3), torch.randn(11, 5)),
        "linear_conv": (conv, torch.randn(11, 2, 6, 6)),
    }


@pytest.mark.parametrize("name", ["linear", "linear_conv"])
@pytest.mark.parametrize(
    ("variant", "loss"),
    [
        ("classif_logits", ce_sum),
        ("regression", lambda out, y: 0.5 * (out - F.one_hot(y, 3).to(out.dtype)).pow(2).sum()),
    ],
    ids=["cross_entropy", "mse"],
)
def test_equals_n_times_the_fisher_on_a_linear_model(name, variant, loss):
    """A model linear in its parameters has no second-order term: ``H = Σ_i J_iᵀ H_i J_i``,
    which is ``n · F`` for a summed loss."""
    model, x = _linear_models()[name]
    model, loader = zoo.build_model_loader(model, x, torch.randint(0, 3, (11,)))
    fisher = FIM(model, loader, "dense", variant=variant).to_torch()
    h = Hessian(model, loader, "dense", loss=loss).to_torch()
    reference.assert_close(h, 11 * fisher, 1e-10, variant)


def test_bad_input():
    model, loader = _case("mlp")
    with pytest.raises(InvalidInputError, match="needs loss="):
        Hessian(model, loader, "dense")
    with pytest.raises(InvalidInputError, match="unknown Hessian representation"):
        Hessian(model, loader, "kfac", loss=ce_sum)
    with pytest.raises(InvalidInputError, match="scalar"):
        Hessian(model, loader, "dense", loss=lambda out, y: out)
    with pytest.raises(InvalidInputError, match="layer_collection is empty"):
        Hessian(model, loader, "dense", loss=ce_sum, layer_collection=LayerCollection())
    bn, bn_loader = _case("cnn_bn")
    h = Hessian(bn, bn_loader, "implicit", loss=ce_sum)
    bn.train()
    with pytest.raises(TrainModeBatchNormError, match=r"model\.eval\(\)"):
        h.mv(_vector(h.layer_collection))
