"""The ``torch.func`` path: per-example Jacobians of the layers without a kernel, by
``vmap(jacrev(functional_call))`` or example by example, checked against one ordinary backward
pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.generator.inputs import example_dims, map_tensors, tensors_of
from fimntk.engine.generator.swap import call_swapped
from fimntk.engine.layercollection import LayerCollection
from fimntk.engine.layers import LayerKernel


class TorchFuncFallback:
    """Per-example gradients of the fallback layers (mixed into ``Jacobian``)."""

    model: nn.Module
    layer_collection: LayerCollection
    _kernels: dict[str, LayerKernel]
    _modules: dict[str, nn.Module]
    _loop_examples: bool
    function: Callable

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
            ex = map_tensors(example, lambda t: t.unsqueeze(0))
            out = call_swapped(self.model, p, self.function, ex)
            return out.reshape(-1)

        in_dims = (None, *example_dims(batch))
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
        assert jac is not None
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
    def _check_fallback(jac: dict[str, Tensor], out: Tensor, named: Mapping[str, Tensor]) -> bool:
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
        n = tensors_of(batch)[0].shape[0]
        rows = []
        for i in range(n):
            example = map_tensors(batch, partial(_row, i))
            if i == 0 and not torch.equal(single(params, *example), single(params, *example)):
                raise RuntimeError("randomness: the model's output changed between two calls")
            rows.append(jacrev(single)(params, *example))
        return {pn: torch.stack([r[pn] for r in rows]) for pn in params}


def _row(i: int, t: Tensor) -> Tensor:
    """Example ``i`` of a batched tensor."""
    return t[i]
