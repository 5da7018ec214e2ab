"""First-batch verification of the hooked layers: their summed gradient must equal autograd's,
else the layer moves to the ``torch.func`` path. Outcomes are remembered per model.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.generator.batch_jacobian import weighted_grad
from fimntk.engine.generator.hooks import ForwardCapture
from fimntk.engine.generator.slicing import head
from fimntk.engine.layercollection import LayerCollection
from fimntk.engine.layers import LayerKernel

#: Verification outcomes: ``{model: {key: (layers that passed, layers moved to torch.func)}}``.
_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: Examples of the first batch that :meth:`Jacobian.settle_paths` runs.
_SETTLE_EXAMPLES = 4


class PathVerification:
    """Settles the paths of the hooked layers on the first batch (mixed into ``Jacobian``)."""

    model: nn.Module
    layer_collection: LayerCollection
    _kernels: dict[str, LayerKernel]
    _modules: dict[str, nn.Module]
    _verified: bool
    _function_key: object

    def _forward_batch(self, batch: tuple) -> tuple[Tensor, Tensor, ForwardCapture]:
        raise NotImplementedError

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
                self._forward_batch(head(batch, _SETTLE_EXAMPLES))
            except InvalidInputError:
                self._forward_batch(batch)

    def _verify(self, out: Tensor, weights: Tensor, capture: ForwardCapture) -> None:
        """Check that each hooked layer's parameters are used only by the layer's own forward and
        that its captured first dimension indexes the examples.

        For a random combination ``u = Σ_k r_k w_k`` of the pseudo-outputs and per-example
        weights ``s_i`` (0.5, 1, 2, 0.5, ...: powers of two scale exactly), the hooks'
        ``Σ_i s_i g_i``, per-example gradients of ``⟨u_i, out_i⟩`` split off the captured output
        gradient, must equal autograd's gradient of ``Σ_i s_i ⟨u_i, out_i⟩`` (two extra backward
        passes). A layer whose weight is also used elsewhere fails through the sum; a layer
        whose rows are shared by the examples (a broadcast, a layer applied to a parameter whose
        first dimension happens to be n) fails through ``s``, since its output rows feed every
        example. A failing layer moves to the ``torch.func`` path. The outcome is remembered per
        model, function and layer collection, so later metrics on the same model skip the check.
        """
        key = self._verify_key()
        if self._apply_known(key):
            return
        gen = torch.Generator().manual_seed(0)
        r = torch.randn(weights.shape[0], generator=gen, dtype=weights.dtype).to(weights.device)
        # powers of two: scaling by them is exact, so a model computing in a lower precision
        # inside (e.g. an RMSNorm in float32) rounds both passes alike
        s = 2.0 ** (torch.arange(out.shape[0], device=out.device) % 3 - 1).to(weights.dtype)
        names = list(self._kernels)
        caps = [capture.captures[nm][0] for nm in names]
        ys = [c.target for c in caps]
        params = [p for nm in names for _, p in self._kernels[nm].parameters()]
        u = torch.einsum("k,knc->nc", r, weights)
        gys = weighted_grad(out, ys, u, retain_graph=True)
        true = weighted_grad(out, params, s[:, None] * u, retain_graph=True)
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
            if not kernel.carries_examples(c.x, out.shape[0]):
                failed.add(nm)
                continue
            hooked = kernel.grad_sum(c.x, kernel.scale_examples(gy, s).unsqueeze(0))
            tol = 1e-4 if ref.dtype == torch.float32 else 1e-9
            if not torch.allclose(
                hooked, ref, rtol=tol * 10, atol=float(tol * (ref.abs().max() + 1))
            ):
                failed.add(nm)
        for nm in failed:
            self._kernels.pop(nm)
        try:
            store = _VERIFIED.setdefault(self.model, {})
        except TypeError:  # a model that cannot be weakly referenced is verified every time
            return
        ok0, failed0 = store.get(key, (frozenset(), frozenset()))
        store[key] = (ok0 | (set(names) - failed), failed0 | failed)
