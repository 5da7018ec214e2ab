"""Independent dense references from ``torch.func.jacrev`` over ``functional_call``.

Nothing here uses the engine's hooks or generator; only the layer collection's parameter order.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev


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
        out.append(torch.cat([jac[k].reshape(x.shape[0], jac[k].shape[1], -1) for k in names],
                             dim=2))
    return torch.cat(out, dim=0)


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


def fisher(model: nn.Module, loader, variant: str = "classif_logits",
           sigma: float = 1.0) -> torch.Tensor:
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
