"""The lower-triangle accumulation behind dense and block Fisher matrices and KFAC factors
(d > one strip)."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fimntk import engine
from fimntk.engine.linalg import add_lower_gram, strip_height, symmetrize_lower
from tests import reference as ref
from tests.engine import _structured_helpers as H


def test_strips_accumulate_the_full_symmetric_product():
    g = torch.Generator().manual_seed(0)
    j1 = torch.randn(30, 2500, generator=g, dtype=torch.float64)
    j2 = torch.randn(20, 2500, generator=g, dtype=torch.float64)
    got = symmetrize_lower(add_lower_gram(add_lower_gram(None, j1), j2))
    want = j1.t() @ j1 + j2.t() @ j2
    assert torch.allclose(got, want, rtol=0, atol=1e-11)


@pytest.mark.parametrize("d", [1, 255, 256, 257, 784, 1030, 4097, 5000])
def test_every_strip_height_gives_the_full_product(d):
    g = torch.Generator().manual_seed(d)
    j = torch.randn(9, d, generator=g, dtype=torch.float64)
    total = torch.randn(d, d, generator=g, dtype=torch.float64)
    total = total + total.t()  # a symmetric running sum, as after earlier batches
    want = total + j.t() @ j
    assert strip_height(d) <= d
    got = symmetrize_lower(add_lower_gram(total.clone(), j))
    assert torch.allclose(got, want, rtol=0, atol=1e-11)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_factors_beyond_one_strip_match_their_definition(approx):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 280), nn.Tanh(), nn.Linear(280, 3)).double().eval()
    x = torch.randn(11, 300, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x), batch_size=5)
    assert strip_height(301) < 301 and strip_height(280) < 280
    kfac = engine.FIM(model, loader, "kfac", kfac_approx=approx)
    for name, module in (("0", model[0]), ("2", model[2])):
        a, g = kfac.factors[name]
        want_a, want_g = H.kfac_factors(model, loader, module, approx)
        ref.assert_close(a, want_a, 1e-10, f"{name} A")
        ref.assert_close(g, want_g, 1e-10, f"{name} G")


def test_dense_and_blockdiag_fisher_beyond_one_strip_match_the_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 3)).double().eval()
    x = torch.randn(7, 30, dtype=torch.float64)
    loader = DataLoader(TensorDataset(x), batch_size=4)
    want = ref.fisher(model, loader)
    assert want.shape[0] > 1024
    dense = engine.FIM(model, loader, "dense").to_torch()
    assert torch.allclose(dense, want, rtol=0, atol=1e-10 * want.abs().max())
    block = engine.FIM(model, loader, "blockdiag").to_torch()
    mask = ref.block_mask(model)
    assert torch.allclose(block, want * mask, rtol=0, atol=1e-10 * want.abs().max())
