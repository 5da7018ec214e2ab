"""Independent dense references from ``torch.func.jacrev`` over ``functional_call``.

Nothing here uses the engine's hooks or generator; only the layer collection's parameter order.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev


def param_names(model: nn.Module) -> list[str]:
    """Trainable parameter names in the engine's documented flat order (module order)."""
    seen, names = set(), []
    for mname, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                names.append(f"{mname}.{attr}" if mname else attr)
    return names


def jacobian(model: nn.Module, loader) -> torch.Tensor:
    """Output Jacobian ``(n, c, d)`` of ``model(batch[0])`` stacked over the loader."""
    names = param_names(model)
    params = {k: v.detach() for k, v in model.named_parameters() if k in names}
    out = []
    for batch in loader:
        x = batch[0]

        def f(p, x=x):
            return functional_call(model, p, (x,))

        jac = jacrev(f)(params)  # name -> (n, c, *shape)
        out.append(
            torch.cat([jac[k].reshape(x.shape[0], jac[k].shape[1], -1) for k in names], dim=2)
        )
    return torch.cat(out, dim=0)


def loss_hessian(model: nn.Module, loader, loss) -> torch.Tensor:
    """``∇²_θ Σ_b loss(model(x_b), y_b)``: ``(d, d)`` by ``torch.func.hessian`` over the
    parameter dict (blocks assembled in the flat order)."""
    names = param_names(model)
    params = {k: v.detach() for k, v in model.named_parameters() if k in names}
    sizes = [params[k].numel() for k in names]
    total = None
    for x, y in loader:

        def f(p, x=x, y=y):
            return loss(functional_call(model, p, (x,)), y)

        h = hessian(f)(params)  # h[a][b]: (*shape_a, *shape_b)
        rows = [
            torch.cat([h[a][b].reshape(na, nb) for b, nb in zip(names, sizes)], dim=1)
            for a, na in zip(names, sizes)
        ]
        block = torch.cat(rows, dim=0)
        total = block if total is None else total + block
    return total


def outputs(model: nn.Module, loader) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b[0]) for b in loader], dim=0)


def output_fisher(out: torch.Tensor, variant: str, sigma: float = 1.0) -> torch.Tensor:
    """``H_i`` of shape ``(n, c, c)``."""
    n, c = out.shape
    if variant == "classif_logits":
        p = torch.softmax(out, dim=1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    if variant == "classif_binary_logits":
        p = torch.sigmoid(out)
        return (p * (1 - p))[:, :, None]
    return torch.eye(c, dtype=out.dtype).expand(n, c, c) / sigma**2


def fisher(
    model: nn.Module, loader, variant: str = "classif_logits", sigma: float = 1.0
) -> torch.Tensor:
    """Dense ``F = (1/n) Σ_i J_iᵀ H_i J_i``: ``(d, d)``."""
    j = jacobian(model, loader)
    h = output_fisher(outputs(model, loader), variant, sigma)
    return torch.einsum("nca,ncb,nbd->ad", j, h, j) / j.shape[0]


def empirical_fisher(model: nn.Module, loader, centering: bool = False) -> torch.Tensor:
    """``(1/n) Σ_i g_i g_iᵀ`` with ``g_i = ∇ log softmax(f_i)[y_i]``."""
    j = jacobian(model, loader)
    out = outputs(model, loader)
    y = torch.cat([b[1] for b in loader])
    p = torch.softmax(out, dim=1)
    r = torch.nn.functional.one_hot(y, out.shape[1]).to(out.dtype) - p
    g = torch.einsum("nc,ncd->nd", r, j)
    if centering:
        g = g - g.mean(dim=0)
    return g.t() @ g / g.shape[0]


def ntk(model: nn.Module, loader) -> torch.Tensor:
    """``(c, n, c, n)`` Gram of output Jacobians."""
    j = jacobian(model, loader)
    return torch.einsum("icd,jed->ciej", j, j)


def block_mask(model: nn.Module) -> torch.Tensor:
    """Boolean ``(d, d)`` mask of the per-layer diagonal blocks."""
    sizes = []
    seen = set()
    for _, module in model.named_modules():
        s = 0
        for _, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                s += p.numel()
        if s:
            sizes.append(s)
    return torch.block_diag(*[torch.ones(s, s, dtype=torch.bool) for s in sizes])


# ----- additions for the engine core tests ----------------------------------------------------


def layer_offsets(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{layer: (start, end)}`` in the documented flat order, computed without the engine."""
    out, start, seen = {}, 0, set()
    for mname, module in model.named_modules():
        s = 0
        for _, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                s += p.numel()
        if s:
            out[mname] = (start, start + s)
            start += s
    return out


def targets(loader) -> torch.Tensor:
    return torch.cat([b[1] for b in loader], dim=0)


def scores(out: torch.Tensor, y: torch.Tensor, variant: str, sigma: float = 1.0) -> torch.Tensor:
    """``∇_f log p(y|f)`` per example: ``(n, c)``."""
    n, c = out.shape
    if variant == "classif_logits":
        onehot = torch.nn.functional.one_hot(y.reshape(-1).long(), c).to(out.dtype)
        return onehot - torch.softmax(out, dim=1)
    if variant == "classif_binary_logits":
        return y.reshape(n, 1).to(out.dtype) - torch.sigmoid(out)
    return (y.reshape(n, c).to(out.dtype) - out) / sigma**2


def empirical_fisher_variant(
    model: nn.Module,
    loader,
    variant: str = "classif_logits",
    sigma: float = 1.0,
    centering: bool = False,
) -> torch.Tensor:
    """``(1/n) Σ_i g_i g_iᵀ`` with ``g_i = J_iᵀ ∇_f log p(y_i|f_i)`` for any variant."""
    j = jacobian(model, loader)
    g = torch.einsum(
        "nc,ncd->nd", scores(outputs(model, loader), targets(loader), variant, sigma), j
    )
    if centering:
        g = g - g.mean(dim=0)
    return g.t() @ g / g.shape[0]


def mc_fisher_expected_sq_error(
    model: nn.Module, loader, trials: int, variant: str = "classif_logits", sigma: float = 1.0
) -> torch.Tensor:
    """``E‖F_MC − F‖_F²`` of the Monte Carlo Fisher with ``trials`` draws per example.

    The draws are independent, so the error is a variance:
    ``(1/(n² T)) Σ_i (E‖g_i‖⁴ − ‖F_i‖_F²)`` with ``g_i = J_iᵀ ∇_f log p(y|x_i)``,
    ``y ~ p(y|x_i)``, and ``F_i = J_iᵀ H_i J_i``.
    """
    j = jacobian(model, loader)  # (n, c, d)
    out = outputs(model, loader)
    n, c = out.shape
    h = output_fisher(out, variant, sigma)
    fi_sq = torch.einsum("nca,ncb,nbd->nad", j, h, j).pow(2).sum(dim=(1, 2))
    jjt = torch.einsum("nad,nbd->nab", j, j)  # (n, c, c)
    if variant == "classif_logits":
        p = torch.softmax(out, dim=1)
        s = torch.eye(c, dtype=out.dtype)[None] - p[:, None, :]  # (n, y, c)
        g_sq = torch.einsum("nya,nab,nyb->ny", s, jjt, s)  # ‖J_iᵀ s_y‖²
        g4 = (p * g_sq.pow(2)).sum(dim=1)
    elif variant == "classif_binary_logits":
        p = torch.sigmoid(out[:, 0])
        m4 = p * (1 - p) ** 4 + (1 - p) * p**4
        g4 = jjt[:, 0, 0].pow(2) * m4
    else:
        a = jjt / sigma**2
        tr = torch.diagonal(a, dim1=1, dim2=2).sum(dim=1)
        g4 = tr.pow(2) + 2 * (a @ a).diagonal(dim1=1, dim2=2).sum(dim=1)
    return (g4 - fi_sq).sum() / (n**2 * trials)


def mean_kl(
    out_p: torch.Tensor, out_q: torch.Tensor, variant: str = "classif_logits", sigma: float = 1.0
) -> torch.Tensor:
    """``(1/n) Σ_i KL(p(·|f_i) ‖ q(·|f'_i))`` for outputs of shape ``(n, c)``."""
    if variant == "classif_logits":
        lp, lq = torch.log_softmax(out_p, dim=1), torch.log_softmax(out_q, dim=1)
        return (lp.exp() * (lp - lq)).sum(dim=1).mean()
    if variant == "classif_binary_logits":
        lp1, lq1 = torch.nn.functional.logsigmoid(out_p), torch.nn.functional.logsigmoid(out_q)
        lp0, lq0 = torch.nn.functional.logsigmoid(-out_p), torch.nn.functional.logsigmoid(-out_q)
        return (lp1.exp() * (lp1 - lq1) + lp0.exp() * (lp0 - lq0)).sum(dim=1).mean()
    return ((out_p - out_q) ** 2).sum(dim=1).mean() / (2 * sigma**2)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-10, what: str = ""
) -> None:
    """``max|actual − expected| ≤ tol · max(max|expected|, tiny)``, shapes equal."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    assert tuple(actual.shape) == tuple(expected.shape), (what, actual.shape, expected.shape)
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    scale = max(e.abs().max().item() if e.numel() else 0.0, 1e-30)
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} × scale {scale:.3e}"
