"""Three ways a model or an argument used to give a silently wrong result (issue 20):

- a module registered under two names (``self.a = self.b = lin``): ``torch.func.functional_call``
  put a plain tensor in place of its ``Parameter``, so a later ``PMatImplicit.mv`` found no
  gradient;
- an empty ``LayerCollection`` read as "not given", i.e. the whole model;
- ``model.train()`` after the generator was built: BatchNorm then used batch statistics.

References: the same network with its module registered once (whose dense Fisher is
``tests.reference.fisher``, by ``torch.func.jacrev``), never our own hooks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fimntk import engine
from fimntk.engine import (
    FIM,
    NTK,
    InvalidInputError,
    Jacobian,
    LayerCollection,
    PVector,
    TrainModeBatchNormError,
)
from tests import reference, zoo

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


class AliasedTwice(zoo.SharedTwice):
    """``SharedTwice`` whose shared Linear is also registered as ``alias``."""

    def __init__(self) -> None:
        super().__init__()
        self.alias = self.shared

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.alias(h))
        return self.out(h)


def _aliased_and_plain():
    """The aliased model, its loader, and the dense reference Fisher ``(d, d)`` computed on the
    same weights registered once."""
    plain, loader = zoo.build(zoo.CASES[zoo.CASE_IDS.index("shared_twice")])
    aliased = AliasedTwice().double().eval()
    aliased.load_state_dict(plain.state_dict(), strict=False)
    return aliased, loader, reference.fisher(plain, loader)


@pytest.mark.parametrize("first", ["dense", "diag", "kfac", "ntk"])
@pytest.mark.parametrize("order", ["before", "after"])
def test_implicit_on_a_module_under_two_names(first, order):
    model, loader, want = _aliased_and_plain()
    params = {id(p): p for p in model.parameters()}

    def other():
        if first == "ntk":
            NTK(model, loader)
        else:
            FIM(model, loader, first)

    if order == "before":
        other()
    implicit = FIM(model, loader, "implicit")
    if order == "after":
        other()
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert {id(p): p for p in model.parameters()} == params  # the same Parameter objects
    v = PVector(implicit.layer_collection, torch.randn(want.shape[0], dtype=torch.float64))
    reference.assert_close(implicit.mv(v).to_torch(), want @ v.to_torch(), 1e-9, "mv")
    reference.assert_close(implicit.vTMv(v), v.to_torch() @ want @ v.to_torch(), 1e-9, "vTMv")
    damped = want + 0.5 * torch.eye(want.shape[0], dtype=torch.float64)
    x = implicit.solve(v, regul=0.5, tol=1e-12, max_iter=200)
    reference.assert_close(x.to_torch(), torch.linalg.solve(damped, v.to_torch()), 1e-7, "solve")


def test_dense_on_a_module_under_two_names():
    model, loader, want = _aliased_and_plain()
    reference.assert_close(FIM(model, loader, "dense").to_torch(), want, 1e-10, "dense")


def test_tied_parameter_swapped_in_both_modules():
    """A ``Parameter`` shared by two modules (tied embedding and decoder) takes the fallback
    path with the value swapped in both places: the Fisher matches ``torch.func``'s."""
    model = zoo.TiedWeights()
    x = torch.randint(0, 7, (9, 3))
    model, loader = zoo.build_model_loader(model, x, torch.randint(0, 7, (9,)))
    want = reference.fisher(model, loader)
    reference.assert_close(FIM(model, loader, "dense").to_torch(), want, 1e-10, "tied")


ENTRY_POINTS = {
    "FIM-dense": lambda m, ld, lc: FIM(m, ld, "dense", layer_collection=lc),
    "FIM-implicit": lambda m, ld, lc: FIM(m, ld, "implicit", layer_collection=lc),
    "NTK": lambda m, ld, lc: NTK(m, ld, layer_collection=lc),
    "Jacobian": lambda m, ld, lc: Jacobian(m, lc),
    "PVector.from_model": lambda m, ld, lc: PVector.from_model(m, lc),
    "PVector.from_model_grad": lambda m, ld, lc: PVector.from_model_grad(m, lc),
    "estimate_memory": lambda m, ld, lc: engine.estimate_memory(
        m, "dense", n_output=3, layer_collection=lc
    ),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS.values()), ids=list(ENTRY_POINTS))
def test_empty_layer_collection_is_refused(entry):
    model, loader = zoo.build(zoo.CASES[zoo.CASE_IDS.index("mlp")])
    with pytest.raises(InvalidInputError, match=r"layer_collection is empty.*from_model"):
        entry(model, loader, LayerCollection())


def test_layer_collection_of_the_wrong_type_is_refused():
    model, loader = zoo.build(zoo.CASES[zoo.CASE_IDS.index("mlp")])
    with pytest.raises(InvalidInputError, match="must be a LayerCollection"):
        FIM(model, loader, "dense", layer_collection=["0"])  # type: ignore[arg-type]


def _bn_model():
    return zoo.build(zoo.CASES[zoo.CASE_IDS.index("cnn_bn")])


COMPUTE = {
    "jacobian": lambda gen, ld: gen.get_jacobian(ld),
    "covariance": lambda gen, ld: gen.get_covariance_matrix(ld),
    "gram": lambda gen, ld: gen.get_gram_matrix(ld),
    "probe": lambda gen, ld: gen.probe(ld),
}


@pytest.mark.parametrize("compute", list(COMPUTE.values()), ids=list(COMPUTE))
def test_train_mode_batchnorm_after_the_generator_was_built(compute):
    model, loader = _bn_model()
    gen = Jacobian(model)
    model.train()
    with pytest.raises(TrainModeBatchNormError, match=r"model.eval\(\)"):
        compute(gen, loader)
    model.eval()
    reference.assert_close(gen.get_gram_matrix(loader), reference.ntk(model, loader), 1e-10)


def test_train_mode_batchnorm_after_an_implicit_fim_was_built():
    model, loader = _bn_model()
    implicit = FIM(model, loader, "implicit")
    v = PVector.from_model(model)
    model.train()
    with pytest.raises(TrainModeBatchNormError, match=r"model.eval\(\)"):
        implicit.mv(v)
    with pytest.raises(TrainModeBatchNormError, match=r"model.eval\(\)"):
        implicit.vTMv(v)


def test_train_mode_dropout_after_the_generator_was_built():
    model, loader = zoo.build_model_loader(zoo.dropout_mlp(), torch.randn(8, 5))
    gen = Jacobian(model)
    model.train()
    with pytest.raises(InvalidInputError, match=r"Dropout is in train mode.*model.eval\(\)"):
        gen.get_covariance_matrix(loader)
