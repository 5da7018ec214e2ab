"""PVector, FVector and LayerCollection: layout, arithmetic, model round trips, sub-collections."""

from __future__ import annotations

import pytest
import torch

from fimntk import engine
from fimntk.engine import FVector, LayerCollection, PVector
from tests import reference as ref
from tests import zoo

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

CASES = pytest.mark.parametrize("case", zoo.CASES, ids=zoo.CASE_IDS)


def _flat_params(model) -> torch.Tensor:
    named = dict(model.named_parameters())
    return torch.cat([named[n].detach().reshape(-1) for n in ref.param_names(model)])


# ----- LayerCollection ------------------------------------------------------------------------


@CASES
def test_layer_collection_order_and_offsets(case):
    model, _ = zoo.build(case)
    lc = LayerCollection.from_model(model)
    assert lc.param_names() == ref.param_names(model)
    assert lc.offsets() == ref.layer_offsets(model)
    assert lc.numel() == sum(p.numel() for p in model.parameters())
    assert [e.name for e in lc] == list(ref.layer_offsets(model))
    modules = dict(model.named_modules())
    for e in lc:
        assert e.module_type == type(modules[e.name]).__name__
        own = dict(modules[e.name].named_parameters(recurse=False))
        assert [(a, tuple(own[a].shape)) for a, _ in e.params] == list(e.params)
        assert e.numel == sum(own[a].numel() for a, _ in e.params)
    assert LayerCollection.from_json(lc.to_json()) == lc


def _sub_names(model, part: str) -> list[str]:
    names = list(ref.layer_offsets(model))
    return names[0::2] if part == "even" else names[1::2]


@pytest.mark.parametrize("part", ["even", "odd"])
@CASES
def test_fim_on_sub_collection_is_the_sub_block(case, part):
    model, loader = zoo.build(case)
    offsets = ref.layer_offsets(model)
    names = _sub_names(model, part)
    lc = LayerCollection.from_model(model)
    sub = lc.sub(list(reversed(names)))  # order of the request does not matter
    assert [e.name for e in sub] == names
    idx = torch.cat([torch.arange(*offsets[n]) for n in names])
    full = ref.fisher(model, loader)
    expected = full[idx][:, idx]
    mat = engine.FIM(model, loader, "dense", layer_collection=sub)
    assert mat.layer_collection == sub
    ref.assert_close(mat.to_torch(), expected, 1e-10, "dense sub-block")
    blocks = engine.FIM(model, loader, "blockdiag", layer_collection=sub)
    mask = ref.block_mask(model)[idx][:, idx]
    ref.assert_close(blocks.to_torch(), expected * mask, 1e-10, "blockdiag sub-block")
    gram = engine.NTK(model, loader, layer_collection=sub)
    j = ref.jacobian(model, loader)[:, :, idx]
    ref.assert_close(gram.to_torch(), torch.einsum("icd,jed->ciej", j, j), 1e-10, "NTK sub")
    assert set(mat.paths) == set(names)
    v = PVector.from_model(model, sub)
    ref.assert_close(v.get_flat_representation(), _flat_params(model)[idx], 0.0, "from_model")


def test_layer_collection_errors():
    model, _ = zoo.build(zoo.CASES[0])
    lc = LayerCollection.from_model(model)
    with pytest.raises(ValueError, match="unknown layer") as err:
        lc.sub(["0", "nope"])
    assert "'2'" in str(err.value)  # lists the known layers
    with pytest.raises(ValueError, match="Module"):
        LayerCollection.from_model("not a model")
    assert LayerCollection.from_model(model, layers=["4"]) == lc.sub(["4"])


def test_frozen_parameters_are_left_out():
    model, loader = zoo.build(zoo.CASES[0])
    model[2].requires_grad_(False)
    lc = LayerCollection.from_model(model)
    assert [e.name for e in lc] == ["0", "4"]
    full = ref.fisher(model, loader)  # the reference also skips frozen parameters
    ref.assert_close(engine.FIM(model, loader, "dense").to_torch(), full, 1e-10, "frozen")


# ----- PVector --------------------------------------------------------------------------------


@CASES
def test_pvector_from_model_is_a_copy(case):
    model, _ = zoo.build(case)
    v = PVector.from_model(model)
    expected = _flat_params(model)
    ref.assert_close(v.get_flat_representation(), expected, 0.0, "from_model")
    assert v.dtype == torch.float64 and v.device.type == "cpu"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ref.assert_close(v.get_flat_representation(), expected, 0.0, "not a view")


@CASES
def test_pvector_from_model_grad(case):
    model, loader = zoo.build(case)
    lc = LayerCollection.from_model(model)
    zeros = PVector.from_model_grad(model)
    assert torch.count_nonzero(zeros.get_flat_representation()) == 0
    x, y = next(iter(loader))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    named = dict(model.named_parameters())
    expected = torch.cat([named[n].grad.reshape(-1) for n in lc.param_names()])
    g = PVector.from_model_grad(model)
    ref.assert_close(g.get_flat_representation(), expected, 0.0, "from_model_grad")
    model.zero_grad(set_to_none=True)
    ref.assert_close(g.get_flat_representation(), expected, 0.0, "a copy")


@CASES
def test_pvector_dict_representation(case):
    model, _ = zoo.build(case)
    v = PVector.from_model(model)
    d = v.get_dict_representation()
    modules = dict(model.named_modules())
    assert list(d) == list(ref.layer_offsets(model))
    for name, parts in d.items():
        entry = v.layer_collection[name]
        own = dict(modules[name].named_parameters(recurse=False))
        assert len(parts) == len(entry.params)
        for t, (attr, shape) in zip(parts, entry.params):
            assert tuple(t.shape) == shape == tuple(own[attr].shape)
            assert torch.equal(t, own[attr].detach())
    again = PVector(v.layer_collection, dict_repr=d)
    ref.assert_close(again.get_flat_representation(), v.get_flat_representation(), 0.0, "dict")


@CASES
def test_pvector_copy_to_model_round_trip(case):
    model, _ = zoo.build(case)
    original = PVector.from_model(model)
    target = original * 2.0 - PVector.random(
        original.layer_collection, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    target.copy_to_model(model)
    ref.assert_close(
        PVector.from_model(model).get_flat_representation(),
        target.get_flat_representation(),
        0.0,
        "copy_to_model",
    )
    ref.assert_close(_flat_params(model), target.get_flat_representation(), 0.0, "parameters")
    original.copy_to_model(model)
    ref.assert_close(_flat_params(model), original.get_flat_representation(), 0.0, "restored")


def test_pvector_arithmetic():
    model, _ = zoo.build(zoo.CASES[0])
    lc = LayerCollection.from_model(model)
    g = torch.Generator().manual_seed(0)
    a = PVector.random(lc, generator=g, dtype=torch.float64)
    b = PVector.random(lc, generator=g, dtype=torch.float64)
    x, y = a.get_flat_representation(), b.get_flat_representation()
    for result, want, what in [
        (a + b, x + y, "+"),
        (a - b, x - y, "-"),
        (a * 3.0, 3 * x, "*"),
        (2 * a, 2 * x, "r*"),
        (a * torch.tensor(0.5, dtype=torch.float64), 0.5 * x, "* tensor"),
        (a / 4, x / 4, "/"),
        (-a, -x, "neg"),
        (a.clone(), x, "clone"),
    ]:
        assert isinstance(result, PVector) and result.layer_collection == lc, what
        ref.assert_close(result.get_flat_representation(), want, 1e-15, what)
    ref.assert_close(a.dot(b), x @ y, 1e-12, "dot")
    ref.assert_close(a.norm(), torch.linalg.vector_norm(x), 1e-14, "norm")
    ref.assert_close(a.norm(1), x.abs().sum(), 1e-14, "norm(1)")
    c = a.clone()
    c.get_flat_representation().zero_()
    assert torch.count_nonzero(a.get_flat_representation()) == x.numel()
    other = PVector.random(lc.sub(["0"]), dtype=torch.float64)
    with pytest.raises(ValueError, match="layer collections"):
        a + other
    with pytest.raises(TypeError):
        a.dot(x)


def test_pvector_random_and_flat_in_out():
    model, _ = zoo.build(zoo.CASES[0])
    lc = LayerCollection.from_model(model)
    a = PVector.random(lc, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    b = PVector.random(lc, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(a.get_flat_representation(), b.get_flat_representation())
    assert a.get_flat_representation().shape == (lc.numel(),)
    assert PVector.random(lc).dtype == torch.float32
    flat = torch.arange(lc.numel(), dtype=torch.float64)
    v = PVector(lc, vector_repr=flat)
    assert v.get_flat_representation() is flat and v.to_torch() is flat
    with pytest.raises(ValueError, match=str(lc.numel())):
        PVector(lc, vector_repr=torch.zeros(lc.numel() + 1))
    with pytest.raises(ValueError, match="vector_repr"):
        PVector(lc)
    assert v.to(torch.float32).dtype == torch.float32


# ----- FVector --------------------------------------------------------------------------------


def test_fvector_basics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    y = torch.randn(3, 5, generator=g, dtype=torch.float64)
    a, b = FVector(x), FVector(y)
    assert a.get_flat_representation() is x and a.to_torch() is x
    ref.assert_close((a + b).get_flat_representation(), x + y, 1e-15, "+")
    ref.assert_close((a - b).get_flat_representation(), x - y, 1e-15, "-")
    ref.assert_close((2 * a).get_flat_representation(), 2 * x, 1e-15, "r*")
    ref.assert_close((a * 2).get_flat_representation(), 2 * x, 1e-15, "*")
    ref.assert_close(a.dot(b), (x * y).sum(), 1e-14, "dot")
    ref.assert_close(a.norm(), torch.linalg.vector_norm(x), 1e-14, "norm")
    with pytest.raises(ValueError, match=r"\(c, n\)"):
        FVector(torch.zeros(15))
