"""The ``classif_logsoftmax`` and ``segmentation_logits`` variants against dense references.

References are built here from ``torch.func.jacrev`` Jacobians and the output Fisher written
out per example (and per position for segmentation): ``diag(p)`` on log-probabilities, a softmax
block ``diag(p) − p pᵀ`` per position summed over positions.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from fimntk import engine
from fimntk.engine.errors import InvalidInputError
from fimntk.engine.generator import outputs as outputs_module
from tests import reference as ref

CLASSES, SIDE = 3, 4
POSITIONS = SIDE * SIDE


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, CLASSES)).double()


def _segmenter() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, CLASSES, 3, padding=1)
    ).double()


def _classif_loader() -> list:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (12,), generator=g)
    return [(x[:7], y[:7]), (x[7:], y[7:])]


def _segmentation_loader() -> list:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (5, SIDE, SIDE), generator=g)
    return [(x[:3], y[:3]), (x[3:], y[3:])]


def _log_softmax_of(model: nn.Module):
    return lambda x, *rest: torch.log_softmax(model(x), dim=1)


def _per_position_jacobians(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """``J`` ``(n, P, c, d)`` and the logits ``(n, P, c)`` by ``torch.func.jacrev``."""
    names = ref.param_names(model)
    params = {k: v.detach() for k, v in model.named_parameters() if k in names}
    jacs, outs = [], []
    for x, _ in loader:
        for xi in x:

            def f(p, xi=xi):
                return functional_call(model, p, (xi[None],))[0]  # (c, h, w)

            jac = jacrev(f)(params)
            flat = torch.cat([jac[k].reshape(CLASSES, POSITIONS, -1) for k in names], dim=2)
            jacs.append(flat.transpose(0, 1))
            outs.append(f(params).reshape(CLASSES, POSITIONS).t())
    return torch.stack(jacs), torch.stack(outs)


def _segmentation_fisher(model: nn.Module, loader) -> torch.Tensor:
    """``(1/n) Σ_i Σ_p J_ipᵀ (diag(p_ip) − p_ip p_ipᵀ) J_ip``."""
    jac, out = _per_position_jacobians(model, loader)
    p = torch.softmax(out, dim=-1)
    h = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
    return torch.einsum("npcd,npce,npef->df", jac, h, jac) / jac.shape[0]


def _segmentation_empirical(model: nn.Module, loader) -> torch.Tensor:
    """``(1/n) Σ_i g_i g_iᵀ`` with ``g_i = Σ_p J_ipᵀ (e_{y_ip} − p_ip)``."""
    jac, out = _per_position_jacobians(model, loader)
    y = torch.cat([b[1] for b in loader]).reshape(-1, POSITIONS)
    r = nn.functional.one_hot(y, CLASSES).double() - torch.softmax(out, dim=-1)
    g = torch.einsum("npc,npcd->nd", r, jac)
    return g.t() @ g / g.shape[0]


def _logsoftmax_fisher(model: nn.Module, loader) -> torch.Tensor:
    """``(1/n) Σ_i J_iᵀ diag(p_i) J_i`` with ``J_i`` the Jacobian of the log-probabilities."""
    logp = nn.Sequential(model, nn.LogSoftmax(dim=1))
    jac = ref.jacobian(logp, loader)  # (n, c, d)
    p = ref.outputs(logp, loader).exp()
    return torch.einsum("ncd,nc,nce->de", jac, p, jac) / jac.shape[0]


@pytest.mark.parametrize("rep", ["dense", "diag", "blockdiag"])
def test_logsoftmax_exact_fisher(rep):
    model, loader = _mlp(), _classif_loader()
    expected = _logsoftmax_fisher(model, loader)
    fim = engine.FIM(
        model, loader, rep, variant="classif_logsoftmax", function=_log_softmax_of(model)
    )
    dense = expected * ref.block_mask(model) if rep == "blockdiag" else expected
    if rep == "diag":
        ref.assert_close(fim.get_diag(), torch.diagonal(expected), what=rep)
    else:
        ref.assert_close(fim.to_torch(), dense, what=rep)
    # the same Fisher as the logits' (the log-softmax's Jacobian holds the centring)
    ref.assert_close(fim.trace(), ref.fisher(model, loader, "classif_logits").trace(), 1e-10)


def test_logsoftmax_monte_carlo_and_empirical():
    model, loader = _mlp(), _classif_loader()
    expected = _logsoftmax_fisher(model, loader)
    fn = _log_softmax_of(model)
    mc = engine.FIM_MonteCarlo(
        model, loader, "dense", variant="classif_logsoftmax", trials=4000, seed=0, function=fn
    ).to_torch()
    rel = ((mc - expected).norm() / expected.norm()).item()
    assert 1e-4 < rel < 0.05, rel  # sampled (not exact) and converging
    emp = engine.EmpiricalFIM(model, loader, "dense", variant="classif_logsoftmax", function=fn)
    ref.assert_close(emp.to_torch(), ref.empirical_fisher(model, loader), what="empirical")


def test_logsoftmax_refuses_logits():
    model, loader = _mlp(), _classif_loader()
    with pytest.raises(InvalidInputError, match="classif_logits"):
        engine.FIM(model, loader, "diag", variant="classif_logsoftmax")


@pytest.mark.parametrize("rep", ["dense", "diag", "blockdiag", "kfac", "ekfac"])
def test_segmentation_exact_fisher(rep):
    model, loader = _segmenter(), _segmentation_loader()
    expected = _segmentation_fisher(model, loader)
    fim = engine.FIM(model, loader, rep, variant="segmentation_logits")
    if rep == "dense":
        ref.assert_close(fim.to_torch(), expected, what=rep)
    elif rep == "blockdiag":
        ref.assert_close(fim.to_torch(), expected * ref.block_mask(model), what=rep)
    elif rep == "diag":
        ref.assert_close(fim.get_diag(), torch.diagonal(expected), what=rep)
    else:  # Kronecker factors: an approximation inside each block, exact biases' diagonal
        ekfac = engine.FIM(model, loader, "ekfac", variant="segmentation_logits")
        ekfac.update_diag(loader)
        ref.assert_close(ekfac.trace(), expected.trace(), 1e-10, "EKFAC's corrected trace")
        rel = ((fim.to_torch() - expected * ref.block_mask(model)).norm() / expected.norm()).item()
        assert rel < 0.5, rel


def test_segmentation_monte_carlo_converges():
    model, loader = _segmenter(), _segmentation_loader()
    expected = _segmentation_fisher(model, loader)
    errors = []
    for trials in (4, 400):
        mc = engine.FIM_MonteCarlo(
            model, loader, "dense", variant="segmentation_logits", trials=trials, seed=0
        ).to_torch()
        errors.append(((mc - expected).norm() / expected.norm()).item())
    assert errors[1] < errors[0] / 4, errors  # error ~ 1/√trials
    assert errors[1] < 0.1, errors


def test_segmentation_empirical():
    model, loader = _segmenter(), _segmentation_loader()
    emp = engine.EmpiricalFIM(model, loader, "dense", variant="segmentation_logits")
    ref.assert_close(emp.to_torch(), _segmentation_empirical(model, loader), what="empirical")


def test_segmentation_errors(monkeypatch):
    mlp = _mlp()
    with pytest.raises(InvalidInputError, match=r"\(n, c, \*positions\)"):
        engine.FIM(mlp, _classif_loader(), "diag", variant="segmentation_logits")
    model, loader = _segmenter(), _segmentation_loader()
    bad_targets = [(x, y[:, :2]) for x, y in loader]
    with pytest.raises(InvalidInputError, match="one class index per position"):
        engine.EmpiricalFIM(model, bad_targets, "diag", variant="segmentation_logits")
    monkeypatch.setattr(outputs_module, "MAX_EXACT_SEGMENTATION_ENTRIES", 100)
    with pytest.raises(InvalidInputError, match="FIM_MonteCarlo"):
        engine.FIM(model, loader, "diag", variant="segmentation_logits")
