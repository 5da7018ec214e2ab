"""One batch's per-example gradients, as captured inputs and output gradients of the hooked
layers plus the ``torch.func`` layers' Jacobians; kernels turn them into per-layer quantities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.layercollection import LayerCollection
from fimntk.engine.layers import LayerKernel

try:  # autograd's batched backward pass (see batched_weighted_grads); private, so optional
    from torch._vmap_internals import _vmap
    from torch.autograd.graph import _engine_run_backward

    _HAS_BATCHED_BACKWARD = True
except ImportError:  # another torch: the K passes run as a loop
    _HAS_BATCHED_BACKWARD = False


def weighted_grad(
    out: Tensor, inputs: Sequence[Tensor | GradientEdge], weight: Tensor, retain_graph: bool = False
) -> tuple:
    """``∂⟨w, out⟩/∂inputs`` (a vector-Jacobian product), ``None`` for an unused input.

    Differentiates the scalar ``Σ w ⊙ out`` rather than passing ``grad_outputs``: torch checks a
    given output gradient with its symbolic-shape machinery, whose first use imports sympy
    (seconds, and tens of MB of resident memory) — a cost no FIM should pay.
    """
    return torch.autograd.grad(
        (out * weight).sum(),
        inputs,  # type: ignore[arg-type]  # torch's stub refuses a mix of tensors and edges
        retain_graph=retain_graph,
        allow_unused=True,
    )


def batched_weighted_grads(
    out: Tensor,
    inputs: Sequence[Tensor | GradientEdge],
    weights: Tensor,
    retain_graph: bool = False,
) -> tuple | None:
    """All K vector-Jacobian products ``∂⟨w_k, out⟩/∂inputs`` for ``weights`` ``(K, *out.shape)``
    in one batched backward pass: ``(K, *input.shape)`` per input (``None`` where unused).

    This is the pass ``torch.autograd.grad(..., is_grads_batched=True)`` runs (autograd's own
    batching rules over the backward graph), called without ``grad``'s check of the given
    output gradients, whose first use imports sympy (see :func:`weighted_grad`). Returns None
    where this torch lacks those internals; the caller then loops over the K passes."""
    if not _HAS_BATCHED_BACKWARD:
        return None

    def vjp(w: Tensor) -> tuple:
        return _engine_run_backward(
            (out,), (w,), retain_graph, False, tuple(inputs), True, accumulate_grad=False
        )

    return _vmap(vjp, 0, 0, allow_none_pass_through=True)(weights)


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
        positions_mask: Tensor | None = None,
    ) -> None:
        self.n, self.k = n, k
        #: ``(n, T)``: 1 for real, 0 for padded sequence positions (see :mod:`.inputs`), or None.
        self.positions_mask = positions_mask
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
