"""The Jacobian generator: per-example gradients of pseudo-outputs, a batch at a time.

For each batch the generator runs one forward pass with hooks on the fast-path modules, forms the
pseudo-output weights ``(K, n, c)`` (see :mod:`fimntk.engine.generator.outputs`) and runs one
backward pass per pseudo-output to the captured module outputs, yielded in memory-bounded chunks.
Kernels then turn ``(input, output gradient)`` into per-layer quantities. Layers without a kernel —
custom modules, attention's ``in_proj_weight``, a module used twice in one forward, tied weights,
parameters used outside their module's own forward — take the ``torch.func`` path: per-example
Jacobians via ``vmap(jacrev(functional_call))``, or ``jacrev`` example by example where ``vmap``
cannot run the layer (recurrent layers, PReLU). :attr:`Jacobian.paths` says which path each layer
took.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.func import functional_call, jacrev, vmap

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.generator.hooks import ForwardCapture
from fimntk.engine.generator.outputs import Identity, PseudoOutputs
from fimntk.engine.layercollection import LayerCollection
from fimntk.engine.layers import LayerKernel, kernel_for
from fimntk.engine.layers.norm import BatchNormKernel
from fimntk.engine.linalg import add_lower_gram, symmetrize_lower

HOOKS = "hooks"
FALLBACK = "torch.func"

Progress = Callable[[int, "int | None", str], None]

#: Output-gradient bytes per chunk of pseudo-outputs (see :meth:`Jacobian._run_batch`).
K_CHUNK_BYTES = 1 << 18

#: Verification outcomes: ``{model: {key: (layers that passed, layers moved to torch.func)}}``.
_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _FunctionModule(nn.Module):
    """Wraps ``function`` so ``functional_call`` can swap the parameters of ``model``."""

    def __init__(self, model: nn.Module, function: Callable) -> None:
        super().__init__()
        self.model = model
        self._function = function

    def forward(self, *args):
        return self._function(*args)


def default_function(model: nn.Module) -> Callable:
    """The model applied to the first element of each batch."""
    return lambda *batch: model(batch[0])


#: Examples of the first batch that :meth:`Jacobian.settle_paths` runs.
_SETTLE_EXAMPLES = 4


def _head(batch: tuple, m: int) -> tuple:
    """The first ``m`` examples of a batch whose tensors all share their first dimension."""
    sizes = {t.shape[0] for t in batch if isinstance(t, Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        return batch
    return tuple(t[:m] if isinstance(t, Tensor) and t.dim() > 0 else t for t in batch)


def weighted_grad(
    out: Tensor, inputs: list[Tensor | GradientEdge], weight: Tensor, retain_graph: bool = False
) -> tuple:
    """``∂⟨w, out⟩/∂inputs`` (a vector-Jacobian product), ``None`` for an unused input.

    Differentiates the scalar ``Σ w ⊙ out`` rather than passing ``grad_outputs``: torch checks a
    given output gradient with its symbolic-shape machinery, whose first use imports sympy
    (seconds, and tens of MB of resident memory) — a cost no FIM should pay.
    """
    return torch.autograd.grad(
        (out * weight).sum(), inputs, retain_graph=retain_graph, allow_unused=True
    )


def check_finite(t: Tensor, what: str) -> Tensor:
    """Raise instead of returning a NaN/inf result (e.g. saturated units fed an infinite input).

    The sum is finite when every entry is (no ``(numel,)`` mask is allocated); only a non-finite
    sum, which overflow of finite entries can also give, is checked entry by entry."""
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise InvalidInputError(
            f"the {what} is non-finite (NaN or inf) although the outputs were finite: check "
            "the inputs (e.g. inf fed to a saturating unit) and the scale of the weights"
        )
    return t


class BatchJacobian:
    """What one batch contributes: per-layer inputs/output gradients or fallback Jacobians.

    Attributes:
        n: examples in the batch.
        k: pseudo-outputs per example in this chunk.
        first: whether this is the batch's first chunk of pseudo-outputs (statistics of the
            inputs alone, e.g. KFAC's ``A``, are added only then).
        last: whether this is the batch's last chunk (see :meth:`batch_sum`).
        cache: shared by the chunks of one batch (folded inputs, sums over chunks).
    """

    def __init__(
        self,
        n: int,
        k: int,
        kernels: dict[str, LayerKernel],
        captured: dict[str, tuple[Tensor, Tensor]],
        fallback: dict[str, Tensor],
        layer_collection: LayerCollection,
        dtype: torch.dtype,
        device: torch.device,
        first: bool = True,
        last: bool = True,
        cache: dict | None = None,
    ) -> None:
        self.n, self.k = n, k
        self.first, self.last = first, last
        self.cache = {} if cache is None else cache
        self.kernels, self.captured, self.fallback = kernels, captured, fallback
        self.layer_collection = layer_collection
        self.dtype, self.device = dtype, device

    def batch_sum(self, key: object, part: Tensor) -> Tensor | None:
        """Sum ``part`` over the chunks of this batch: ``None`` before the last chunk, then the
        batch's total. Lets a statistic that multiplies a sum over pseudo-outputs by a costly
        input-side term (e.g. ``Σ_i (Σ_k g²)(a²)ᵀ``) pay for that term once per batch. ``part``
        must be the caller's own fresh tensor: the first chunk's becomes the running sum, added
        to in place."""
        total = self.cache.pop(key, None)
        total = part if total is None else total.add_(part)
        if self.last:
            return total
        self.cache[key] = total
        return None

    def release(self) -> None:
        """Drop the captured tensors (the generator calls this once a split chunk is consumed)."""
        self.captured, self.fallback = {}, {}

    def layer_grads(self, name: str) -> Tensor:
        """Per-example gradients of layer ``name``: ``(K, n, d_l)``.

        (K here and below: the pseudo-outputs of this chunk.)"""
        if name in self.fallback:
            return self.fallback[name]
        if name in self.captured:
            x, gy = self.captured[name]
            return self.kernels[name].per_example_grads(x, gy)
        return torch.zeros(
            self.k, self.n, self.layer_collection[name].numel, dtype=self.dtype, device=self.device
        )

    def grads(self) -> Tensor:
        """Per-example gradients of all layers, flat order: ``(K, n, d)``."""
        return torch.cat([self.layer_grads(e.name) for e in self.layer_collection], dim=2)

    def add_layer_sq_sum(self, name: str, out: Tensor) -> None:
        """Add ``Σ_{k,i} g_{k,i}²`` of layer ``name`` to ``out (d_l,)`` in place; for a layer
        with one position per example, the whole batch's sum at its last chunk and nothing
        before (see :meth:`batch_sum`)."""
        if name in self.captured:
            x, gy = self.captured[name]
            kernel = self.kernels[name]
            part = kernel.sq_output_sum(x, gy)
            if part is None:
                out.add_(kernel.sq_grad_sum(x, gy))
                return
            total = self.batch_sum(("sq_output_sum", name), part)
            if total is not None:
                kernel.add_sq_grad_from_output_sum(x, total, out)
            return
        g = self.layer_grads(name)
        out.add_((g * g).sum(dim=(0, 1)))

    def add_layer_gram(self, name: str, other: BatchJacobian, out: Tensor) -> None:
        """Add ``⟨g_{k,i}, g'_{l,j}⟩`` of layer ``name`` to ``out (K, n, K, n')`` in place."""
        if name in self.captured and name in other.captured:
            x1, g1 = self.captured[name]
            x2, g2 = other.captured[name]
            self.kernels[name].add_gram(x1, g1, x2, g2, out)
            return
        a = self.layer_grads(name)
        b = a if other is self else other.layer_grads(name)
        out.add_(torch.einsum("kid,ljd->kilj", a, b))


class Jacobian:
    """Per-example gradients of a model's pseudo-outputs over a loader.

    Args:
        model: the network.
        layer_collection: the layers to differentiate (default: all trainable ones).
        function: ``function(*batch) -> (n, c)`` outputs; default ``model(batch[0])``.
        n_output: expected c; checked against the model's output.
        pseudo_outputs: what to differentiate (default: the outputs themselves).
        device: where batches go (default: the device of the model's parameters).
        verbose: show a tqdm progress bar.
        progress: ``progress(done, total, stage)`` after each batch.
    """

    def __init__(
        self,
        model: nn.Module,
        layer_collection: LayerCollection | None = None,
        function: Callable | None = None,
        n_output: int | None = None,
        pseudo_outputs: PseudoOutputs | None = None,
        device: str | torch.device | None = None,
        verbose: bool = False,
        progress: Progress | None = None,
    ) -> None:
        self.model = model
        self.layer_collection = layer_collection or LayerCollection.from_model(model)
        self.function = function or default_function(model)
        self.n_output = n_output
        self.pseudo_outputs = pseudo_outputs or Identity()
        params = self.layer_collection.parameters(model)
        self.dtype = params[0].dtype
        self.device = torch.device(device) if device is not None else params[0].device
        self.verbose, self.progress = verbose, progress
        self._modules = self.layer_collection.modules(model)
        self._kernels = self._select_kernels()
        self._clone: set[str] = set()
        self._verified = False
        self._loop_examples = False  # vmap failed or was wrong once: see _check_fallback
        self._function_key = "default" if function is None else function
        self._wrapper = _FunctionModule(model, self.function)
        self.n_examples = 0

    # ----- layer paths ---------------------------------------------------------------------
    def _select_kernels(self) -> dict[str, LayerKernel]:
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                BatchNormKernel(module).check()
            if (
                isinstance(module, nn.modules.dropout._DropoutNd)
                and module.training
                and module.p > 0
            ):
                raise InvalidInputError(
                    f"{type(module).__name__} is in train mode, so the outputs are random and "
                    "the Fisher or NTK would be a random matrix: call model.eval() first"
                )
        owners: dict[int, int] = {}
        for _, module in self.model.named_modules(remove_duplicate=False):
            for _, p in module.named_parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        kernels = {}
        for e in self.layer_collection:
            module = self._modules[e.name]
            own = [p for _, p in module.named_parameters(recurse=False)]
            if any(owners[id(p)] > 1 for p in own) or len(own) != len(e.params):
                continue
            kernel = kernel_for(module)
            if kernel is not None:
                kernel.check()
                kernels[e.name] = kernel
        return kernels

    @property
    def paths(self) -> dict[str, str]:
        """``{layer: "hooks" | "torch.func"}``; final once the first batch has been seen."""
        return {
            e.name: HOOKS if e.name in self._kernels else FALLBACK for e in self.layer_collection
        }

    # ----- batches -------------------------------------------------------------------------
    def _prepare(self, batch) -> tuple:
        if isinstance(batch, Tensor):
            batch = (batch,)
        elif isinstance(batch, dict) or not isinstance(batch, (tuple, list)):
            raise InvalidInputError(
                "the loader must yield tensors or tuples of tensors such as (x,) or (x, y); "
                "pass function= to read other batch structures"
            )
        out = []
        for t in batch:
            if isinstance(t, Tensor):
                t = t.to(self.device)
                if t.is_floating_point() and t.dtype != self.dtype:
                    t = t.to(self.dtype)
            out.append(t)
        return tuple(out)

    def _forward(self, batch: tuple, capture: ForwardCapture) -> Tensor:
        try:
            with capture:
                out = self.function(*batch)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            shapes = [tuple(t.shape) for t in batch if isinstance(t, Tensor)]
            raise InvalidInputError(
                f"the model could not be applied to a batch with tensors of shapes {shapes}: "
                f"{err}. Make the loader yield inputs of the shape the model expects, or pass "
                "function= to say how to apply the model to a batch"
            ) from err
        return self.check_outputs(out)

    def check_outputs(self, out) -> Tensor:
        """Validate the model's outputs: an ``(n, c)`` finite tensor (``(n,)`` becomes
        ``(n, 1)``) with ``c = n_output`` when given."""
        if not isinstance(out, Tensor):
            raise InvalidInputError(
                f"the model returned {type(out).__name__}, not a tensor: pass function= "
                "returning the (n, c) outputs"
            )
        if out.dim() == 1:
            out = out.unsqueeze(1)
        if out.dim() != 2:
            raise InvalidInputError(
                f"outputs must have shape (n, c); got {tuple(out.shape)}: pass function= that "
                "flattens them"
            )
        if self.n_output is not None and out.shape[1] != self.n_output:
            raise InvalidInputError(
                f"n_output={self.n_output} but the model outputs {out.shape[1]} values per "
                "example: fix n_output or leave it out"
            )
        if not torch.isfinite(out).all():
            raise InvalidInputError(
                "the model produced non-finite outputs (NaN or inf) on this batch: check the "
                "weights and the inputs"
            )
        return out

    def _fallback_grads(
        self, batch: tuple, names: list[str], weights: Tensor, outputs: Tensor
    ) -> dict:
        """Per-example pseudo-output gradients of the fallback layers: ``{layer: (K, n, d_l)}``.

        ``outputs`` is the batch's ``(n, c)`` output with its graph, against which the per-example
        Jacobians are checked (see :meth:`_check_fallback`)."""
        if not names:
            return {}
        pnames = [pn for name in names for pn in self.layer_collection[name].param_names()]
        named = dict(self.model.named_parameters(remove_duplicate=False))
        params = {pn: named[pn].detach() for pn in pnames}

        def single(p, *example):
            ex = tuple(t.unsqueeze(0) if isinstance(t, Tensor) else t for t in example)
            out = functional_call(self._wrapper, {f"model.{k}": v for k, v in p.items()}, ex)
            return out.reshape(-1)

        in_dims = (None, *[0 if isinstance(t, Tensor) else None for t in batch])
        try:
            with torch.no_grad():  # the transforms differentiate; no graph to the real params
                jac = None
                if not self._loop_examples:
                    try:
                        jac = vmap(jacrev(single), in_dims=in_dims)(params, *batch)
                    except RuntimeError as err:
                        if "randomness" in str(err):
                            raise
                    if jac is None or not self._check_fallback(jac, outputs, named):
                        self._loop_examples = True
                if self._loop_examples:
                    jac = self._looped_jacobians(single, params, batch)
                    if not self._check_fallback(jac, outputs, named):
                        raise RuntimeError(
                            "the per-example gradients do not add up to the batch's gradient"
                        )
        except RuntimeError as err:
            if "randomness" in str(err):
                raise InvalidInputError(
                    "the model draws random numbers in its forward (e.g. Dropout in train mode): "
                    "call model.eval() first"
                ) from err
            raise InvalidInputError(
                f"torch.func could not compute per-example gradients of layer(s) {names}: {err}."
                " Layers that modify their parameters in place during the forward pass (e.g. "
                "Embedding(max_norm=...)) or that mix examples are not supported; leave them "
                "out with layer_collection=LayerCollection.from_model(model).sub([...])"
            ) from err
        out = {}
        for name in names:
            parts = [
                jac[pn].reshape(jac[pn].shape[0], jac[pn].shape[1], -1)
                for pn in self.layer_collection[name].param_names()
            ]
            j = torch.cat(parts, dim=2)  # (n, c, d_l)
            out[name] = torch.einsum("knc,ncd->knd", weights, j.to(weights.dtype))
        return out

    @staticmethod
    def _check_fallback(jac: dict[str, Tensor], out: Tensor, named: dict[str, Tensor]) -> bool:
        """Whether the per-example Jacobians ``{param: (n, c, *shape)}`` add up to the batch's.

        For a random ``r`` of shape ``(n, c)``, ``Σ_i r_iᵀ J_i`` must equal ``∂⟨r, out⟩/∂θ``
        from one ordinary backward pass through ``out``'s graph, up to rounding
        (``√eps``-relative). This catches ``vmap`` batching rules that are silently wrong
        (torch 2.13: ``vmap(jacrev)`` through ``nn.PReLU`` when n equals c) and layers that mix
        the examples of a batch, whose per-example gradients do not exist.
        """
        if not out.requires_grad:
            return True
        gen = torch.Generator(device="cpu").manual_seed(len(jac) + out.shape[0])
        r = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
        pnames = list(jac)
        with torch.enable_grad():
            grads = torch.autograd.grad(
                (out * r).sum(), [named[pn] for pn in pnames], retain_graph=True, allow_unused=True
            )
        tol = 10 * torch.finfo(out.dtype).eps ** 0.5
        for pn, g in zip(pnames, grads):
            got = torch.einsum("nc,nc...->...", r, jac[pn].to(out.dtype))
            want = torch.zeros_like(got) if g is None else g
            if (got - want).norm() > tol * (want.norm() + got.norm() + 1e-30):
                return False
        return True

    @staticmethod
    def _looped_jacobians(single: Callable, params: dict, batch: tuple) -> dict[str, Tensor]:
        """``jacrev(single)`` example by example, stacked: ``{param: (n, c, *shape)}``.

        The route for layers whose kernels have no ``vmap`` batching rule or mutate a state
        in place under ``vmap`` (``nn.LSTM``/``nn.GRU``/``nn.RNN`` initialise their hidden state
        unbatched, ``nn.PReLU``'s backward): slower than ``vmap`` (one ``jacrev`` per example)
        and equal to it. Each example's output must not depend on a random draw: its output is
        computed twice and compared, since outside ``vmap`` nothing else would notice.
        """
        n = next(t.shape[0] for t in batch if isinstance(t, Tensor))
        rows = []
        for i in range(n):
            example = tuple(t[i] if isinstance(t, Tensor) else t for t in batch)
            if i == 0 and not torch.equal(single(params, *example), single(params, *example)):
                raise RuntimeError("randomness: the model's output changed between two calls")
            rows.append(jacrev(single)(params, *example))
        return {pn: torch.stack([r[pn] for r in rows]) for pn in params}

    def _backward(
        self, out: Tensor, ys: list[Tensor | GradientEdge], weights: Tensor, retain: bool
    ) -> list:
        """``∂(w_k · out)/∂y`` for each pseudo-output k: one plain backward pass per k.

        A loop of K ordinary passes is faster on the CPU than one ``is_grads_batched`` pass
        (whose vmapped backward kernels materialise K copies of every intermediate gradient)."""
        k = weights.shape[0]
        stacked: list[Tensor | None] = [None] * len(ys)
        for i in range(k):
            grads = weighted_grad(out, ys, weights[i], retain_graph=retain or i < k - 1)
            for j, g in enumerate(grads):
                if g is None:
                    continue
                if k == 1:
                    stacked[j] = g.unsqueeze(0)
                    continue
                if stacked[j] is None:  # written in place: no list of K copies, then a stack
                    stacked[j] = g.new_empty(k, *g.shape)
                stacked[j][i] = g
        return stacked

    def _forward_batch(self, batch: tuple) -> tuple[Tensor, Tensor, ForwardCapture]:
        """Forward pass with hooks; settles the layers' paths (see :meth:`_verify`).

        Returns the outputs ``(n, c)``, the pseudo-output weights ``(K, n, c)`` and the capture.
        """
        fast = {n: self._modules[n] for n in self._kernels}
        while True:
            capture = ForwardCapture(fast, counted=self._modules, clone=self._clone)
            out = self._forward(batch, capture)
            demote = {n for n in fast if capture.calls.get(n, 0) != 1}
            if demote:  # a layer called twice or never: its hooks cannot see all its uses
                for n in demote:
                    self._kernels.pop(n)
                fast = {n: self._modules[n] for n in self._kernels}
                continue
            inplace = capture.modified_in_place() - self._clone
            if inplace:
                self._clone |= inplace
                continue
            break
        capture.release_outputs()
        weights = self.pseudo_outputs(out.detach(), batch)
        if fast and not self._verified:
            self._verify(out, weights, capture)
        self._verified = True
        return out, weights, capture

    def _run_batch(self, batch: tuple, split: bool = True) -> Iterator[BatchJacobian]:
        """One forward pass, then the batch's :class:`BatchJacobian` in chunks of pseudo-outputs.

        With ``split``, each chunk holds as many pseudo-outputs as fit in
        :data:`K_CHUNK_BYTES` of output gradients (at least one), so memory does not grow with
        K; chunks of one batch share :attr:`BatchJacobian.cache` and only the first has
        ``first=True``; a chunk's tensors are released when the next one is asked for, so a
        caller must use each chunk before advancing. Without ``split``, one chunk holds all K
        and is kept intact.
        """
        out, weights, capture = self._forward_batch(batch)
        n, k = out.shape[0], weights.shape[0]
        names = list(self._kernels)
        caps = [capture.captures[nm][0] for nm in names]
        ys = [c.target for c in caps]
        fallback_names = [e.name for e in self.layer_collection if e.name not in self._kernels]
        fallback = self._fallback_grads(batch, fallback_names, weights, out)
        step = k
        if split and ys:
            per_k = sum(c.shape.numel() for c in caps) * out.element_size()
            step = max(1, min(k, K_CHUNK_BYTES // max(1, per_k)))
        cache: dict = {}
        for s in range(0, k, step):
            e = min(s + step, k)
            captured = {}
            if ys:
                gys = self._backward(out, ys, weights[s:e], retain=e < k)
                for nm, c, gy in zip(names, caps, gys):
                    captured[nm] = (c.x, c.zeros(e - s) if gy is None else gy)
                del gys
            bj = BatchJacobian(
                n,
                e - s,
                self._kernels,
                captured,
                {nm: f[s:e] for nm, f in fallback.items()},
                self.layer_collection,
                out.dtype,
                out.device,
                first=s == 0,
                last=e == k,
                cache=cache,
            )
            del captured
            yield bj
            if split:  # consumed: free this chunk's gradients before the next backward pass
                bj.release()
            del bj
        cache.clear()

    def _verify_key(self) -> tuple:
        params = self.layer_collection.parameters(self.model)
        return (
            self._function_key,
            tuple(e.name for e in self.layer_collection),
            tuple(id(p) for p in params),
        )

    def _apply_known(self, key: tuple | None = None) -> bool:
        """Apply a remembered verification if it covers every hooked layer; say whether it did."""
        known = _VERIFIED.get(self.model, {}).get(key or self._verify_key())
        if known is None or not set(self._kernels) <= known[0] | known[1]:
            return False
        for nm in known[1] & set(self._kernels):
            self._kernels.pop(nm)
        return True

    def settle_paths(self, batch: tuple) -> None:
        """Make :attr:`paths` final before a pass that does not run :meth:`batches` (e.g. the
        forward-mode products of ``PMatImplicit``): from the remembered verification of this
        model when there is one, else by a forward pass and the check on ``batch``. Layers called
        twice or never are still found on each pass by the caller."""
        if self._verified:
            return
        if self._apply_known():
            self._verified = True
            return
        with torch.enable_grad():
            try:  # the structure shows on a few examples; their graph is small
                self._forward_batch(_head(batch, _SETTLE_EXAMPLES))
            except InvalidInputError:
                self._forward_batch(batch)

    def _verify(self, out: Tensor, weights: Tensor, capture: ForwardCapture) -> None:
        """Check that each hooked layer's parameters are used only by the layer's own forward:
        on a random combination ``Σ_k r_k w_k`` of the pseudo-outputs, the hooks' summed gradient
        must equal autograd's (one extra backward pass). A layer that fails (its weight also used
        elsewhere) moves to the ``torch.func`` path. The outcome is remembered per model,
        function and layer collection, so later metrics on the same model skip the check."""
        key = self._verify_key()
        if self._apply_known(key):
            return
        gen = torch.Generator().manual_seed(0)
        r = torch.randn(weights.shape[0], generator=gen, dtype=weights.dtype).to(weights.device)
        names = list(self._kernels)
        caps = [capture.captures[nm][0] for nm in names]
        ys = [c.target for c in caps]
        params = [p for nm in names for _, p in self._kernels[nm].parameters()]
        grads = weighted_grad(
            out, ys + params, torch.einsum("k,knc->nc", r, weights), retain_graph=True
        )
        gys, true = grads[: len(ys)], grads[len(ys) :]
        i, failed = 0, set()
        for nm, c, gy in zip(names, caps, gys):
            kernel = self._kernels[nm]
            kp = kernel.parameters()
            ref = torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, (_, p) in zip(true[i : i + len(kp)], kp)
                ]
            )
            i += len(kp)
            gy = c.zeros() if gy is None else gy
            hooked = kernel.grad_sum(c.x, gy.unsqueeze(0))
            tol = 1e-4 if ref.dtype == torch.float32 else 1e-9
            if not torch.allclose(hooked, ref, rtol=tol * 10, atol=tol * (ref.abs().max() + 1)):
                failed.add(nm)
        for nm in failed:
            self._kernels.pop(nm)
        try:
            store = _VERIFIED.setdefault(self.model, {})
        except TypeError:  # a model that cannot be weakly referenced is verified every time
            return
        ok0, failed0 = store.get(key, (frozenset(), frozenset()))
        store[key] = (ok0 | (set(names) - failed), failed0 | failed)

    def batches(
        self, loader: Iterable, stage: str = "jacobian", split: bool = True
    ) -> Iterator[BatchJacobian]:
        """Yield :class:`BatchJacobian` chunks (see :meth:`_run_batch`); counts examples in
        :attr:`n_examples`. ``split=False`` yields one chunk with all pseudo-outputs per batch."""
        total = None
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__"):
            total = len(dataset)
        bar = None
        if self.verbose:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=stage, unit="ex")
        self.n_examples = 0
        try:
            for raw in loader:
                batch = self._prepare(raw)
                n = 0
                for bj in self._run_batch(batch, split):
                    if bj.first:
                        n = bj.n
                        self.n_examples += n
                    yield bj
                    del bj
                if bar is not None:
                    bar.update(n)
                if self.progress is not None:
                    self.progress(self.n_examples, total, stage)
        finally:
            if bar is not None:
                bar.close()
        if self.n_examples == 0:
            raise InvalidInputError("the loader yielded no examples: give it a non-empty dataset")

    # ----- aggregates ----------------------------------------------------------------------
    def get_jacobian(self, loader: Iterable) -> Tensor:
        """Stacked per-example pseudo-output gradients ``(K, n, d)`` (not normalised)."""
        return check_finite(
            torch.cat([bj.grads() for bj in self.batches(loader, split=False)], dim=1), "Jacobian"
        )

    def get_covariance_matrix(self, loader: Iterable) -> Tensor:
        """``(1/n) Σ_{i,k} g_{k,i} g_{k,i}ᵀ``: ``(d, d)``."""
        total = None
        for bj in self.batches(loader, "dense"):
            total = add_lower_gram(total, bj.grads().reshape(-1, self.layer_collection.numel()))
        total = symmetrize_lower(total).div_(self.n_examples)
        check_finite(torch.diagonal(total), "Fisher")  # a NaN/inf in J reaches the diagonal
        return total

    def get_covariance_diag(self, loader: Iterable) -> Tensor:
        """Diagonal of the covariance, ``(d,)``."""
        total: Tensor | None = None
        for bj in self.batches(loader, "diag"):
            if total is None:
                total = torch.zeros(self.layer_collection.numel(), dtype=bj.dtype, device=bj.device)
                views = total.split([e.numel for e in self.layer_collection])
            for e, view in zip(self.layer_collection, views):
                bj.add_layer_sq_sum(e.name, view)
        return check_finite(total.div_(self.n_examples), "Fisher diagonal")

    def get_covariance_layer_blocks(self, loader: Iterable) -> dict[str, Tensor]:
        """Per-layer diagonal blocks ``{layer: (d_l, d_l)}``."""
        blocks: dict[str, Tensor] = {}
        for bj in self.batches(loader, "blockdiag"):
            for e in self.layer_collection:
                j = bj.layer_grads(e.name).reshape(-1, e.numel)
                blocks[e.name] = add_lower_gram(blocks.get(e.name), j)
        out = {k: symmetrize_lower(v).div_(self.n_examples) for k, v in blocks.items()}
        for v in out.values():
            check_finite(torch.diagonal(v), "Fisher block")
        return out

    def get_gram_matrix(self, loader: Iterable) -> Tensor:
        """``K[k,i,l,j] = ⟨g_{k,i}, g_{l,j}⟩`` summed over layers: ``(K, n, K, n)``."""
        batches = list(self.batches(loader, "gram", split=False))
        k = batches[0].k
        n = sum(b.n for b in batches)
        gram = torch.zeros(k, n, k, n, dtype=batches[0].dtype, device=batches[0].device)
        starts = [0]
        for b in batches:
            starts.append(starts[-1] + b.n)
        for bi, b1 in enumerate(batches):
            for bj in range(bi + 1):
                b2 = batches[bj]
                s1, s2 = slice(starts[bi], starts[bi + 1]), slice(starts[bj], starts[bj + 1])
                block = gram[:, s1, :, s2]  # a view: each layer adds into the Gram in place
                for e in self.layer_collection:
                    b1.add_layer_gram(e.name, b2, block)
                if bi != bj:
                    gram[:, s2, :, s1] = block.permute(2, 3, 0, 1)
        return check_finite(gram, "Gram matrix")

    def get_mean_gradient(self, loader: Iterable) -> Tensor:
        """``(1/n) Σ_{i,k} g_{k,i}``: ``(d,)``, one ordinary backward pass per batch."""
        params = self.layer_collection.parameters(self.model)
        total, n = None, 0
        for raw in loader:
            batch = self._prepare(raw)
            out = self._forward(batch, ForwardCapture({}))
            w = self.pseudo_outputs(out.detach(), batch).sum(dim=0)
            grads = weighted_grad(out, params, w)
            flat = torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(grads, params)
                ]
            )
            total = flat if total is None else total + flat
            n += out.shape[0]
        if n == 0:
            raise InvalidInputError("the loader yielded no examples: give it a non-empty dataset")
        return check_finite(total / n, "mean gradient")

    def accumulate(
        self, loader: Iterable, accumulators: list | Callable[[], list], stage: str = "statistics"
    ) -> dict:
        """Run each accumulator (see :mod:`fimntk.engine.generator.accumulators`) over the loader in
        one pass; return ``{layer: statistic / n}``. ``accumulators`` may be a function returning
        them, called once the first batch has settled which layers take the hooks."""
        accs = None if callable(accumulators) else accumulators
        for bj in self.batches(loader, stage):
            if accs is None:
                accs = accumulators()
            for acc in accs:
                acc.update(bj)
        out = {acc.name: acc.result(self.n_examples) for acc in accs}
        for name, stat in out.items():
            for t in stat if isinstance(stat, tuple) else (stat,):
                square = t.dim() >= 2 and t.shape[-1] == t.shape[-2]  # PSD: NaN reaches diag
                check_finite(
                    torch.diagonal(t, dim1=-2, dim2=-1) if square else t,
                    f"statistic of layer {name!r}",
                )
        return out

    def kernel(self, name: str) -> LayerKernel | None:
        """The hook kernel of layer ``name`` (None on the ``torch.func`` path)."""
        return self._kernels.get(name)

    def probe(self, loader: Iterable) -> tuple[int, int]:
        """``(c, K)``: outputs and pseudo-outputs per example, from the first batch."""
        for raw in loader:
            batch = self._prepare(raw)
            with torch.no_grad():
                out = self._forward(batch, ForwardCapture({}))
            state = None
            sampler = getattr(self.pseudo_outputs, "generator", None)
            if sampler is not None:
                state = sampler.get_state()
            k = self.pseudo_outputs(out, batch).shape[0]
            if state is not None:
                sampler.set_state(state)
            return out.shape[1], k
        raise InvalidInputError("the loader yielded no examples: give it a non-empty dataset")
