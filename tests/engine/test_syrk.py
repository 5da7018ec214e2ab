"""The lower-triangle accumulation behind dense and block Fisher matrices (d > one strip)."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import engine
from engine.generator._syrk import add_lower_gram, symmetrize_lower
from tests import reference as ref


def test_strips_accumulate_the_full_symmetric_product():
    g = torch.Generator().manual_seed(0)
    j1 = torch.randn(30, 2500, generator=g, dtype=torch.float64)
    j2 = torch.randn(20, 2500, generator=g, dtype=torch.float64)
    got = symmetrize_lower(add_lower_gram(add_lower_gram(None, j1), j2))
    want = j1.t() @ j1 + j2.t() @ j2
    assert torch.allclose(got, want, rtol=0, atol=1e-11)


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
