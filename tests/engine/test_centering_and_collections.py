"""The centred Jacobian (``Jacobian(..., centering=True)``) against ``torch.func`` Jacobians
centred by hand, representations built on a sub-collection of a generator's layers, and the
collection built by hand (NNGeometry's ``add_layer``, ``add_layer_from_model``, ``p_pos``,
``get_layerid_module_map``)."""

from __future__ import annotations

import pytest
import torch

from fimntk.engine import (
    InvalidInputError,
    Jacobian,
    LayerCollection,
    PFMapDense,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    UnsupportedOperationError,
)
from fimntk.nngeometry.layercollection import Conv2dLayer, LinearLayer
from tests import reference, zoo

CASES = ["mlp", "cnn_bn", "grouped_conv"]


def _case(name):
    return zoo.build(zoo.CASES[zoo.CASE_IDS.index(name)])


def _centred_jacobian(model, loader):
    """``(c, n, d)``: torch.func's per-example output Jacobian minus its mean over examples."""
    jac = reference.jacobian(model, loader).permute(1, 0, 2)
    return jac - jac.mean(dim=1, keepdim=True)


@pytest.mark.parametrize("name", CASES)
def test_centred_jacobian_and_matrices(name):
    model, loader = _case(name)
    gen = Jacobian(model, centering=True)
    lc = gen.layer_collection
    jc = _centred_jacobian(model, loader)
    n = jc.shape[1]
    flat = jc.reshape(-1, jc.shape[2])
    dense_ref = flat.t() @ flat / n
    reference.assert_close(gen.get_jacobian(loader), jc, 1e-9, "centred J")
    dense = PMatDense(lc, generator=gen, examples=loader).to_torch()
    reference.assert_close(dense, dense_ref, 1e-9, "centred dense")
    diag = PMatDiag(lc, generator=gen, examples=loader).get_diag()
    reference.assert_close(diag, torch.diagonal(dense_ref), 1e-9, "centred diag")
    blocks = PMatBlockDiag(lc, generator=gen, examples=loader).to_torch()
    mask = reference.block_mask(model).to(dense_ref.dtype)
    reference.assert_close(blocks, dense_ref * mask, 1e-9, "centred blocks")
    low = PMatLowRank(lc, generator=gen, examples=loader).to_torch()
    reference.assert_close(low, dense_ref, 1e-9, "centred low-rank")
    gram = gen.get_gram_matrix(loader)
    gram_ref = torch.einsum("kid,ljd->kilj", jc, jc)
    reference.assert_close(gram, gram_ref, 1e-9, "centred Gram")
    pf = PFMapDense(lc, generator=gen, examples=loader).to_torch()
    reference.assert_close(pf, jc, 1e-9, "centred PushForward")
    # not centred: differs (the mean gradient is not zero)
    plain = PMatDense(lc, generator=Jacobian(model), examples=loader).to_torch()
    assert (plain - dense).abs().max() > 1e-3 * dense.abs().max()


def test_centring_is_refused_where_not_offered():
    model, loader = _case("mlp")
    gen = Jacobian(model, centering=True)
    lc = gen.layer_collection
    with pytest.raises(UnsupportedOperationError, match="centering"):
        PMatKFAC(lc, generator=gen, examples=loader)
    with pytest.raises(UnsupportedOperationError, match="centering"):
        PMatImplicit(lc, generator=gen, examples=loader)


@pytest.mark.parametrize("name", CASES)
def test_representation_on_a_sub_collection(name):
    """A generator over the whole model, a matrix over some of its layers: the matrix is the
    dense reference's sub-block of those layers."""
    model, loader = _case(name)
    gen = Jacobian(model)
    full = gen.layer_collection
    names = [e.name for e in full][1:]
    sub = full.sub(names)
    dense = PMatDense(sub, generator=gen, examples=loader).to_torch()
    jac = reference.jacobian(model, loader)
    offsets = reference.layer_offsets(model)
    cols = torch.cat([torch.arange(*offsets[n]) for n in names])
    j = jac[:, :, cols].reshape(-1, len(cols))
    reference.assert_close(dense, j.t() @ j / jac.shape[0], 1e-9, "sub-collection")
    assert PFMapDense(sub, generator=gen, examples=loader).to_torch().shape[-1] == sub.numel()


def test_collection_built_by_hand():
    model, _ = _case("cnn_bn")
    full = LayerCollection.from_model(model)
    by_hand = LayerCollection()
    for module in full.modules(model).values():
        by_hand.add_layer_from_model(model, module)
    assert by_hand == full
    assert by_hand.p_pos == {n: s for n, (s, _) in full.offsets().items()}
    assert by_hand.get_layerid_module_map(model) == full.modules(model)
    moved = LayerCollection()
    moved.add_layer(*full.layers.popitem())
    assert moved.numel() == list(LayerCollection.from_model(model))[-1].numel
    with pytest.raises(InvalidInputError, match="already"):
        moved.add_layer(*next(iter(moved.layers.items())))
    with pytest.raises(InvalidInputError, match="sub-module"):
        moved.add_layer_from_model(model, torch.nn.Linear(2, 2))


def test_layer_descriptions_give_torch_shapes():
    lin, conv = torch.nn.Linear(5, 3), torch.nn.Conv2d(2, 4, (3, 2), bias=False)
    lc = LayerCollection()
    lc.add_layer("lin", LinearLayer(5, 3))
    lc.add_layer("conv", Conv2dLayer(2, 4, (3, 2), bias=False))
    model = torch.nn.ModuleDict({"lin": lin, "conv": conv})
    assert [p.shape for p in lc.parameters(model)] == [
        lin.weight.shape,
        lin.bias.shape,
        conv.weight.shape,
    ]
    assert lc["lin"].has_bias() and not lc["conv"].has_bias()
    wrong = LayerCollection()
    wrong.add_layer("lin", LinearLayer(3, 5))
    with pytest.raises(InvalidInputError, match="shape"):
        wrong.parameters(model)
