"""``PMatImplicit``: the Fisher as an operator, never stored.

Every operation is a pass over the loader:

* ``vTMv(v) = (1/n) Σ_i ‖L_iᵀ J_i v‖²`` with one Jacobian-vector product per batch
  (forward mode, :mod:`fimntk.engine.generator.tangents`): the cost does not grow with the number of
  outputs. A model with an operation that has no forward-mode formula takes ``J v`` as the VJP
  of a VJP (two backward passes), and one whose backward is not differentiable either (e.g.
  ``nn.EmbeddingBag``) takes it from per-example gradients (c backward passes);
* ``mv(v) = (1/n) Σ_i J_iᵀ H_i (J_i v)``: one forward pass carrying the tangent, one backward;
* ``trace()`` and ``get_diag()`` exactly, from per-example gradients (never ``d × d``);
* ``solve(v, λ)`` by (preconditioned) conjugate gradients on ``F + λI`` (Hestenes & Stiefel
  1952); any representation with ``solve`` (e.g. KFAC, diagonal) preconditions;
* ``norm()`` through the ``(K·n) × (K·n)`` Gram, ``‖F‖_F = ‖J Jᵀ‖_F / n``, when it fits.

Monte Carlo pseudo-outputs are replayed identically on every pass (the sampler's state is
restored), so repeated operations see the same matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sized
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from fimntk.engine.errors import InvalidInputError, UnsupportedOperationError
from fimntk.engine.generator.batch_jacobian import check_finite, weighted_grad
from fimntk.engine.generator.jacobian import Jacobian
from fimntk.engine.generator.tangents import TangentCapture
from fimntk.engine.pspace.base import PMatAbstract, solves_maps
from fimntk.engine.vector import PVector

#: A batch whose largest activation takes more bytes runs in slices of examples on a CPU
#: (:meth:`Jacobian.slices`). A forward-mode pass holds two tensors per layer for a moment,
#: and below 8 MiB the allocator keeps up: bench's ResNet (W5, 4 MiB a batch) ran vᵀFv 15%
#: faster unsplit than in two slices, its CNN (W3, 12.8 MiB) 1.3-1.6x faster in slices. The
#: diagonal's backward passes hold many more tensors and are sliced from any size.
FORWARD_SLICES_ABOVE = 8 << 20

#: Largest dense object (elements) that ``norm``/``to_torch`` will build.
MAX_DENSE_ELEMENTS = 1 << 28


def _jv_by_double_backward(
    f: Callable[[dict[str, Tensor]], Tensor], primals: dict[str, Tensor], tangent: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """``J v`` as the VJP of a VJP, for layers without forward-mode AD (e.g. fused attention,
    run here with the differentiable-twice math kernel)."""
    params = {k: p.detach().requires_grad_(True) for k, p in primals.items()}
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        out = f(params)
        u = torch.zeros_like(out, requires_grad=True)
        # scalars differentiated, no grad_outputs: torch checks those with its symbolic
        # shapes, whose first use imports sympy (about a second)
        grads = torch.autograd.grad(
            (out * u).sum(), list(params.values()), create_graph=True, allow_unused=True
        )
        pairs = [(g, tangent[k]) for g, k in zip(grads, params) if g is not None]
        inner = torch.stack([(g * t).sum() for g, t in pairs]).sum()
        jv = torch.autograd.grad(inner, u)[0]
    return out.detach(), jv


class PMatImplicit(PMatAbstract):
    """Matrix-free Fisher; ``data`` holds only a scale factor (for scalar multiplication)."""

    name = "implicit"
    #: ``J v`` from per-example gradients (:meth:`_jv_by_per_example_grads`), once needed.
    _per_example_jv = False
    _raw_jacobian: Jacobian | None = None

    def _compute(self, generator: Jacobian, examples: Iterable) -> dict[str, Tensor]:
        generator.refuse_centering("the implicit representation")
        self.examples = examples
        sampler = getattr(generator.pseudo_outputs, "generator", None)
        self._sampler_state = sampler.get_state() if sampler is not None else None
        dataset = getattr(examples, "dataset", None)
        self.n_examples = len(dataset) if isinstance(dataset, Sized) else None
        return {"scale": torch.ones((), dtype=generator.dtype)}

    @property
    def n_pseudo(self) -> int:
        """Pseudo-outputs per example (K), read off the first batch."""
        self._replay()
        return self.generator.probe(self.examples)[1]

    def __getstate__(self) -> dict[str, Any]:
        """Refused: an implicit matrix holds no values, only its generator and examples."""
        raise UnsupportedOperationError(
            "an implicit matrix stores nothing to pickle: pickle a computed representation "
            "(dense, diag, kfac, ...) instead"
        )

    def _new(self, data: Any) -> PMatImplicit:
        out = PMatImplicit.__new__(PMatImplicit)
        out.__dict__.update(self.__dict__)
        out.data = data
        return out

    @property
    def _scale(self) -> float:
        return float(self.data["scale"])

    def _replay(self) -> None:
        sampler = getattr(self.generator.pseudo_outputs, "generator", None)
        if self._sampler_state is not None and sampler is not None:
            sampler.set_state(self._sampler_state)

    def _batches(self):
        """Yield the prepared batches, replaying Monte Carlo draws from the start; the
        generator's ``progress`` hears of each batch done (a caller may stop there).

        On a CPU a batch comes in slices of examples (:meth:`Jacobian.slices`): every product
        is a sum over examples, and small slices spare the allocator's fresh pages. Monte Carlo
        draws are never sliced, so that they stay those of the whole batch."""
        self._replay()
        gen = self.generator
        for done, raw in enumerate(self.examples, start=1):
            yield from gen.slices(gen.prepare(raw), FORWARD_SLICES_ABOVE)
            if gen.progress is not None:
                gen.progress(done, None, "implicit product")

    def _jv(self, batch: tuple, tangent: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Outputs ``(n, c)`` and ``J v`` ``(n, c)`` by forward-mode AD.

        The hooked layers add their parameters' share through :class:`TangentCapture`; the
        other layers' parameters are made dual. Under ``torch.enable_grad`` the outputs keep
        their graph to the parameters (for a following backward pass); ``J v`` never does.
        """
        gen = self.generator
        gen.settle_paths(batch)
        if self._per_example_jv:  # an earlier batch needed it: skip the routes that failed there
            jv = self._jv_by_per_example_grads(batch, tangent)
            return self._checked(gen.function(*batch), jv)
        named = dict(gen.model.named_parameters(remove_duplicate=False))
        try:
            while True:
                hooked = {
                    nm: m
                    for nm, m in gen.hooked_modules().items()
                    if gen.kernel(nm).forward_by_parameters
                }
                per_layer = {
                    nm: {
                        attr: tangent[pn]
                        for (attr, _), pn in zip(
                            self.layer_collection[nm].params,
                            self.layer_collection[nm].param_names(),
                        )
                    }
                    for nm in hooked
                }
                dual = [
                    pn
                    for e in self.layer_collection
                    if e.name not in hooked
                    for pn in e.param_names()
                ]
                linear = {nm for nm in hooked if gen.kernel(nm).input_linear}
                maps = {
                    nm: k.input_tangent
                    for nm, k in ((nm, gen.kernel(nm)) for nm in hooked)
                    if hasattr(k, "input_tangent")
                }
                fused = {
                    nm: k.output_tangent
                    for nm, k in ((nm, gen.kernel(nm)) for nm in hooked)
                    if hasattr(k, "output_tangent")
                }
                capture = TangentCapture(
                    hooked,
                    per_layer,
                    linear,
                    input_maps=maps,
                    counted=gen.layer_modules,
                    output_tangents=fused,
                )
                with fwad.dual_level(), capture:
                    if dual:
                        swap = {pn: fwad.make_dual(named[pn], tangent[pn]) for pn in dual}
                        out = gen.call_with(swap, batch)
                    else:
                        out = gen.function(*batch)
                    out, jv = fwad.unpack_dual(out)
                demote = {nm for nm in hooked if capture.calls.get(nm, 0) != 1}
                if not demote:
                    break
                # called twice or never: forward mode through its params
                gen.move_to_fallback(demote)
        except (NotImplementedError, RuntimeError, ValueError, TypeError, IndexError) as err:
            primals = {k: named[k].detach() for k in tangent}

            def f(p):
                return gen.call_with(p, batch)

            try:
                out, jv = _jv_by_double_backward(f, primals, tangent)
            except (NotImplementedError, RuntimeError, ValueError, TypeError, IndexError):
                gen.check_forward(batch)  # bad input: the generator's forward names the fix
                try:
                    jv = self._jv_by_per_example_grads(batch, tangent)
                except (NotImplementedError, RuntimeError, ValueError, TypeError, IndexError):
                    raise err from None
                self._per_example_jv = True
                out = None
            if out is None or torch.is_grad_enabled():
                out = gen.function(*batch)
        return self._checked(out, jv)

    def _checked(self, out: Tensor, jv: Tensor | None) -> tuple[Tensor, Tensor]:
        """The validated outputs ``(n, c)`` and finite ``J v`` ``(n, c)`` (zero when ``None``:
        no parameter reached the outputs)."""
        if jv is None:
            jv = torch.zeros_like(out)
        return self.generator.check_outputs(out), check_finite(
            jv.detach().reshape(out.shape[0], -1), "Jacobian-vector product"
        )

    def _jv_by_per_example_grads(self, batch: tuple, tangent: dict[str, Tensor]) -> Tensor:
        """``J v`` ``(n, c)`` as ``(J_i)_k · v`` from per-example gradients, ``c`` outputs at a
        time in the generator's memory-bounded chunks: the last resort for an operation with
        neither forward-mode AD nor a differentiable backward (e.g. ``nn.EmbeddingBag``), at
        the cost of ``c`` backward passes per batch."""
        gen = self.generator
        if self._raw_jacobian is None:  # pseudo-outputs = the outputs themselves
            self._raw_jacobian = Jacobian(
                gen.model, self.layer_collection, function=gen.function, device=gen.device
            )
        raw = self._raw_jacobian
        flat = {
            e.name: torch.cat([tangent[pn].reshape(-1) for pn in e.param_names()])
            for e in self.layer_collection
        }
        parts: list[Tensor] = []
        with torch.enable_grad():
            for bj in raw.run_batch(batch):
                part: Tensor | None = None
                for e in self.layer_collection:
                    g = bj.layer_grads(e.name).detach()  # (K, n, d_l)
                    term = g @ flat[e.name].to(g.dtype)
                    part = term if part is None else part.add_(term)
                assert part is not None, "an empty layer collection is refused when built"
                parts.append(part)
        return torch.cat(parts, dim=0).t()

    def _tangent(self, v: PVector) -> dict[str, Tensor]:
        """The direction per parameter; an Embedding's ``padding_idx`` row gets no tangent, as
        autograd gives it no gradient."""
        self._check_vector(v)
        modules = self.layer_collection.modules(self.generator.model)
        x = v.get_flat_representation()
        out, start = {}, 0
        for e in self.layer_collection:
            module = modules[e.name]
            for attr, name in zip([a for a, _ in e.params], e.param_names()):
                p = getattr(module, attr)
                t = x[start : start + p.numel()].reshape(p.shape).to(p.dtype)
                pad = getattr(module, "padding_idx", None)
                if isinstance(module, torch.nn.Embedding) and pad is not None:
                    t = t.clone()
                    t[pad] = 0
                out[name] = t
                start += p.numel()
        return out

    def vTMv(self, v: PVector) -> Tensor:
        tangent = self._tangent(v)
        total: Tensor | None = None
        n = 0
        with torch.no_grad():
            for batch in self._batches():
                out, jv = self._jv(batch, tangent)
                w = self.generator.pseudo_outputs(out, batch)
                proj = torch.einsum("knc,nc->kn", w, jv)
                sq = (proj * proj).sum()
                total = sq if total is None else total + sq
                n += out.shape[0]
        if total is None:
            raise InvalidInputError("the loader yielded no examples: give it a non-empty dataset")
        return check_finite(total / n * self._scale, "vTMv")

    def mv(self, v: PVector) -> PVector:
        """``(1/n) Σ_i J_iᵀ H_i (J_i v)``: per batch, one forward pass carrying both the outputs'
        graph and the tangent ``J v``, then one backward pass."""
        tangent = self._tangent(v)
        gen = self.generator
        params = self.layer_collection.parameters(gen.model)
        total: Tensor | None = None
        views: tuple[Tensor, ...] = ()
        n = 0
        for batch in self._batches():
            with torch.enable_grad():
                out, jv = self._jv(batch, tangent)
            w = gen.pseudo_outputs(out.detach(), batch)
            u = torch.einsum("knc,kn->nc", w, torch.einsum("knc,nc->kn", w, jv))
            grads = weighted_grad(out, params, u)
            if total is None:
                total = torch.zeros(
                    sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device
                )
                views = total.split([p.numel() for p in params])
            for g, view in zip(grads, views):
                if g is not None:
                    view.add_(g.reshape(-1))
            del grads
            n += out.shape[0]
        if total is None:
            raise InvalidInputError("the loader yielded no examples: give it a non-empty dataset")
        total.div_(n).mul_(self._scale)
        return PVector(self.layer_collection, check_finite(total, "product F v"))

    def push_forward(self, v: PVector) -> Tensor:
        """``J v``: ``(K, n)``, entry ``(k, i)`` the derivative of pseudo-output k of example i
        along ``v`` (one forward-mode pass per batch; not scaled, not divided by n)."""
        tangent = self._tangent(v)
        parts: list[Tensor] = []
        with torch.no_grad():
            for batch in self._batches():
                out, jv = self._jv(batch, tangent)
                w = self.generator.pseudo_outputs(out, batch)
                parts.append(torch.einsum("knc,nc->kn", w, jv))
        if not parts:
            raise InvalidInputError("the loader yielded no examples: give it a non-empty dataset")
        return torch.cat(parts, dim=1)

    def pull_back(self, u: Tensor) -> PVector:
        """``Jᵀ u = Σ_{k,i} u_{k,i} g_{k,i}`` for ``u`` of shape ``(K, n)`` in the loader's
        order (one backward pass per batch; not scaled, not divided by n)."""
        gen = self.generator
        params = self.layer_collection.parameters(gen.model)
        total = torch.zeros(
            sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device
        )
        views = total.split([p.numel() for p in params])
        start = 0
        for batch in self._batches():
            with torch.enable_grad():
                out = gen.check_outputs(gen.function(*batch))
            w = gen.pseudo_outputs(out.detach(), batch)
            k, n = w.shape[0], out.shape[0]
            if u.dim() != 2 or u.shape[0] != k or u.shape[1] < start + n:
                raise InvalidInputError(
                    f"u must have shape (K, n) = ({k}, number of examples); got {tuple(u.shape)}"
                )
            ub = u[:, start : start + n].to(device=out.device, dtype=out.dtype)
            grads = weighted_grad(out, params, torch.einsum("knc,kn->nc", w, ub))
            for g, view in zip(grads, views):
                if g is not None:
                    view.add_(g.reshape(-1))
            start += n
        if start != u.shape[1]:
            raise InvalidInputError(
                f"u has {u.shape[1]} columns but the loader yielded {start} examples: give one "
                "column per example"
            )
        return PVector(self.layer_collection, check_finite(total, "product Jᵀ u"))

    def get_diag(self) -> Tensor:
        self._replay()
        return self.generator.get_covariance_diag(self.examples) * self._scale

    def trace(self) -> Tensor:
        return self.get_diag().sum()

    def _frobenius_norm(self) -> Tensor:
        gen = self.generator
        approx = ((self.n_examples or 0) * self.n_pseudo) ** 2
        if approx > MAX_DENSE_ELEMENTS:
            raise UnsupportedOperationError(
                f"the Frobenius norm of an implicit Fisher needs the (K·n)² Gram of about "
                f"{approx:.3g} entries ({approx * 4 / 2**30:.3g} GiB in float32): use fewer "
                "examples, a structured representation, or estimators.hutchinson_trace on F²"
            )
        self._replay()
        gram = gen.get_gram_matrix(self.examples)
        kn = gram.shape[0] * gram.shape[1]
        return (
            torch.linalg.vector_norm(gram.reshape(kn, kn).double())
            / gen.n_examples
            * abs(self._scale)
        ).to(gen.dtype)

    def to_torch(self) -> Tensor:
        d = self.layer_collection.numel()
        if d * d > MAX_DENSE_ELEMENTS:
            raise UnsupportedOperationError(
                f"the dense matrix has d² = {d * d:.3g} entries ({d * d * 4 / 2**30:.3g} GiB in "
                "float32): use mv/vTMv/solve, or a structured representation"
            )
        self._replay()
        return self.generator.get_covariance_matrix(self.examples) * self._scale

    @solves_maps
    def solve(
        self,
        v: PVector,
        regul: float = 1e-8,
        preconditioner: PMatAbstract | None = None,
        tol: float = 1e-6,
        max_iter: int = 100,
        x0: PVector | None = None,
        M: PMatAbstract | None = None,
        rtol: float | None = None,
    ) -> PVector:
        """``(F + λI)⁻¹ v`` by conjugate gradients; ``preconditioner.solve(r, λ)`` if given
        (``M=`` and ``rtol=`` are scipy's and NNGeometry's names for ``preconditioner=`` and
        ``tol=``).

        Starts from ``x0`` (a warm start, e.g. the previous step's solution; zero when
        omitted) and stops when ``‖r‖ ≤ tol·‖v‖`` or after ``max_iter`` iterations (one pass
        each); :attr:`last_solve_info` records iterations and the final relative residual.
        """
        self._check_vector(v)
        regul = self._check_regul(regul)
        if rtol is not None:
            tol = rtol
        if M is not None:
            if preconditioner is not None:
                raise InvalidInputError("give the preconditioner once: preconditioner= or M=")
            preconditioner = M
        b = v.get_flat_representation()
        if x0 is not None:
            self._check_vector(x0)

        def op(x: Tensor) -> Tensor:
            return self.mv(PVector(self.layer_collection, x)).get_flat_representation() + regul * x

        def prec(r: Tensor) -> Tensor:
            if preconditioner is None:
                return r
            return preconditioner.solve(
                PVector(self.layer_collection, r), regul
            ).get_flat_representation()

        x = torch.zeros_like(b) if x0 is None else x0.get_flat_representation().clone()
        r = b.clone() if x0 is None else b - op(x)
        z = prec(r)
        p = z.clone()
        rz = torch.dot(r, z)
        bnorm = torch.linalg.vector_norm(b).item() or 1.0
        it, rel = 0, torch.linalg.vector_norm(r).item() / bnorm
        while it < max_iter and rel > tol:
            ap = op(p)
            pap = torch.dot(p, ap)
            if pap <= 0:
                raise InvalidInputError(
                    "conjugate gradients met a direction of zero curvature: use a positive regul"
                )
            alpha = rz / pap
            x = x + alpha * p
            r = r - alpha * ap
            it += 1
            rel = torch.linalg.vector_norm(r).item() / bnorm
            if rel <= tol:
                break
            z = prec(r)
            rz_new = torch.dot(r, z)
            p = z + (rz_new / rz) * p
            rz = rz_new
        self.last_solve_info = {"iterations": it, "relative_residual": rel}
        return PVector(self.layer_collection, x)

    def inv(self, regul: float = 1e-8) -> PMatAbstract:
        raise UnsupportedOperationError(
            "an implicit matrix has no stored inverse: use solve(v, regul), optionally with a "
            "KFAC preconditioner"
        )

    def __add__(self, other: PMatAbstract) -> PMatAbstract:
        raise UnsupportedOperationError(
            "implicit matrices cannot be added: compute both in a stored representation"
        )

    __sub__ = __add__

    def __mul__(self, x: float) -> PMatImplicit:
        if isinstance(x, Tensor) and x.dim() == 0:
            x = x.item()
        if not isinstance(x, (int, float)) or math.isnan(x):
            return NotImplemented
        return self._new({"scale": self.data["scale"] * x})

    __rmul__ = __mul__
