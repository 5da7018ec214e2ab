"""How each tool computes each quantity, as ``prepare(model, loader) -> Prepared`` factories.

Every recipe computes the same matrix as fimntk (``F = (1/n) Σ_i E_y[g gᵀ]``, exact expectation
unless the quantity ends in ``-mc``) and hands back a canonical tensor for the cross-check:

=============  ================================================================================
quantity       canonical tensor
=============  ================================================================================
dense          the ``(d, d)`` matrix
diag, diag-mc  its diagonal ``(d,)``
blockdiag      the per-layer blocks, flattened and concatenated in layer order
kfac, kfac-mc  ``M v_w`` restricted to the weights, ``v_w`` a fixed random vector with zero
               biases (so a peer keeping a separate bias block, BackPACK, compares exactly)
ekfac          ``M v`` for a fixed random ``v``
vTMv, mv       ``vᵀ M v`` and ``M v``
ntk            the Gram ``(c, n, c, n)``
=============  ================================================================================

``run()`` always starts from the model and the loader: building the representation (or the
operator) is part of the time; only the canonical tensor is computed outside the timing.
Peers are imported lazily, so a missing peer only turns its rows into ``n/a``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from bench._common import (
    NotAvailableError,
    Prepared,
    TensorLoader,
    random_vector,
    split_like,
    weight_mask,
)

Prepare = Callable[[nn.Module, TensorLoader], Prepared]

#: torch.func Jacobians are built on sub-batches of at most this many bytes.
JACOBIAN_CHUNK_BYTES = 512 * 2**20


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise NotAvailableError(f"{name.split('.')[0]} not installed: {err}") from err


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _layer_sizes(model: nn.Module) -> list[int]:
    """Parameter counts of the modules owning parameters, in order (the block layout)."""
    return [
        sum(p.numel() for p in m.parameters(recurse=False))
        for m in model.modules()
        if any(True for _ in m.parameters(recurse=False))
    ]


def _blocks_canon(blocks: list[Tensor]) -> Tensor:
    return torch.cat([b.reshape(-1) for b in blocks])


# ----- fimntk --------------------------------------------------------------------------------
def _engine():
    return importlib.import_module("fimntk.engine")


def _resolve(rep: str) -> None:
    engine = _engine()
    try:
        engine.resolve_representation(rep)
    except engine.InvalidInputError as err:
        raise NotAvailableError("not in engine") from err


def fimntk(quantity: str, mc: bool = False) -> Prepare:
    """``fimntk.engine.FIM`` (or ``FIM_MonteCarlo`` with one trial) in the matching
    representation."""
    rep = {
        "dense": "dense",
        "diag": "diag",
        "blockdiag": "blockdiag",
        "kfac": "kfac",
        "ekfac": "ekfac",
        "vTMv": "implicit",
        "mv": "implicit",
    }[quantity]

    def prepare(model: nn.Module, loader: TensorLoader) -> Prepared:
        engine = _engine()
        _resolve(rep)
        v = random_vector(model)
        mask = weight_mask(model)

        def pvec(flat: Tensor):
            lc = engine.LayerCollection.from_model(model)
            return engine.PVector(lc, flat.to(next(model.parameters())))

        def build():
            if mc:
                return engine.FIM_MonteCarlo(model, loader, rep, trials=1, seed=0)
            return engine.FIM(model, loader, rep)

        if quantity == "vTMv":
            vp = pvec(v)
            return Prepared(lambda: build().vTMv(vp), lambda r: r.reshape(1))
        if quantity == "mv":
            vp = pvec(v)
            return Prepared(lambda: build().mv(vp), lambda r: r.get_flat_representation())

        def run():
            mat = build()
            if rep == "ekfac":
                mat.update_diag(loader)
            return mat

        def canon(mat) -> Tensor:
            if quantity == "dense":
                return mat.to_torch()
            if quantity == "diag":
                return mat.get_diag()
            if quantity == "blockdiag":
                return _blocks_canon([mat.data[e.name] for e in mat.layer_collection])
            if quantity == "kfac":
                return mat.mv(pvec(v * mask)).get_flat_representation()[mask]
            return mat.mv(pvec(v)).get_flat_representation()  # ekfac

        return Prepared(run, canon)

    return prepare


def fimntk_ntk() -> Prepare:
    def prepare(model: nn.Module, loader: TensorLoader) -> Prepared:
        engine = _engine()
        return Prepared(lambda: engine.GramMatrix(model, loader), lambda g: g.to_torch())

    return prepare


# ----- NNGeometry ----------------------------------------------------------------------------
def nngeometry(quantity: str, mc: bool = False) -> Prepare:
    """NNGeometry 0.4's ``FIM`` / ``FIM_MonteCarlo`` with the matching ``PMat*`` class."""

    def prepare(model: nn.Module, loader: TensorLoader) -> Prepared:
        metrics = _import("nngeometry.metrics")
        obj = _import("nngeometry.object")
        rep = {
            "dense": obj.PMatDense,
            "diag": obj.PMatDiag,
            "blockdiag": obj.PMatBlockDiag,
            "kfac": obj.PMatKFAC,
            "ekfac": obj.PMatEKFAC,
            "vTMv": obj.PMatImplicit,
            "mv": obj.PMatImplicit,
        }[quantity]
        v = random_vector(model)
        mask = weight_mask(model)

        def build():
            if mc:
                return metrics.FIM_MonteCarlo(model, loader, rep, trials=1)
            return metrics.FIM(model, loader, rep, variant="classif_logits")

        def pvec(mat, flat: Tensor):
            return obj.PVector(mat.generator.layer_collection, vector_repr=flat)

        if quantity in ("vTMv", "mv"):

            def run_implicit():
                mat = build()
                out = mat.vTMv(pvec(mat, v)) if quantity == "vTMv" else mat.mv(pvec(mat, v))
                return out

            if quantity == "vTMv":
                return Prepared(run_implicit, lambda r: torch.as_tensor(r).reshape(1))
            return Prepared(run_implicit, lambda r: r.to_torch())

        def run():
            mat = build()
            if quantity == "ekfac":
                mat.update_diag(loader)
            return mat

        def canon(mat) -> Tensor:
            if quantity == "dense":
                return mat.to_torch()
            if quantity == "diag":
                return mat.get_diag()
            if quantity == "blockdiag":
                return _blocks_canon([mat.data[k] for k in mat.generator.layer_collection.layers])
            if quantity == "kfac":
                return mat.mv(pvec(mat, v * mask)).to_torch()[mask]
            return mat.mv(pvec(mat, v)).to_torch()

        return Prepared(run, canon)

    return prepare


def nngeometry_ntk() -> Prepare:
    def prepare(model: nn.Module, loader: TensorLoader) -> Prepared:
        gram = _import("nngeometry.gram")
        return Prepared(lambda: gram.GramMatrix(model, loader), lambda g: g.data)

    return prepare


# ----- BackPACK ------------------------------------------------------------------------------
def _backpack(model: nn.Module):
    bp = _import("backpack")
    ext = _import("backpack.extensions")
    model = bp.extend(model)
    loss = bp.extend(nn.CrossEntropyLoss(reduction="sum"))
    return bp, ext, model, loss


def _backpack_sqrt_ggn(bp, ext, model, lossf, loader) -> Iterator[Tensor]:
    """Per batch, BackPACK's exact GGN square root ``V`` as ``(C·N, d)`` (``F_b = VᵀV``)."""
    params = list(model.parameters())
    for x, y in loader:
        with bp.backpack(ext.SqrtGGNExact()):
            lossf(model(x), y).backward()
        v = torch.cat([p.sqrt_ggn_exact.flatten(start_dim=2) for p in params], dim=2)
        yield v.reshape(-1, v.shape[2])
        for p in params:
            del p.sqrt_ggn_exact
    model.zero_grad(set_to_none=True)


def backpack(quantity: str) -> Prepare:
    """BackPACK 1.7 (``reduction="sum"``, divided by n): ``DiagGGNExact``/``DiagGGNMC`` for the
    diagonal, ``SqrtGGNExact`` (``F = Σ_b V_bᵀ V_b``) for the dense and block-diagonal matrices."""

    def prepare(model: nn.Module, loader: TensorLoader) -> Prepared:
        bp, ext, model, lossf = _backpack(model)
        params = list(model.parameters())
        n = loader.n

        if quantity in ("diag", "diag-mc"):
            extension = ext.DiagGGNExact if quantity == "diag" else ext.DiagGGNMC
            attr = "diag_ggn_exact" if quantity == "diag" else "diag_ggn_mc"

            def run_diag():
                total = None
                for x, y in loader:
                    with bp.backpack(extension()):
                        lossf(model(x), y).backward()
                    d = torch.cat([getattr(p, attr).reshape(-1) for p in params])
                    total = d if total is None else total + d
                model.zero_grad(set_to_none=True)
                return total / n

            return Prepared(run_diag, lambda r: r)

        if quantity == "dense":

            def run_dense():
                total = None
                for v in _backpack_sqrt_ggn(bp, ext, model, lossf, loader):
                    total = v.t() @ v if total is None else total.addmm_(v.t(), v)
                return total / n

            return Prepared(run_dense, lambda r: r)

        if quantity == "blockdiag":
            sizes = _layer_sizes(model)

            def run_blocks():
                blocks: list[Tensor] = []
                for v in _backpack_sqrt_ggn(bp, ext, model, lossf, loader):
                    for i, vl in enumerate(v.split(sizes, dim=1)):
                        if len(blocks) <= i:
                            blocks.append(vl.t() @ vl)
                        else:
                            blocks[i].addmm_(vl.t(), vl)
                return [b / n for b in blocks]

            return Prepared(run_blocks, _blocks_canon)
        raise NotAvailableError(f"no BackPACK recipe for {quantity}")

    return prepare


def backpack_kfac(exact: bool) -> Prepare:
    """BackPACK's ``KFLR`` (exact expectation) or ``KFAC`` (one MC sample).

    BackPACK keeps the bias in its own block, so only the weights are compared. Its factors
    per batch (``reduction="sum"``) are ``A_b`` (mean over the batch) and ``G_b`` (sum over the
    batch); over the loader ``A = mean_b A_b`` and ``G = Σ_b G_b / n``. For a convolution its
    ``G`` is summed over the T output locations, i.e. T times KFC's: divided by T here.
    """

    def prepare(model: nn.Module, loader: TensorLoader) -> Prepared:
        bp, ext, model, lossf = _backpack(model)
        attr = "kflr" if exact else "kfac"
        extension = ext.KFLR if exact else ext.KFAC
        layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        v = random_vector(model)
        mask = weight_mask(model)
        n, n_batches = loader.n, len(loader)
        locations: dict[int, int] = {}

        def record(module, inputs, output):
            locations[id(module)] = output[0, 0].numel() if output.dim() > 2 else 1

        def run():
            hooks = [m.register_forward_hook(record) for m in layers]
            factors: list[list[Tensor]] = []
            try:
                for x, y in loader:
                    with bp.backpack(extension()):
                        lossf(model(x), y).backward()
                    for i, m in enumerate(layers):
                        g, a = getattr(m.weight, attr)
                        if len(factors) <= i:
                            factors.append([g.clone(), a.clone()])
                        else:
                            factors[i][0] += g
                            factors[i][1] += a
            finally:
                for h in hooks:
                    h.remove()
            model.zero_grad(set_to_none=True)
            return [
                (g / (n * locations[id(m)]), a / n_batches) for m, (g, a) in zip(layers, factors)
            ]

        def canon(factors) -> Tensor:
            vs = split_like(model, v * mask)
            weights = [p for name, p in model.named_parameters() if not name.endswith("bias")]
            out = []
            for (g, a), w in zip(factors, weights):
                vw = vs[next(i for i, p in enumerate(model.parameters()) if p is w)]
                vw = vw.reshape(vw.shape[0], -1)
                out.append((g @ vw @ a).reshape(-1))
            return torch.cat(out)

        return Prepared(run, canon)

    return prepare


def backpack_ntk() -> Prepare:
    """BackPACK ``BatchGrad``: per-example gradients of each output (c backward passes)."""

    def prepare(model: nn.Module, loader: TensorLoader) -> Prepared:
        bp, ext, model, _ = _backpack(model)
        params = list(model.parameters())

        def run():
            jacs = []
            for x, _ in loader:
                rows = []
                with bp.backpack(ext.BatchGrad(), retain_graph=True):
                    out = model(x)
                    for k in range(out.shape[1]):
                        out[:, k].sum().backward(retain_graph=k < out.shape[1] - 1)
                        rows.append(torch.cat([p.grad_batch.flatten(1) for p in params], dim=1))
                jacs.append(torch.stack(rows))  # (c, N, d)
            model.zero_grad(set_to_none=True)
            j = torch.cat(jacs, dim=1)
            return torch.einsum("knd,lmd->knlm", j, j)

        return Prepared(run, lambda g: g)

    return prepare


def backpack_implicit(quantity: str) -> Prepare:
    """BackPACK's Hessian-free products: ``R_op`` (Jv, double backward) for ``vᵀFv``;
    ``ggn_vector_product_from_plist`` for ``Fv`` (``reduction="sum"``, divided by n)."""

    def prepare(model: nn.Module, loader: TensorLoader) -> Prepared:
        hf = _import("backpack.hessianfree.ggnvp")
        rop = _import("backpack.hessianfree.rop")
        params = list(model.parameters())
        v = random_vector(model)
        vs = split_like(model, v)
        lossf = nn.CrossEntropyLoss(reduction="sum")
        n = loader.n

        def run_vtmv():
            total = 0.0
            for x, _ in loader:
                out = model(x)
                jv = rop.R_op(out, params, vs)[0]
                p = torch.softmax(out.detach(), dim=1)
                total += (p * jv * jv).sum() - ((p * jv).sum(dim=1) ** 2).sum()
            return total / n

        def run_mv():
            total = None
            for x, y in loader:
                out = model(x)
                g = hf.ggn_vector_product_from_plist(lossf(out, y), out, params, vs)
                flat = torch.cat([t.reshape(-1) for t in g])
                total = flat if total is None else total + flat
            return total / n

        if quantity == "vTMv":
            return Prepared(run_vtmv, lambda r: torch.as_tensor(r).reshape(1))
        return Prepared(run_mv, lambda r: r)

    return prepare


# ----- torch.func ----------------------------------------------------------------------------
def _single(model: nn.Module):
    def f(params: dict, x: Tensor) -> Tensor:
        return functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

    return f


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.detach() for k, p in model.named_parameters()}


def func_jacobians(model: nn.Module, loader: TensorLoader) -> Iterator[tuple[Tensor, Tensor]]:
    """``vmap(jacrev(f))`` Jacobians ``(m, c, d)`` and logits ``(m, c)``, on sub-batches whose
    Jacobian fits :data:`JACOBIAN_CHUNK_BYTES`."""
    params = _params(model)
    jac_fn = vmap(jacrev(_single(model)), (None, 0))
    d = _n_params(model)
    for x, _ in loader:
        with torch.no_grad():
            logits = model(x)
        c = logits.shape[1]
        step = max(1, JACOBIAN_CHUNK_BYTES // (c * d * x.element_size()))
        for s in range(0, x.shape[0], step):
            jac = jac_fn(params, x[s : s + step])
            yield (
                torch.cat([j.flatten(start_dim=2) for j in jac.values()], dim=2),
                logits[s : s + step],
            )


def fisher_rows(jac: Tensor, logits: Tensor) -> Tensor:
    """``Lᵀ J`` with ``L Lᵀ = diag(p) − p pᵀ`` (``L = diag(√p) − p √pᵀ``): ``(m·c, d)``."""
    p = torch.softmax(logits, dim=1)
    eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
    lt = p.sqrt()[:, :, None] * (eye[None] - p[:, None, :])  # [i, k, j] = √p_k (δ_kj − p_j)
    return torch.bmm(lt, jac).reshape(-1, jac.shape[2])


def func(quantity: str) -> Prepare:
    """torch.func: per-example Jacobians by ``vmap(jacrev)``, then ``F = (1/n) Σ Jᵀ H J``."""

    def prepare(model: nn.Module, loader: TensorLoader) -> Prepared:
        n = loader.n
        sizes = _layer_sizes(model)

        def run():
            total = None
            for jac, logits in func_jacobians(model, loader):
                rows = fisher_rows(jac, logits)
                del jac
                if quantity == "dense":
                    total = rows.t() @ rows if total is None else total.addmm_(rows.t(), rows)
                elif quantity == "diag":
                    d = (rows * rows).sum(dim=0)
                    total = d if total is None else total + d
                else:  # blockdiag
                    parts = rows.split(sizes, dim=1)
                    if total is None:
                        total = [r.t() @ r for r in parts]
                    else:
                        for b, r in zip(total, parts):
                            b.addmm_(r.t(), r)
            return [b / n for b in total] if quantity == "blockdiag" else total / n

        canon = _blocks_canon if quantity == "blockdiag" else (lambda r: r)
        return Prepared(run, canon)

    return prepare


def func_ntk() -> Prepare:
    """The torch.func NTK tutorial's "Jacobian contraction": ``vmap(jacrev)`` Jacobians, then
    ``einsum('Naf,Mbf->NMab')`` per parameter, summed (the Jacobian is reused for x2 = x1)."""

    def prepare(model: nn.Module, loader: TensorLoader) -> Prepared:
        params = _params(model)
        f = _single(model)
        x = torch.cat([b[0] for b in loader])

        def run():
            jac = vmap(jacrev(f), (None, 0))(params, x)
            jac = [j.flatten(2) for j in jac.values()]
            out = torch.stack([torch.einsum("Naf,Mbf->NMab", j1, j1) for j1 in jac]).sum(0)
            return out

        return Prepared(run, lambda k: k.permute(2, 0, 3, 1))

    return prepare


def func_implicit(quantity: str) -> Prepare:
    """torch.func matrix-free products: ``jvp`` gives ``Jv``; ``vᵀFv = Σ (Jv)ᵀ H (Jv) / n``;
    ``Fv = vjp(H Jv) / n``."""

    def prepare(model: nn.Module, loader: TensorLoader) -> Prepared:
        params = _params(model)
        v = random_vector(model)
        tangents = dict(zip(params, split_like(model, v)))
        n = loader.n

        def batch_fn(x):
            return lambda p: functional_call(model, p, (x,))

        def run_vtmv():
            total = 0.0
            for x, _ in loader:
                out, jv = jvp(batch_fn(x), (params,), (tangents,))
                p = torch.softmax(out, dim=1)
                total += (p * jv * jv).sum() - ((p * jv).sum(dim=1) ** 2).sum()
            return total / n

        def run_mv():
            total = None
            for x, _ in loader:
                _, jv = jvp(batch_fn(x), (params,), (tangents,))
                out, pullback = vjp(batch_fn(x), params)
                p = torch.softmax(out, dim=1)
                hjv = p * jv - p * (p * jv).sum(dim=1, keepdim=True)
                g = pullback(hjv)[0]
                flat = torch.cat([g[k].reshape(-1) for k in params])
                total = flat if total is None else total + flat
            return total / n

        if quantity == "vTMv":
            return Prepared(run_vtmv, lambda r: torch.as_tensor(r).reshape(1))
        return Prepared(run_mv, lambda r: r)

    return prepare


# ----- curvlinops ----------------------------------------------------------------------------
def curvlinops(quantity: str, mc: bool = False) -> Prepare:
    """curvlinops 3.0 operators, ``CrossEntropyLoss(reduction="mean")`` (so 1/n), no
    determinism probe, ``num_data`` given (no extra pass). KFAC/EKFAC: ``fisher_type="type-2"``
    (``"mc"`` with one sample for ``kfac-mc``), ``separate_weight_and_bias=False``; the factors
    (and EKFAC's eigenvalue correction) are computed inside the timing. ``mv``/``vTMv``:
    ``GGNLinearOperator`` (the GGN of the cross-entropy is the Fisher)."""

    def prepare(model: nn.Module, loader: TensorLoader) -> Prepared:
        cl = _import("curvlinops")
        params = list(model.parameters())
        v = random_vector(model).to(params[0])
        mask = weight_mask(model)
        lossf = nn.CrossEntropyLoss(reduction="mean")
        common = {"check_deterministic": False, "num_data": loader.n}

        if quantity in ("mv", "vTMv"):

            def run_ggn():
                op = cl.GGNLinearOperator(model, lossf, params, loader, **common)
                mv = op @ v
                return v @ mv if quantity == "vTMv" else mv

            return Prepared(run_ggn, lambda r: r.reshape(-1))

        cls = cl.EKFACLinearOperator if quantity == "ekfac" else cl.KFACLinearOperator
        kwargs = {
            "fisher_type": "mc" if mc else "type-2",
            "separate_weight_and_bias": False,
            "num_per_example_loss_terms": 1,
            **common,
        }

        def run():
            op = cls(model, lossf, params, loader, **kwargs)
            op.compute_kronecker_factors()
            if quantity == "ekfac":
                op.compute_eigenvalue_correction()
            return op

        def canon(op) -> Tensor:
            if quantity == "ekfac":
                return op @ v
            return (op @ (v * mask))[mask]

        return Prepared(run, canon)

    return prepare
