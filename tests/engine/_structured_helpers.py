"""Shared, engine-independent helpers of the structured-representation tests.

Everything here is computed from the definitions with plain autograd, ``torch.func`` and the
model's own modules (forward hooks of our own), never from the engine's generator: KFAC factors,
the matrix view of a layer, Kronecker products in the flat layout, quasi-diagonal masks. Expensive
objects (reference Fishers, engine matrices that tests only read) are cached per zoo case; a test
that mutates a matrix (``update_diag``) builds its own.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fimntk import engine
from tests import reference as ref
from tests import zoo

BY_NAME = {c.name: c for c in zoo.CASES}

#: ``@CASES`` parametrises a test over the zoo, one id per model (the argument is the name).
CASES = pytest.mark.parametrize("case", zoo.CASE_IDS)

ATTN_WARNING = pytest.mark.filterwarnings("ignore:There is a performance drop")
#: torch's own forward-mode decompositions are scripted on the first ``jvp``.
JIT_WARNING = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

NORM_TYPES = ("BatchNorm1d", "BatchNorm2d", "GroupNorm", "LayerNorm")
KRON_TYPES = ("Linear", "NonDynamicallyQuantizableLinear", "Conv1d", "Conv2d", "Embedding")


# ----- cached zoo objects (read-only in tests) ---------------------------------------------------


@cache
def built(case: str, dtype: torch.dtype = torch.float64):
    """``(model, loader)`` of a zoo case (13 examples, batches of 5)."""
    return zoo.build(BY_NAME[case], dtype=dtype)


@cache
def ref_fisher(case: str, variant: str = "classif_logits") -> torch.Tensor:
    model, loader = built(case)
    return ref.fisher(model, loader, variant)


@cache
def fim(case: str, rep: str, dtype: torch.dtype = torch.float64, **options):
    """An engine matrix of a zoo case; shared between tests, so never mutate it."""
    model, loader = built(case, dtype)
    return engine.FIM(model, loader, rep, **options)


@cache
def ekfac_updated(case: str, dtype: torch.dtype = torch.float64):
    """A fresh EKFAC of a zoo case after ``update_diag`` on the same loader (read-only)."""
    model, loader = built(case, dtype)
    return engine.FIM(model, loader, "ekfac").update_diag(loader)


def offsets(case: str) -> dict[str, tuple[int, int]]:
    return ref.layer_offsets(built(case)[0])


def modules(case: str) -> dict[str, nn.Module]:
    return dict(built(case)[0].named_modules())


def on_hooks(case: str, layer: str) -> bool:
    """Whether ``layer`` takes the hook path (by the zoo's own list of fallback layers)."""
    return layer not in zoo.FALLBACK_LAYERS.get(case, set())


def rand_pvector(mat, seed: int = 0) -> engine.PVector:
    g = torch.Generator().manual_seed(seed)
    lc = mat.layer_collection
    return engine.PVector(lc, torch.randn(lc.numel(), generator=g, dtype=torch.float64))


def block(m: torch.Tensor, off: tuple[int, int]) -> torch.Tensor:
    return m[off[0] : off[1], off[0] : off[1]]


def block_diagonal_part(full: torch.Tensor, case: str) -> torch.Tensor:
    """``full`` with every entry between two different layers set to zero."""
    out = torch.zeros_like(full)
    for s, e in offsets(case).values():
        out[s:e, s:e] = full[s:e, s:e]
    return out


# ----- the matrix view of a layer, derived from the module ---------------------------------------


@dataclass(frozen=True)
class View:
    """``(groups, q, p [+1])`` view of a layer: rows are output units, columns input units."""

    groups: int
    q: int
    p: int
    bias: bool
    transposed: bool

    @property
    def cols(self) -> int:
        return self.p + int(self.bias)

    def flat_index(self) -> torch.Tensor:
        """``(groups, q, cols)``: the flat position (inside the layer) of each matrix entry.

        Weight ``(groups·q, p)`` row-major (Linear, Conv), or ``(groups·p, q)`` when transposed
        (Embedding's ``(vocab, dim)``); the bias ``(groups·q,)`` after the weight.
        """
        g, q, p = (torch.arange(n) for n in (self.groups, self.q, self.p))
        if self.transposed:
            w = (g[:, None, None] * self.p + p[None, None, :]) * self.q + q[None, :, None]
        else:
            w = (g[:, None, None] * self.q + q[None, :, None]) * self.p + p[None, None, :]
        if not self.bias:
            return w
        b = self.groups * self.q * self.p + g[:, None] * self.q + q[None, :]
        return torch.cat([w, b[:, :, None]], dim=2)


def weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias of a layer; attention's input projection is one ``(3E, E)`` weight."""
    if isinstance(module, nn.MultiheadAttention):
        return module.in_proj_weight, module.in_proj_bias
    return module.weight, getattr(module, "bias", None)


def is_kron(module: nn.Module) -> bool:
    """Whether a hooked ``module`` gets Kronecker factors: Linear (attention's ``out_proj``
    included), Conv1d/2d, Embedding, and attention with packed q/k/v weights and no
    ``bias_k``/``bias_v`` (one group per projection)."""
    if isinstance(module, nn.MultiheadAttention):
        return module.in_proj_weight is not None and module.bias_k is None
    return type(module).__name__ in KRON_TYPES


def view_of(module: nn.Module) -> View:
    """The view of a Linear, Conv1d/2d, Embedding or packed attention, from the module's
    attributes alone."""
    if isinstance(module, nn.MultiheadAttention):
        e = module.embed_dim
        return View(3, e, e, module.in_proj_bias is not None, False)
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        return View(1, module.out_features, module.in_features, bias, False)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        kk = math.prod(module.kernel_size)
        g = module.groups
        return View(g, module.out_channels // g, module.in_channels // g * kk, bias, False)
    if isinstance(module, nn.Embedding):
        return View(1, module.embedding_dim, module.num_embeddings, False, True)
    raise TypeError(type(module).__name__)


def kron_dense(a: torch.Tensor, g: torch.Tensor, view: View) -> torch.Tensor:
    """The flat ``(d_l, d_l)`` matrix of ``X ↦ G_γ X A_γ`` per group, i.e. ``⊕_γ G_γ ⊗ A_γ``."""
    assert a.shape == (view.groups, view.cols, view.cols), (a.shape, view)
    assert g.shape == (view.groups, view.q, view.q), (g.shape, view)
    idx = view.flat_index()
    d = idx.numel()
    out = torch.zeros(d, d, dtype=a.dtype)
    for gi in range(view.groups):
        i = idx[gi].reshape(-1)
        out[i[:, None], i[None, :]] = torch.kron(g[gi], a[gi])
    return out


def pi_damped_kron_inverse(
    a: torch.Tensor, g: torch.Tensor, view: View, regul: float
) -> torch.Tensor:
    """``⊕_γ (G_γ + √λ/π I)⁻¹ ⊗ (A_γ + π√λ I)⁻¹`` with ``π = √((tr A/dim A)/(tr G/dim G))``
    (Martens & Grosse 2015, §6.3), built densely."""
    ia, ig = [], []
    for gi in range(view.groups):
        ag, gg = a[gi].double(), g[gi].double()
        pi = math.sqrt((ag.trace() / ag.shape[0]) / (gg.trace() / gg.shape[0]))
        s = math.sqrt(regul)
        ia.append(torch.linalg.inv(ag + s * pi * torch.eye(ag.shape[0], dtype=ag.dtype)))
        ig.append(torch.linalg.inv(gg + s / pi * torch.eye(gg.shape[0], dtype=gg.dtype)))
    return kron_dense(torch.stack(ia), torch.stack(ig), view)


# ----- KFAC factors from their definitions --------------------------------------------------------


def layer_io(model: nn.Module, x: torch.Tensor, module: nn.Module, expand: bool = False):
    """Input of ``module`` ``(n, ...)``, Jacobian of the logits with respect to its output
    ``(n, c, *out)`` (plain autograd through a perturbation added by our own forward hook), and the
    logits ``(n, c)``. Requires examples not to interact (eval mode).

    With ``expand``, the layer's input and output are expanded to the batch's n examples (a
    no-op for a layer that carries the examples; for one called on a batch of one and broadcast,
    each example's share of its output gets a row)."""
    store = {}
    n = x.shape[0]

    def pre(mod, args):
        inp = args[0].detach()
        store["x"] = inp.expand(n, *inp.shape[1:]) if expand else inp

    def post(mod, args, out):
        shape = (n, *out.shape[1:]) if expand else out.shape
        eps = torch.zeros(shape, dtype=out.dtype, device=out.device, requires_grad=True)
        store["eps"] = eps
        return out + eps

    h1 = module.register_forward_pre_hook(pre)
    h2 = module.register_forward_hook(post)
    try:
        with torch.enable_grad():
            logits = model(x)
            rows = [
                torch.autograd.grad(logits[:, j].sum(), store["eps"], retain_graph=True)[0]
                for j in range(logits.shape[1])
            ]
    finally:
        h1.remove()
        h2.remove()
    return store["x"], torch.stack(rows, dim=1), logits.detach()


@contextmanager
def linear_calls(weight: torch.Tensor, n: int):
    """Record every ``F.linear`` call (as torch's own attention makes them) whose weight is
    ``weight`` or a block of its rows: yields a list of ``(first row, input (n, T, P), eps)``,
    where the call's output has ``eps (n, T, rows)`` added (to differentiate with respect to).
    Inputs are seen batch first: ``(T, n, P)`` and ``(T·n, P)`` (attention's layouts) are
    rearranged."""
    calls: list = []
    linear = F.linear
    base = weight.data_ptr()
    row = weight.stride(0) * weight.element_size()

    def recording(x, w, b=None):
        out = linear(x, w, b)
        if w.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
            return out
        seq = x.reshape(-1, n, x.shape[-1]).transpose(0, 1)  # (n, T, P)
        eps = torch.zeros(n, seq.shape[1], w.shape[0], dtype=out.dtype, requires_grad=True)
        calls.append(((w.data_ptr() - base) // row, seq.detach(), eps))
        return out + eps.transpose(0, 1).reshape(out.shape)

    with mock.patch.object(F, "linear", recording):
        yield calls


def functional_io(model: nn.Module, x: torch.Tensor, weight: torch.Tensor):
    """``[(first row, input (n, T, P), Jacobian of the logits (n, c, T, rows))]`` of each
    ``F.linear`` call on (rows of) ``weight``, and the logits ``(n, c)``."""
    with torch.enable_grad(), linear_calls(weight, x.shape[0]) as calls:
        logits = model(x)
        eps = [e for _, _, e in calls]
        rows = [
            torch.autograd.grad(logits[:, j].sum(), eps, retain_graph=True)
            for j in range(logits.shape[1])
        ]
    out = [
        (first, inp, torch.stack([r[i] for r in rows], dim=1))
        for i, (first, inp, _) in enumerate(calls)
    ]
    return out, logits.detach()


def attention_a_j(model: nn.Module, x: torch.Tensor, module: nn.Module):
    """``[a (n, T_p, E)]`` and ``[J (n, c, T_p, E)]`` of the q, k and v projections of a packed
    attention module, read off torch's own ``F.linear`` calls; and the logits."""
    e = module.embed_dim
    calls, logits = functional_io(model, x, module.in_proj_weight)
    a, j = [None] * 3, [None] * 3
    for first, inp, jac in calls:
        for r in range(jac.shape[-1] // e):
            a[first // e + r] = inp
            j[first // e + r] = jac[..., r * e : (r + 1) * e]
    return a, j, logits


def conv_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(n, groups, T, C_in/groups·k)`` patches of a Conv1d/Conv2d input, in the weight's
    ``(in, kh, kw)`` order, by explicit indexing (padding modes included)."""
    one_d = x.dim() == 3
    if one_d:
        x = x.unsqueeze(2)
    ks = (1, *module.kernel_size) if one_d else tuple(module.kernel_size)
    st = (1, *module.stride) if one_d else tuple(module.stride)
    dl = (1, *module.dilation) if one_d else tuple(module.dilation)
    if module.padding == "same":
        tot = [d * (k - 1) for d, k in zip(dl, ks)]
        pads = [(t // 2, t - t // 2) for t in tot]
    else:
        pd = (0, *module.padding) if one_d else tuple(module.padding)
        pads = [(p, p) for p in pd]
    if one_d:
        pads[0] = (0, 0)
    flat_pad = (*pads[1], *pads[0])
    mode = {"zeros": "constant"}.get(module.padding_mode, module.padding_mode)
    if any(flat_pad):
        xp = F.pad(x, flat_pad, mode=mode) if mode != "constant" else F.pad(x, flat_pad)
    else:
        xp = x
    ho = (xp.shape[2] - dl[0] * (ks[0] - 1) - 1) // st[0] + 1
    wo = (xp.shape[3] - dl[1] * (ks[1] - 1) - 1) // st[1] + 1
    ih = (torch.arange(ho) * st[0])[:, None] + (torch.arange(ks[0]) * dl[0])[None, :]
    iw = (torch.arange(wo) * st[1])[:, None] + (torch.arange(ks[1]) * dl[1])[None, :]
    p = xp[:, :, ih[:, None, :, None], iw[None, :, None, :]]  # (n, C, ho, wo, kh, kw)
    n, c = p.shape[:2]
    grp = module.groups
    p = p.reshape(n, grp, c // grp, ho * wo, ks[0] * ks[1]).permute(0, 1, 3, 2, 4)
    return p.reshape(n, grp, ho * wo, -1)


def layer_a_g(model: nn.Module, x: torch.Tensor, module: nn.Module, variant: str):
    """``ã (n, groups, T, cols)`` (inputs with the bias 1) and ``G_i = J_tᵀ H J_s`` pieces:
    returns ``([ã_γ (n, 1, T_γ, cols)], [J_γ (n, c, 1, T_γ, q)], H (n, c, c))`` per group γ
    (attention's query and key projections may have different numbers of positions)."""
    view = view_of(module)
    if isinstance(module, nn.MultiheadAttention):
        a_s, j_s, logits = attention_a_j(model, x, module)
        if view.bias:
            a_s = [torch.cat([a, torch.ones_like(a[..., :1])], dim=-1) for a in a_s]
        a_s, j_s = [a[:, None] for a in a_s], [j[:, :, None] for j in j_s]
        return a_s, j_s, ref.output_fisher(logits, variant)
    if type(module).__name__ == "NonDynamicallyQuantizableLinear":  # called functionally
        [(_, inp, jac)], logits = functional_io(model, x, module.weight)
    else:
        inp, jac, logits = layer_io(model, x, module)
    h = ref.output_fisher(logits, variant)
    n, c = jac.shape[:2]
    if isinstance(module, nn.Linear):
        a = inp.reshape(n, 1, -1, inp.shape[-1])
        j = jac.reshape(n, c, 1, -1, view.q)
    elif isinstance(module, nn.Embedding):
        a = F.one_hot(inp.reshape(n, -1), module.num_embeddings).to(jac.dtype)
        if module.padding_idx is not None:
            a[..., module.padding_idx] = 0  # autograd gives the padding row no gradient
        a = a.unsqueeze(1)
        j = jac.reshape(n, c, 1, -1, view.q)
    else:
        a = conv_patches(module, inp)
        j = jac.reshape(n, c, view.groups, view.q, -1).transpose(3, 4)
    if view.bias:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return list(a.split(1, dim=1)), list(j.split(1, dim=2)), h


def kfac_factors(
    model: nn.Module,
    loader,
    module: nn.Module,
    approx: str = "expand",
    variant: str = "classif_logits",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, G)`` from the documented definitions (engine/generator/kfac_factors.py):

    * expand: ``A = (1/n) Σ_{i,t} ã ãᵀ``, ``G = (1/n) Σ_i (1/T) Σ_t J_tᵀ H_i J_t``;
    * reduce: ``A = (1/n) Σ_i â âᵀ`` with ``â = mean_t ã``,
      ``G = (1/n) Σ_i (Σ_t J_t)ᵀ H_i (Σ_t J_t)``.

    ``Σ_k g gᵀ`` over the pseudo-outputs ``g_k = Jᵀ L[:, k]`` is ``Jᵀ L Lᵀ J = Jᵀ H J``, so the
    output Fisher ``H`` is used directly (no factor ``L``).
    """
    a_tot, g_tot, n = 0, 0, 0
    for batch in loader:
        a_s, j_s, h = layer_a_g(model, batch[0], module, variant)
        a_b, g_b = [], []
        for a, j in zip(a_s, j_s):
            t = a.shape[2]
            if approx == "reduce":
                a = a.mean(dim=2, keepdim=True)
                j = j.sum(dim=3, keepdim=True)
                t = 1
            a_b.append(torch.einsum("ngtp,ngtr->gpr", a, a))
            g_b.append(torch.einsum("ncgtq,ncd,ndgts->gqs", j, h, j) / t)
        a_tot = a_tot + torch.cat(a_b)
        g_tot = g_tot + torch.cat(g_b)
        n += batch[0].shape[0]
    return a_tot / n, g_tot / n


# ----- quasi-diagonal mask ---------------------------------------------------------------------


def quasidiag_mask(case: str) -> torch.Tensor:
    """Boolean ``(d, d)``: the diagonal, plus for Linear/Conv/normalisation layers on the hook path
    that have a bias, the pairs ``(W[o, ·], b[o])`` of each output unit ``o``."""
    model = built(case)[0]
    mods = modules(case)
    d = sum(e - s for s, e in offsets(case).values())
    mask = torch.eye(d, dtype=torch.bool)
    for name, (s, _) in offsets(case).items():
        m = mods[name]
        typ = type(m).__name__
        if not (
            on_hooks(case, name)
            and (is_kron(m) or typ in NORM_TYPES)
            and weight_and_bias(m)[1] is not None
        ):
            continue
        w = weight_and_bias(m)[0]
        out = w.shape[0]
        per = w.numel() // out
        for o in range(out):
            bi = s + w.numel() + o
            wi = s + o * per + torch.arange(per)
            mask[bi, wi] = True
            mask[wi, bi] = True
    del model
    return mask


class CountingLoader:
    """An iterable over a DataLoader that records how many batches were taken, and raises after
    ``limit`` batches (to prove that an error came before any computation)."""

    def __init__(self, loader, limit: int | None = None) -> None:
        self.loader, self.limit, self.taken = loader, limit, 0
        self.dataset = loader.dataset

    def __iter__(self):
        for batch in self.loader:
            if self.limit is not None and self.taken >= self.limit:
                raise AssertionError(f"the loader was iterated past {self.limit} batch(es)")
            self.taken += 1
            yield batch
