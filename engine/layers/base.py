"""What the engine knows about one layer: its parameters and its gradient kernels.

A *kernel* turns what the hooks capture for a module — its input ``x`` of shape ``(n, ...)`` and
the gradients ``gy`` of K pseudo-outputs with respect to its output, shape ``(K, n, ...)`` — into
per-example quantities without a Python loop over examples:

* ``per_example_grads(x, gy)``: ``(K, n, d_l)``, the flat gradient of each pseudo-output of each
  example with respect to the layer's parameters, in parameter order (weight, then bias);
* ``sq_grad_sum(x, gy)``: ``(d_l,)``, ``Σ_{k,i} (∂_θ f_{k,i})²``, the diagonal's numerator;
* ``gram(x1, gy1, x2, gy2)``: ``(K, n1, K, n2)``, inner products of per-example gradients.

The defaults build per-example gradients; kernels override the others where a layer allows a
cheaper formula (e.g. Linear: ``(A Aᵀ) ⊙ (G Gᵀ)``, Novak et al. 2022).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn


class LayerKernel(ABC):
    """Per-example gradient maths of one module type.

    Args:
        module: the module whose own parameters (``recurse=False``) the kernel differentiates.
    """

    #: Names of the module attributes holding its parameters, in the engine's order.
    param_attrs: tuple[str, ...] = ("weight", "bias")

    #: Whether the output is ``f(x; W, b) = L_W(x) + b`` with ``L_W`` linear in ``x`` (Linear,
    #: Conv, ConvTranspose): forward mode then takes ``L_W(t_x)`` for the input's tangent.
    input_linear: bool = False
    #: Whether the output is linear in the layer's own parameters with no offset (Linear, Conv,
    #: Embedding, affine normalisations): forward mode then adds ``f(x; t)`` for a parameter
    #: tangent ``t`` (:mod:`fimntk.engine.generator.tangents`); else its parameters are made dual.
    forward_by_parameters: bool = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this kernel handles this instance (configuration included)."""
        return True

    def check(self) -> None:
        """Raise an ``InvalidInputError`` when per-example gradients are not defined."""
        return None

    def carries_examples(self, x: object, n: int) -> bool:
        """Whether the captured input ``x`` holds the batch's ``n`` examples along its first
        dimension, as the kernels read it. A layer applied to a tensor shared by the batch (BERT's
        position embeddings looked up with a batch dimension of 1 and broadcast, a layer applied
        to a parameter) does not: summing its gradient over the batch would be right, splitting it
        per example is not, so it takes the ``torch.func`` path."""
        return isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == n

    def scale_examples(self, gy: Tensor, s: Tensor) -> Tensor:
        """The output gradient ``gy`` ``(n, ...)`` with example ``i`` scaled by ``s[i]``."""
        return gy * s.reshape(-1, *([1] * (gy.dim() - 1))).to(gy.dtype)

    def parameters(self) -> list[tuple[str, Tensor]]:
        """The module's parameters handled here, ``(attribute, tensor)``, in engine order."""
        out: list[tuple[str, Tensor]] = []
        for attr in self.param_attrs:
            p = getattr(self.module, attr, None)
            if isinstance(p, nn.Parameter):
                out.append((attr, p))
        return out

    @abstractmethod
    def per_example_grads(self, x: Tensor, gy: Tensor) -> Tensor:
        """Flat per-example gradients, ``(K, n, d_l)``."""

    def grad_sum(self, x: Tensor, gy: Tensor) -> Tensor:
        """``Σ_{k,i} g_{k,i}``: the ordinary gradient of the summed pseudo-outputs, ``(d_l,)``."""
        step = max(1, _CHUNK_ELEMENTS // max(1, gy.shape[0] * self.numel()))
        total: Tensor | None = None
        for s in range(0, x.shape[0], step):
            part = self.per_example_grads(x[s : s + step], gy[:, s : s + step]).sum(dim=(0, 1))
            total = part if total is None else total + part
        assert total is not None, "no examples"
        return total

    def sq_grad_sum(self, x: Tensor, gy: Tensor) -> Tensor:
        """``Σ_{k,i} g_{k,i} ⊙ g_{k,i}`` over pseudo-outputs k and examples i, ``(d_l,)``."""
        return chunked_sq_sum(
            lambda sl: self.per_example_grads(x[sl], gy[:, sl]),
            x.shape[0],
            per_example_numel=gy.shape[0] * self.numel(),
        )

    def sq_output_sum(self, x: Tensor, gy: Tensor) -> Tensor | None:
        """Where the diagonal factors as ``F(x, Σ_k h(gy_k))``, the output-side sum
        ``Σ_k h(gy_k)``, to be added over chunks of pseudo-outputs and finished by
        :meth:`add_sq_grad_from_output_sum`; ``None`` where it does not factor."""
        return None

    def add_sq_grad_from_output_sum(self, x: Tensor, total: Tensor, out: Tensor) -> None:
        """Add ``Σ_{k,i} g_{k,i}²``, from the output-side sum of :meth:`sq_output_sum`, to
        ``out (d_l,)`` in place."""
        raise NotImplementedError

    def gram(self, x1: Tensor, gy1: Tensor, x2: Tensor, gy2: Tensor) -> Tensor:
        """Inner products of per-example gradients, ``(K, n1, K, n2)``."""
        j1 = self.per_example_grads(x1, gy1)
        j2 = j1 if x2 is x1 and gy2 is gy1 else self.per_example_grads(x2, gy2)
        return torch.einsum("kid,ljd->kilj", j1, j2)

    def add_gram(self, x1: Tensor, gy1: Tensor, x2: Tensor, gy2: Tensor, out: Tensor) -> None:
        """Add :meth:`gram` to ``out (K, n1, K, n2)`` in place (kernels may avoid the
        temporary)."""
        out.add_(self.gram(x1, gy1, x2, gy2))

    def mat_layout(self):
        """The matrix view of the parameters (:class:`~fimntk.engine.layers.layout.MatLayout`), if
        any."""
        return None

    def numel(self) -> int:
        return sum(p.numel() for _, p in self.parameters())


_CHUNK_ELEMENTS = 1 << 24


def chunked_sq_sum(grads_of: Callable[[slice], Tensor], n: int, per_example_numel: int) -> Tensor:
    """Sum of squared per-example gradients, built a chunk of examples at a time.

    Args:
        grads_of: maps a slice of examples to their gradients ``(K, n_chunk, d_l)``.
        n: number of examples.
        per_example_numel: ``K · d_l``, used to bound the memory of one chunk.
    """
    step = max(1, _CHUNK_ELEMENTS // max(1, per_example_numel))
    total: Tensor | None = None
    for start in range(0, n, step):
        g = grads_of(slice(start, start + step))
        s = (g * g).sum(dim=(0, 1))
        total = s if total is None else total + s
    assert total is not None, "no examples"
    return total
