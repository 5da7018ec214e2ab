"""Layers with one position per example (``T = 1``), where the diagonal, quasi-diagonal, EKFAC
and Gram statistics factor per batch and are written straight into their accumulators: a Conv2d
whose output is one pixel (also grouped), a grouped ConvTranspose2d on one input pixel (its flat
weight is ``(in, out/groups, k, k)``, the transpose of the ``(G, Q, P)`` view), an Embedding of
one token (one-hot inputs) and biasless Linears. Each is checked against torch.func references.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fimntk import engine
from tests import reference as ref
from tests import zoo

TOL = 1e-10


def _conv_pixel():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3, bias=False))


def _convT_pixel():
    return nn.Sequential(
        nn.ConvTranspose2d(4, 6, 2, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(24, 3)
    )


def _grouped_pixel():
    return nn.Sequential(
        nn.Conv2d(4, 6, 2, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3, bias=False)
    )


def _token():
    return nn.Sequential(nn.Embedding(7, 5), nn.Flatten(), nn.Tanh(), nn.Linear(5, 3))


MODELS = {
    "conv-pixel": (_conv_pixel, lambda g: torch.randn(11, 3, 3, 3, generator=g)),
    "convT-pixel": (_convT_pixel, lambda g: torch.randn(11, 4, 1, 1, generator=g)),
    "grouped-pixel": (_grouped_pixel, lambda g: torch.randn(11, 4, 2, 2, generator=g)),
    "token": (_token, lambda g: torch.randint(0, 7, (11, 1), generator=g)),
}
CASES = pytest.mark.parametrize("name", list(MODELS))


def _built(name: str):
    make, inputs = MODELS[name]
    torch.manual_seed(0)
    return zoo.build_model_loader(make(), inputs(torch.Generator().manual_seed(1)), batch_size=4)


@CASES
def test_diagonal(name):
    model, loader = _built(name)
    exact = ref.fisher(model, loader).diagonal()
    ref.assert_close(engine.FIM(model, loader, "diag").get_diag(), exact, TOL, "PMatDiag")
    ref.assert_close(engine.FIM(model, loader, "implicit").get_diag(), exact, TOL, "implicit")


@CASES
def test_ntk(name):
    """The Gram ``(g₁·g₂)(a₁·a₂ + 1)`` added in place, across batches (off-diagonal blocks)."""
    model, loader = _built(name)
    ref.assert_close(
        engine.GramMatrix(model, loader).to_torch(), ref.ntk(model, loader), TOL, "Gram"
    )


@CASES
def test_quasidiag_diagonal(name):
    model, loader = _built(name)
    mat = engine.FIM(model, loader, "quasidiag")
    ref.assert_close(mat.get_diag(), ref.fisher(model, loader).diagonal(), TOL, "diagonal")


def test_quasidiag_bias_row_entries():
    """Conv2d with a bias: the diagonal plus the pairs ``(W[o, ·], b[o])``; zero elsewhere."""
    model, loader = _built("conv-pixel")
    exact = ref.fisher(model, loader)
    conv = model[0]
    mask = torch.eye(exact.shape[0], dtype=torch.bool)
    per = conv.weight.numel() // conv.out_channels
    for o in range(conv.out_channels):
        b, w = conv.weight.numel() + o, o * per + torch.arange(per)
        mask[b, w] = mask[w, b] = True
    mat = engine.FIM(model, loader, "quasidiag")
    assert mat.kinds["0"] == "quasidiag"
    ref.assert_close(mat.to_torch(), exact * mask, TOL, "to_torch")


@CASES
def test_ekfac_update_diag(name):
    """After ``update_diag`` the trace is exact (the eigenvalues are ``diag(Uᵀ F_l U)`` of an
    orthonormal basis ``U``) and each layer is at least as close to its Fisher block as KFAC."""
    model, loader = _built(name)
    exact = ref.fisher(model, loader)
    kfac = engine.FIM(model, loader, "kfac").to_torch()
    mat = engine.FIM(model, loader, "ekfac")
    mat.update_diag(loader)
    full = mat.to_torch()
    ref.assert_close(mat.trace(), exact.trace(), TOL, "trace")
    for s, e in ref.layer_offsets(model).values():
        f_l, e_l, k_l = (m[s:e, s:e] for m in (exact, full, kfac))
        ref.assert_close(e_l.trace(), f_l.trace(), TOL, "layer trace")
        assert torch.linalg.norm(e_l - f_l) <= torch.linalg.norm(k_l - f_l) + 1e-12
