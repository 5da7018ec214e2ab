"""PushForward / PullBack maps against the ``torch.func.jacrev`` Jacobian of
:func:`tests.reference.jacobian`: ``J v`` and ``Jᵀ u`` on an MLP, a CNN with BatchNorm in eval
mode, a Conv1d net and a Linear used twice (the ``torch.func`` path)."""

from __future__ import annotations

import pytest
import torch

from fimntk.engine import (
    FVector,
    InvalidInputError,
    Jacobian,
    LayerCollection,
    PFMapDense,
    PFMapImplicit,
    PVector,
    random_pfmap,
)
from tests import reference, zoo

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

CASES = ["mlp", "cnn_bn", "conv1d", "shared_twice"]


def _setup(name):
    model, loader = zoo.build(zoo.CASES[zoo.CASE_IDS.index(name)])
    lc = LayerCollection.from_model(model)
    want = reference.jacobian(model, loader).permute(1, 0, 2)  # (c, n, d)
    g = torch.Generator().manual_seed(3)
    v = PVector(lc, torch.randn(lc.numel(), generator=g, dtype=torch.float64))
    u = FVector(torch.randn(want.shape[0], want.shape[1], generator=g, dtype=torch.float64))
    return model, loader, lc, want, v, u


def _maps(model, loader, lc):
    gen = Jacobian(model, lc)
    return {
        "dense": PFMapDense(lc, generator=gen, examples=loader),
        "implicit": PFMapImplicit(lc, Jacobian(model, lc), loader),
    }


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("kind", ["dense", "implicit"])
def test_jvp_and_vjp(name, kind):
    model, loader, lc, want, v, u = _setup(name)
    pf = _maps(model, loader, lc)[kind]
    jv = want @ v.to_torch()
    reference.assert_close(pf.jvp(v).to_torch(), jv, 1e-10, "J v")
    jtu = want.reshape(-1, want.shape[2]).t() @ u.to_torch().reshape(-1)
    reference.assert_close(pf.vjp(u).to_torch(), jtu, 1e-10, "Jᵀ u")


def test_dense_to_torch_and_arithmetic():
    model, loader, lc, want, v, _ = _setup("mlp")
    pf = _maps(model, loader, lc)["dense"]
    reference.assert_close(pf.to_torch(), want, 1e-10, "to_torch")
    assert pf.size() == want.shape and pf.size(2) == lc.numel()
    reference.assert_close((2.0 * pf - pf).to_torch(), want, 1e-12, "2J - J")
    reference.assert_close((pf + pf).jvp(v).to_torch(), 2 * want @ v.to_torch(), 1e-10)


def test_vjp_of_jvp_is_n_times_the_regression_fisher():
    """``Jᵀ J v = n · F v`` for the regression Fisher with unit variance (no 1/n in J)."""
    from fimntk.engine import FIM

    model, loader, lc, want, v, _ = _setup("cnn_bn")
    pf = _maps(model, loader, lc)["dense"]
    fisher = FIM(model, loader, "dense", variant="regression")
    n = want.shape[1]
    reference.assert_close(pf.vjp(pf.jvp(v)).to_torch(), n * fisher.mv(v).to_torch(), 1e-10)


def test_random_pfmap():
    lc = LayerCollection.from_model(zoo.build(zoo.CASES[0])[0])
    pf = random_pfmap(lc, (3, 4), generator=torch.Generator().manual_seed(0))
    assert pf.to_torch().shape == (3, 4, lc.numel())
    assert pf.to_torch().dtype == torch.float64
    with pytest.raises(InvalidInputError, match="positive sizes"):
        random_pfmap(lc, (0, 4))


def test_bad_input():
    model, loader, lc, want, v, _ = _setup("mlp")
    maps = _maps(model, loader, lc)
    with pytest.raises(InvalidInputError, match="shape"):
        maps["dense"].vjp(FVector(torch.zeros(2, 2, dtype=torch.float64)))
    with pytest.raises(InvalidInputError, match="one column per example"):
        maps["implicit"].vjp(FVector(torch.zeros(want.shape[0], 99, dtype=torch.float64)))
    with pytest.raises(InvalidInputError, match="expected a PVector"):
        maps["dense"].jvp(v.to_torch())  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="data=, or generator= and examples="):
        PFMapDense(lc)
    with pytest.raises(InvalidInputError, match="must be a Jacobian"):
        PFMapImplicit(lc, None, loader)  # type: ignore[arg-type]
