"""``PVector`` operations NNGeometry users write (``size``, ``**``, in place ``+= -= *=``,
``norm(p)``, ``dot``, :func:`~fimntk.engine.vector.grad`) and ``PMatEye``, against plain torch
and ``torch.func`` references on an MLP, a CNN and a CNN with BatchNorm in eval mode."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad

from fimntk.engine import InvalidInputError, LayerCollection, PMatEye, PVector
from fimntk.engine import vector as vector_module
from tests import reference, zoo

CASES = ["mlp", "cnn_bn", "conv1d"]


def _case(name):
    return zoo.build(zoo.CASES[zoo.CASE_IDS.index(name)])


def _random(lc, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PVector.random(lc, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", CASES)
def test_pvector_arithmetic(name):
    model, _ = _case(name)
    lc = LayerCollection.from_model(model)
    v, w = _random(lc, 0), _random(lc, 1)
    a, b = v.to_torch().clone(), w.to_torch().clone()
    assert v.size() == (lc.numel(),)
    reference.assert_close((v**2).to_torch(), a * a, 0.0, "**")
    reference.assert_close(v.norm(1), a.abs().sum(), 1e-14, "norm(1)")
    reference.assert_close(v.norm(), a.norm(), 1e-14, "norm()")
    reference.assert_close(v.dot(w), a @ b, 1e-14, "dot")
    reference.assert_close(v @ w, a @ b, 1e-14, "@")
    u = v
    u += w
    assert u is v
    reference.assert_close(v.to_torch(), a + b, 0.0, "+=")
    u -= w
    u *= 3.0
    assert u is v
    reference.assert_close(v.to_torch(), 3 * a, 1e-15, "-= then *=")


def test_in_place_needs_the_same_layout():
    model, _ = _case("mlp")
    lc = LayerCollection.from_model(model)
    v = _random(lc)
    with pytest.raises(InvalidInputError, match="different layer collections"):
        v += _random(lc.sub(["0"]))


@pytest.mark.parametrize("name", CASES)
def test_grad_of_a_model_output(name):
    """``grad(f(θ), PVector.from_model(model))`` is ``torch.func.grad`` of ``f``."""
    model, loader = _case(name)
    x = next(iter(loader))[0]
    v = vector_module.PVector.from_model(model)
    got = vector_module.grad(model(x).pow(2).sum(), v)
    names = reference.param_names(model)
    params = {k: p.detach() for k, p in model.named_parameters() if k in names}
    want = grad(lambda p: functional_call(model, p, (x,)).pow(2).sum())(params)
    reference.assert_close(
        got.to_torch(), torch.cat([want[k].reshape(-1) for k in names]), 1e-12, "grad"
    )


def test_grad_of_a_function_of_the_vector():
    model, _ = _case("mlp")
    lc = LayerCollection.from_model(model)
    flat = torch.randn(lc.numel(), dtype=torch.float64, requires_grad=True)
    v = PVector(lc, flat)
    got = vector_module.grad((v.to_torch() ** 3).sum(), v)
    reference.assert_close(got.to_torch(), 3 * flat.detach() ** 2, 1e-14)


def test_grad_refuses_a_vector_outside_the_graph():
    model, _ = _case("mlp")
    v = _random(LayerCollection.from_model(model))
    with pytest.raises(InvalidInputError, match=r"PVector\.from_model"):
        vector_module.grad(v.norm(), v)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("s", [1.0, -1.234, 0.3])
def test_pmateye_against_a_dense_identity(name, s):
    model, _ = _case(name)
    lc = LayerCollection.from_model(model)
    d = lc.numel()
    eye = PMatEye(lc, scaling=torch.tensor(s, dtype=torch.float64))
    dense = s * torch.eye(d, dtype=torch.float64)
    v = _random(lc)
    x = v.to_torch()
    reference.assert_close(eye.to_torch(), dense, 0.0, "to_torch")
    reference.assert_close(eye.mv(v).to_torch(), dense @ x, 1e-15, "mv")
    reference.assert_close(eye.vTMv(v), x @ dense @ x, 1e-14, "vTMv")
    reference.assert_close(eye.trace(), torch.trace(dense), 1e-14, "trace")
    reference.assert_close(eye.get_diag(), torch.diagonal(dense), 0.0, "diag")
    for ord in (None, "fro", 2, -2):
        want = torch.linalg.norm(dense, ord=ord)
        reference.assert_close(eye.norm(ord), want, 1e-12, f"norm {ord}")
    regul = 0.1
    damped = dense + regul * torch.eye(d, dtype=torch.float64)
    want = torch.linalg.solve(damped, x)
    reference.assert_close(eye.solve(v, regul=regul).to_torch(), want, 1e-12, "solve")
    reference.assert_close(eye.inv(regul).to_torch(), torch.linalg.inv(damped), 1e-12, "inv")
    reference.assert_close((-2.0 * eye).to_torch(), -2.0 * dense, 0.0, "scalar *")
    two = eye + PMatEye(lc, scaling=torch.tensor(1.0, dtype=torch.float64))
    reference.assert_close(two.to_torch(), dense + torch.eye(d, dtype=torch.float64), 0.0, "+")


def test_pmateye_bad_input():
    lc = LayerCollection.from_model(_case("mlp")[0])
    with pytest.raises(InvalidInputError, match="finite number"):
        PMatEye(lc, scaling=float("nan"))
    with pytest.raises(InvalidInputError, match="ord"):
        PMatEye(lc).norm("nuclear")
    with pytest.raises(InvalidInputError, match="regul that is not -s"):
        PMatEye(lc, scaling=-0.5).solve(PVector.zeros_like_collection(lc), regul=0.5)
