"""``fimntk.nngeometry``: NNGeometry's paths name the engine's objects, and its adapters map
NNGeometry's arguments (checked against ``torch.func`` references and closed forms)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fimntk import engine
from fimntk.nngeometry import FIM, GramMatrix, Hessian, Jacobian
from fimntk.nngeometry.backend import TorchHooksJacobianBackend
from fimntk.nngeometry.layercollection import Conv2dLayer, LayerCollection, LinearLayer, ModuleLayer
from fimntk.nngeometry.layers import Affine1d, Cosine1d, WeightNorm1d, WeightNorm2d
from fimntk.nngeometry.maths import kronecker
from fimntk.nngeometry.metrics import FIM_MonteCarlo
from fimntk.nngeometry.object import PFMapImplicit, PMatDense, PMatEye, PMatImplicit, PMatKFAC
from fimntk.nngeometry.object.vector import random_fvector, random_pvector, random_pvector_dict
from fimntk.nngeometry.utils import grad
from tests import reference, zoo


def test_names_are_the_engines():
    assert FIM is engine.FIM and GramMatrix is engine.GramMatrix
    assert PMatKFAC is engine.PMatKFAC and issubclass(PMatEye, engine.PMatEye)
    assert PMatEye(engine.LayerCollection()).to_torch().dtype == torch.float32  # NNGeometry's
    assert issubclass(LayerCollection, engine.LayerCollection)
    assert grad is engine.vector.grad


def test_jacobian_and_backend_adapters():
    model, loader = zoo.build(zoo.CASES[zoo.CASE_IDS.index("cnn_bn")])
    want = reference.jacobian(model, loader).permute(1, 0, 2)
    reference.assert_close(Jacobian(model, loader).to_torch(), want, 1e-10, "Jacobian")
    lc = LayerCollection.from_model(model)
    v = random_pvector(lc)
    imp = Jacobian(model, loader, representation=PFMapImplicit)
    reference.assert_close(imp.jvp(v).to_torch(), want @ v.to_torch(), 1e-10, "implicit")
    gen = TorchHooksJacobianBackend(model)
    dense = PMatDense(generator=gen, examples=loader, layer_collection=lc)
    jtj = reference.fisher(model, loader, variant="regression")  # (1/n) Σ_i J_iᵀ J_i
    reference.assert_close(dense.to_torch(), jtj, 1e-10, "JᵀJ/n")
    centred = TorchHooksJacobianBackend(model, centering=True)
    assert centred.centering and centred.lists_are_batches  # NNGeometry's examples=
    jt = want - want.mean(dim=1, keepdim=True)
    got = PMatDense(generator=centred, examples=loader, layer_collection=lc).to_torch()
    reference.assert_close(got, torch.einsum("kia,kib->ab", jt, jt) / jt.shape[1], 1e-10, "J̃ᵀJ̃/n")


def test_hessian_adapter_takes_the_loss_as_function():
    model, loader = zoo.build(zoo.CASES[zoo.CASE_IDS.index("mlp")])

    def loss(out, y):
        return F.cross_entropy(out, y, reduction="sum")

    want = reference.loss_hessian(model, loader, loss)
    reference.assert_close(Hessian(model, loader, PMatDense, function=loss).to_torch(), want)
    h = Hessian(model, loader, PMatImplicit, function=loss)
    v = random_pvector(h.layer_collection)
    reference.assert_close(h.mv(v).to_torch(), want @ v.to_torch(), 1e-10)


def test_random_vectors():
    lc = LayerCollection.from_model(zoo.build(zoo.CASES[0])[0])
    assert random_pvector(lc).dtype == torch.float64
    assert random_pvector_dict(lc, dtype=torch.float32).dtype == torch.float32
    assert random_fvector(5, 3).to_torch().shape == (3, 5)


def test_kronecker_against_torch_kron():
    a, b = torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    reference.assert_close(kronecker(a, b), torch.kron(a, b), 0.0)
    with pytest.raises(ValueError, match="two matrices"):
        kronecker(a[0], b)


def test_layers_closed_forms():
    torch.manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64)
    wn = WeightNorm1d(4, 3).double()
    unit = wn.weight / (wn.weight.pow(2).sum(dim=1, keepdim=True) + 1e-5).sqrt()
    reference.assert_close(wn(x), x @ unit.t(), 1e-14)
    cos = Cosine1d(4, 3).double()
    unit = cos.weight / (cos.weight.pow(2).sum(dim=1, keepdim=True) + 1e-5).sqrt()
    unit_x = x / (x.pow(2).sum(dim=1, keepdim=True) + 1e-5).sqrt()
    reference.assert_close(cos(x), unit_x @ unit.t(), 1e-14)
    aff = Affine1d(4).double()
    with torch.no_grad():
        aff.weight.copy_(torch.arange(4.0))
        aff.bias.fill_(0.5)
    reference.assert_close(aff(x), x * torch.arange(4.0) + 0.5, 1e-15)
    conv = WeightNorm2d(2, 3, 3).double()
    img = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    w = conv.weight / (conv.weight.flatten(1).pow(2).sum(dim=1) + 1e-5).sqrt().reshape(-1, 1, 1, 1)
    reference.assert_close(conv(img), F.conv2d(img, w), 1e-14)
    with pytest.raises(ValueError, match="no bias"):
        WeightNorm2d(2, 3, 3, bias=True)


def test_layer_collection_shows_nngeometry_layer_descriptions():
    model, _ = zoo.build(zoo.CASES[zoo.CASE_IDS.index("attention")])
    lc = LayerCollection.from_model(model)
    assert isinstance(lc, LayerCollection) and lc == engine.LayerCollection.from_model(model)
    layers = lc.layers
    for name, layer in layers.items():
        entry = lc[name]  # the engine's entry
        assert layer.numel() == entry.numel and layer.has_bias() == entry.has_bias()
        assert layer.to_entry(name) == entry
        if entry.module_type == "Linear":
            assert type(layer) is LinearLayer
            assert layer.weight.size == dict(entry.params)["weight"]
        elif entry.module_type not in ("LayerNorm",):
            assert isinstance(layer, ModuleLayer)  # e.g. attention: in_proj_weight, ...
    sub = lc.sub(list(layers)[:2])
    assert isinstance(sub, LayerCollection)
    names = list(lc.layers)
    name, layer = lc.layers.popitem()  # NNGeometry's tasks pop layers off a collection
    assert name == names[-1] and name not in lc.layers and len(lc) == len(names) - 1
    rebuilt = LayerCollection()
    rebuilt.add_layer(name, layer)
    assert rebuilt[name] == engine.LayerCollection.from_model(model)[name]
    conv = Conv2dLayer(2, 3, (3, 3), bias=False)
    assert conv.weight.size == (3, 2, 3, 3) and conv.bias is None and conv.numel() == 54


def test_monte_carlo_covariance_is_the_variance():
    """``covariance=σ²`` is the Gaussian's variance: the Fisher ``JᵀJ/σ²`` (NNGeometry's own
    draws give ``σ² JᵀJ``, see docs/from-nngeometry.md)."""
    model, loader = zoo.build(zoo.CASES[zoo.CASE_IDS.index("mlp")])
    exact = engine.FIM(model, loader, "dense", variant="regression", sigma=0.5).to_torch()
    mc = FIM_MonteCarlo(
        model, loader, "dense", "regression", 4000, covariance=0.25, seed=0
    ).to_torch()
    assert ((mc - exact).norm() / exact.norm()).item() < 0.05
    with pytest.raises(ValueError, match="regression"):
        FIM_MonteCarlo(model, loader, "dense", covariance=0.25)
    with pytest.raises(ValueError, match="positive"):
        FIM_MonteCarlo(model, loader, "dense", "regression", covariance=-1.0)
