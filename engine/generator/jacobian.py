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

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from fimntk.engine.errors import InvalidInputError, UnsupportedOperationError
from fimntk.engine.generator.batch_jacobian import (
    BatchJacobian,
    batched_weighted_grads,
    check_finite,
    weighted_grad,
)
from fimntk.engine.generator.fallback import TorchFuncFallback
from fimntk.engine.generator.hooks import Capture, ForwardCapture
from fimntk.engine.generator.inputs import (
    as_loader,
    default_function,
    positions_mask,
    tensors_of,
    to_device,
)
from fimntk.engine.generator.outputs import Identity, PseudoOutputs
from fimntk.engine.generator.paths import PathChoice
from fimntk.engine.generator.slicing import ExampleSlicer
from fimntk.engine.generator.swap import call_swapped
from fimntk.engine.generator.verification import PathVerification
from fimntk.engine.layercollection import LayerCollection
from fimntk.engine.layers import LayerKernel
from fimntk.engine.linalg import add_lower_gram, symmetrize_lower

Progress = Callable[[int, "int | None", str], None]

#: Output-gradient bytes per chunk of pseudo-outputs (see :meth:`Jacobian._run_batch`). 4 MiB
#: keeps memory flat for wide layers (a convolution's K gradients still go one at a time) while
#: the small layers of an MLP take all K pseudo-outputs in one chunk: one set of per-layer
#: reductions per batch instead of one per pseudo-output (256 KiB gave one chunk per output on
#: bench's W1, a third of whose time went to those per-chunk calls).
K_CHUNK_BYTES = 1 << 22

#: Output-gradient bytes of a chunk up to which its K backward passes run as one batched pass
#: (:func:`batched_weighted_grads`). Small activations (an MLP of a few thousand parameters)
#: make each pass cost little more than autograd's per-pass overhead, which batching pays
#: once: bench's W1 (3 × 64 units, batches of 250, 2 MB for K = 10) diagonal ~30 % faster with
#: 1 and 2 threads. Larger ones are faster as a loop of plain passes (batched kernels
#: materialise K copies of every intermediate gradient).
BATCHED_BACKWARD_BYTES = 1 << 21


class Jacobian(PathChoice, PathVerification, TorchFuncFallback):
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
        centering: subtract from each example's gradient the mean over the n examples of the
            whole loader, per pseudo-output: ``g̃_{k,i} = g_{k,i} − ḡ_k`` with
            ``ḡ_k = (1/n) Σ_i g_{k,i}`` (NNGeometry's ``centering=True``). The covariance
            becomes ``(1/n) Σ_{k,i} g̃ g̃ᵀ = (1/n) Σ g gᵀ − Σ_k ḡ_k ḡ_kᵀ`` and the Gram matrix
            ``C K C`` with ``C = I_n − 11ᵀ/n`` on each example index. Offered by
            :meth:`get_jacobian`, :meth:`get_covariance_matrix`, :meth:`get_covariance_diag`,
            :meth:`get_covariance_layer_blocks` and :meth:`get_gram_matrix` (so dense, diag,
            block-diagonal, low-rank, ``FMatDense`` and ``PFMapDense``); the one-pass
            statistics (KFAC, EKFAC, quasi-diagonal) refuse it. Pseudo-outputs are drawn once
            per call, so a Monte Carlo Fisher's mean is of the same draws.
        lists_are_batches: read a list of tensors given as ``examples`` as one batch
            (NNGeometry's convention; a ``DataLoader`` yields its batches as lists) rather
            than as a loader of one-tensor batches. A tuple of tensors is always one batch.
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
        centering: bool = False,
        lists_are_batches: bool = False,
    ) -> None:
        self.model = model
        self.centering = bool(centering)
        self.lists_are_batches = lists_are_batches
        self.layer_collection = LayerCollection.resolve(model, layer_collection)
        self.n_output = n_output
        self.pseudo_outputs = Identity() if pseudo_outputs is None else pseudo_outputs
        self._given_function = function
        self.function = self.pseudo_outputs.outputs_of(
            default_function(model) if function is None else function
        )
        params = self.layer_collection.parameters(model)
        self.dtype = params[0].dtype
        self.device = torch.device(device) if device is not None else params[0].device
        self.verbose, self.progress = verbose, progress
        self._modules = self.layer_collection.modules(model)
        self._kernels = self._select_kernels()
        self._clone: set[str] = set()
        self._broadcast: set[str] = set()  # layers on a tensor shared by the batch, expanded
        self._verified = False
        self._slicer: ExampleSlicer | None = None
        self._loop_examples = False  # vmap failed or was wrong once: see _check_fallback
        self._function_key = "default" if function is None else function
        self.n_examples = 0

    # ----- layer paths ---------------------------------------------------------------------
    # ----- batches -------------------------------------------------------------------------
    def _prepare(self, batch: object) -> tuple:
        self.check_modes()  # the model may have been put in train mode since it was built
        return to_device(batch, self.device, self.dtype)

    def _forward(self, batch: tuple, capture: ForwardCapture) -> Tensor:
        try:
            with capture:
                out = self.function(*batch)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            shapes = [tuple(t.shape) for t in tensors_of(batch)]
            raise InvalidInputError(
                f"the model could not be applied to a batch with tensors of shapes {shapes}: "
                f"{err}. Make the loader yield inputs of the shape the model expects, or pass "
                "function= to say how to apply the model to a batch"
            ) from err
        return self.check_outputs(out)

    def check_outputs(self, out: Tensor) -> Tensor:
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

    def _backward(
        self,
        out: Tensor,
        ys: list[Tensor | GradientEdge],
        weights: Tensor,
        retain: bool,
        grad_bytes: int,
    ) -> list:
        """``∂(w_k · out)/∂y`` for each pseudo-output k: one plain backward pass per k, or one
        batched pass for all K when their gradients (``grad_bytes``) are small.

        A loop of K ordinary passes is faster on the CPU than one batched pass (whose vmapped
        backward kernels materialise K copies of every intermediate gradient) except where
        autograd's per-pass overhead dominates (:data:`BATCHED_BACKWARD_BYTES`)."""
        k = weights.shape[0]
        if k > 1 and grad_bytes <= BATCHED_BACKWARD_BYTES:
            batched = batched_weighted_grads(out, ys, weights, retain_graph=retain)
            if batched is not None:
                return list(batched)
        stacked: list[Tensor | None] = [None] * len(ys)
        for i in range(k):
            grads = weighted_grad(out, ys, weights[i], retain_graph=retain or i < k - 1)
            for j, g in enumerate(grads):
                if g is None:
                    continue
                if k == 1:
                    stacked[j] = g.unsqueeze(0)
                    continue
                slot = stacked[j]
                if slot is None:  # written in place: no list of K copies, then a stack
                    slot = stacked[j] = g.new_empty(k, *g.shape)
                slot[i] = g
        return stacked

    def _forward_batch(self, batch: tuple) -> tuple[Tensor, Tensor, ForwardCapture]:
        """Forward pass with hooks; settles the layers' paths (see :meth:`_verify`).

        Returns the outputs ``(n, c)``, the pseudo-output weights ``(K, n, c)`` and the capture.
        """
        fast = {n: self._modules[n] for n in self._kernels}
        plain: Tensor | None = None  # the outputs before any layer was expanded
        while True:
            capture = ForwardCapture(
                fast,
                counted=self._modules,
                clone=self._clone,
                broadcast=self._broadcast,
                examples=_examples(batch),
            )
            out = self._forward(batch, capture)
            demote = {n for n in fast if capture.calls.get(n, 0) != 1}
            examples = out.shape[0]
            shared = {  # its first dimension does not index the examples (e.g. broadcast)
                n
                for n in set(fast) - demote
                if not self._kernels[n].carries_examples(capture.captures[n][0].x, examples)
            }
            expandable = {n for n in shared if _batch_of_one(capture.captures[n][0])}
            if expandable - self._broadcast and examples > 1:
                plain = out.detach()  # try them expanded to the batch (checked below)
                self._broadcast |= expandable
                continue
            demote |= shared
            if plain is not None and self._broadcast:
                if not _same_outputs(plain, out.detach()):  # expanding changed the function
                    demote |= self._broadcast & set(fast)
                    self._broadcast.clear()
                plain = None
            if demote:  # called twice or never, or not per example: the hooks cannot split it
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
        per_k = sum(c.shape.numel() for c in caps) * out.element_size()
        if split and ys:
            step = max(1, min(k, K_CHUNK_BYTES // max(1, per_k)))
        cache: dict = {}
        mask = positions_mask(batch)
        for s in range(0, k, step):
            e = min(s + step, k)
            captured = {}
            if ys:
                gys = self._backward(out, ys, weights[s:e], e < k, (e - s) * per_k)
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
                positions_mask=mask,
            )
            del captured
            yield bj
            if split:  # consumed: free this chunk's gradients before the next backward pass
                bj.release()
            del bj
        cache.clear()

    def batches(
        self,
        loader: Iterable,
        stage: str = "jacobian",
        split: bool = True,
        slices: bool = False,
    ) -> Iterator[BatchJacobian]:
        """Yield :class:`BatchJacobian` chunks (see :meth:`_run_batch`); counts examples in
        :attr:`n_examples`. ``split=False`` yields one chunk with all pseudo-outputs per batch.
        ``slices=True`` (for a sum over examples) runs a CPU batch in slices of examples
        (:meth:`slices`)."""
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
            for raw in self.loader(loader):
                batch = self._prepare(raw)
                n = 0
                for part in self.slices(batch) if slices else (batch,):
                    for bj in self._run_batch(part, split):
                        if bj.first:
                            n += bj.n
                            self.n_examples += bj.n
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

    def slices(self, batch: tuple, above: int = 0) -> Iterator[tuple]:
        """A batch in slices of examples (:class:`~fimntk.engine.generator.slicing.ExampleSlicer`;
        whole when its largest activation takes at most ``above`` bytes): on a CPU, large
        activations come from reused memory instead of fresh pages. Monte Carlo draws are never
        sliced (they depend on the whole batch's shape)."""
        if getattr(self.pseudo_outputs, "random", False):
            yield batch
            return
        if self._slicer is None:
            variant = (type(self.pseudo_outputs), getattr(self.pseudo_outputs, "variant", None))
            self._slicer = ExampleSlicer(self.model, self.function, (self._function_key, variant))
        yield from self._slicer.slices(batch, above)

    # ----- aggregates ----------------------------------------------------------------------
    def for_layers(self, layer_collection: LayerCollection) -> Jacobian:
        """This generator over other layers of the same model (itself for its own layers): a
        representation built on a sub-collection differentiates only those layers."""
        if layer_collection == self.layer_collection:
            return self
        return self._copy(layer_collection, self.centering)

    def uncentred(self) -> Jacobian:
        """This generator without ``centering`` (itself when it does not centre): what an
        operator that centres its own products (:class:`~fimntk.engine.pfmap.PFMapImplicit`)
        iterates."""
        return self._copy(self.layer_collection, False) if self.centering else self

    def _copy(self, layer_collection: LayerCollection, centering: bool) -> Jacobian:
        return Jacobian(
            self.model,
            layer_collection,
            self._given_function,
            self.n_output,
            self.pseudo_outputs,
            self.device,
            self.verbose,
            self.progress,
            centering,
            self.lists_are_batches,
        )

    def refuse_centering(self, what: str) -> None:
        """Raise for a statistic that the centred Jacobian does not offer."""
        if self.centering:
            raise UnsupportedOperationError(
                f"{what} is not offered with centering=True: use the dense, diagonal, "
                "block-diagonal or low-rank representation, the Jacobian or the Gram"
            )

    def get_jacobian(self, loader: Iterable) -> Tensor:
        """Stacked per-example pseudo-output gradients ``(K, n, d)`` (not normalised), centred
        over the examples with ``centering``."""
        jac = torch.cat([bj.grads() for bj in self.batches(loader, split=False)], dim=1)
        if self.centering:
            jac = jac - jac.mean(dim=1, keepdim=True)
        return check_finite(jac, "Jacobian")

    def get_covariance_matrix(self, loader: Iterable) -> Tensor:
        """``(1/n) Σ_{i,k} g_{k,i} g_{k,i}ᵀ``: ``(d, d)``; with ``centering``, ``g_{k,i} − ḡ_k``
        (``Σ_i (g−ḡ)(g−ḡ)ᵀ = Σ_i g gᵀ − s sᵀ/n`` with ``s_k = Σ_i g_{k,i}``)."""
        total: Tensor | None = None
        sums: Tensor | None = None
        for bj in self.batches(loader, "dense", split=not self.centering):
            grads = bj.grads()
            total = add_lower_gram(total, grads.reshape(-1, self.layer_collection.numel()))
            if self.centering:
                sums = grads.sum(dim=1) if sums is None else sums + grads.sum(dim=1)
        assert total is not None, "batches() refuses an empty loader"
        total = symmetrize_lower(total)
        if sums is not None:
            total -= sums.t() @ sums / self.n_examples
        total = total.div_(self.n_examples)
        check_finite(torch.diagonal(total), "Fisher")  # a NaN/inf in J reaches the diagonal
        return total

    def get_covariance_diag(self, loader: Iterable) -> Tensor:
        """Diagonal of the covariance, ``(d,)`` (centred as :meth:`get_covariance_matrix`)."""
        if self.centering:  # Σ_i (g − ḡ)² = Σ_i g² − s²/n, entrywise
            sq: Tensor | None = None
            sums: Tensor | None = None
            for bj in self.batches(loader, "diag", split=False):
                grads = bj.grads()
                part, s = (grads * grads).sum(dim=(0, 1)), grads.sum(dim=1)
                sq = part if sq is None else sq + part
                sums = s if sums is None else sums + s
            assert sq is not None and sums is not None, "batches() refuses an empty loader"
            centred = (sq - (sums * sums).sum(dim=0) / self.n_examples) / self.n_examples
            return check_finite(centred, "Fisher diagonal")
        total: Tensor | None = None
        for bj in self.batches(loader, "diag", slices=True):
            if total is None:
                total = torch.zeros(self.layer_collection.numel(), dtype=bj.dtype, device=bj.device)
                views = total.split([e.numel for e in self.layer_collection])
            for e, view in zip(self.layer_collection, views):
                bj.add_layer_sq_sum(e.name, view)
        assert total is not None, "batches() refuses an empty loader"
        return check_finite(total.div_(self.n_examples), "Fisher diagonal")

    def get_covariance_layer_blocks(self, loader: Iterable) -> dict[str, Tensor]:
        """Per-layer diagonal blocks ``{layer: (d_l, d_l)}`` (centred as
        :meth:`get_covariance_matrix`)."""
        blocks: dict[str, Tensor] = {}
        sums: dict[str, Tensor] = {}
        for bj in self.batches(loader, "blockdiag", split=not self.centering):
            for e in self.layer_collection:
                j = bj.layer_grads(e.name)
                blocks[e.name] = add_lower_gram(blocks.get(e.name), j.reshape(-1, e.numel))
                if self.centering:
                    s = j.reshape(j.shape[0], -1, e.numel).sum(dim=1)
                    sums[e.name] = s if e.name not in sums else sums[e.name] + s
        out = {k: symmetrize_lower(v) for k, v in blocks.items()}
        for k, s in sums.items():
            out[k] -= s.t() @ s / self.n_examples
        out = {k: v.div_(self.n_examples) for k, v in out.items()}
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
        pairs, done = len(batches) * (len(batches) + 1) // 2, 0
        for bi, b1 in enumerate(batches):
            for bj in range(bi + 1):
                b2 = batches[bj]
                s1, s2 = slice(starts[bi], starts[bi + 1]), slice(starts[bj], starts[bj + 1])
                block = gram[:, s1, :, s2]  # a view: each layer adds into the Gram in place
                for e in self.layer_collection:
                    b1.add_layer_gram(e.name, b2, block)
                if bi != bj:
                    gram[:, s2, :, s1] = block.permute(2, 3, 0, 1)
                done += 1
                if self.progress is not None:
                    self.progress(done, pairs, "gram blocks")
        if self.centering:  # C G C with C = I − 11ᵀ/n on both example indices
            gram = gram - gram.mean(dim=1, keepdim=True)
            gram = gram - gram.mean(dim=3, keepdim=True)
        return check_finite(gram, "Gram matrix")

    def get_mean_gradient(self, loader: Iterable) -> Tensor:
        """``(1/n) Σ_{i,k} g_{k,i}``: ``(d,)``, one ordinary backward pass per batch."""
        params = self.layer_collection.parameters(self.model)
        total: Tensor | None = None
        n = 0
        for raw in self.loader(loader):
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
        if total is None:
            raise InvalidInputError("the loader yielded no examples: give it a non-empty dataset")
        return check_finite(total / n, "mean gradient")

    def accumulate(
        self, loader: Iterable, accumulators: list | Callable[[], list], stage: str = "statistics"
    ) -> dict:
        """Run each accumulator (see :mod:`fimntk.engine.generator.accumulators`) over the loader in
        one pass; return ``{layer: statistic / n}``. ``accumulators`` may be a function returning
        them, called once the first batch has settled which layers take the hooks."""
        self.refuse_centering(f"the {stage} statistics")
        accs = None if callable(accumulators) else accumulators
        for bj in self.batches(loader, stage):
            if accs is None:
                assert callable(accumulators)
                accs = accumulators()
            for acc in accs:
                acc.update(bj)
        assert accs is not None, "batches() refuses an empty loader"
        out = {acc.name: acc.result(self.n_examples) for acc in accs}
        for name, stat in out.items():
            for t in stat if isinstance(stat, tuple) else (stat,):
                square = t.dim() >= 2 and t.shape[-1] == t.shape[-2]  # PSD: NaN reaches diag
                check_finite(
                    torch.diagonal(t, dim1=-2, dim2=-1) if square else t,
                    f"statistic of layer {name!r}",
                )
        return out

    def loader(self, examples: Iterable) -> Iterable:
        """``examples`` as an iterable of batches (a tuple of tensors is one batch; see
        ``lists_are_batches``)."""
        return as_loader(examples, self.lists_are_batches)

    # ----- the pieces a forward-mode product needs (see :class:`PMatImplicit`) -------------
    def prepare(self, batch: object) -> tuple:
        """A loader's batch as a tuple of tensors on the generator's device and dtype."""
        return self._prepare(batch)

    def hooked_modules(self) -> dict[str, nn.Module]:
        """``{layer: module}`` of the layers currently on the hook path."""
        return {name: self._modules[name] for name in self._kernels}

    @property
    def layer_modules(self) -> dict[str, nn.Module]:
        """``{layer: module}`` of every layer of the collection."""
        return self._modules

    def move_to_fallback(self, names: Iterable[str]) -> None:
        """Send layers ``names`` to the ``torch.func`` path (e.g. a module called twice)."""
        for name in names:
            self._kernels.pop(name, None)

    def call_with(self, params: dict[str, Tensor], batch: tuple) -> Tensor:
        """The outputs on ``batch`` with parameters ``{name: tensor}`` swapped in (names as in
        ``model.named_parameters()``), by :func:`.swap.call_swapped`."""
        return call_swapped(self.model, params, self.function, batch)

    def check_forward(self, batch: tuple) -> None:
        """Run the forward pass without hooks, raising the generator's error naming the fix when
        ``batch`` does not fit the model."""
        with torch.no_grad():
            self._forward(batch, ForwardCapture({}))

    def run_batch(self, batch: tuple, split: bool = True) -> Iterator[BatchJacobian]:
        """The :class:`BatchJacobian` chunks of one prepared batch (see :meth:`_run_batch`)."""
        return self._run_batch(batch, split)

    def kernel(self, name: str) -> LayerKernel | None:
        """The hook kernel of layer ``name`` (None on the ``torch.func`` path)."""
        return self._kernels.get(name)

    def probe(self, loader: Iterable) -> tuple[int, int]:
        """``(c, K)``: outputs and pseudo-outputs per example, from the first batch."""
        for raw in self.loader(loader):
            batch = self._prepare(raw)
            with torch.no_grad():
                out = self._forward(batch, ForwardCapture({}))
            sampler = getattr(self.pseudo_outputs, "generator", None)
            state = None if sampler is None else sampler.get_state()
            k = self.pseudo_outputs(out, batch).shape[0]
            if sampler is not None:
                sampler.set_state(state)
            return out.shape[1], k
        raise InvalidInputError("the loader yielded no examples: give it a non-empty dataset")


def _examples(batch: tuple) -> int:
    """The number of examples of a prepared batch (the first dimension of its first tensor)."""
    tensors = [t for t in tensors_of(batch) if t.dim() > 0]
    return tensors[0].shape[0] if tensors else 0


def _batch_of_one(capture: Capture) -> bool:
    """Whether a layer was called on a tensor with a batch dimension of 1 (then broadcast)."""
    return capture.x.dim() > 0 and capture.x.shape[0] == 1 and capture.shape[0] == 1


def _same_outputs(a: Tensor, b: Tensor) -> bool:
    """Whether expanding the broadcast layers left the outputs as they were (to rounding)."""
    tol = 100 * torch.finfo(a.dtype).eps
    return a.shape == b.shape and bool(
        torch.allclose(a, b, rtol=tol, atol=float(tol * a.abs().max()))
    )
