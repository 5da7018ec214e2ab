"""The shared kernel of layers whose weight gradient is a sum of outer products.

For Linear, Conv, ConvTranspose and Embedding the gradient of one pseudo-output with respect to
the weight of group ``γ`` is

.. math::

    \\nabla_{W_γ} f = \\sum_{t} g_{γ t} a_{γ t}^\\top, \\qquad g_{γt} ∈ ℝ^Q,\\; a_{γt} ∈ ℝ^P,

summed over the positions ``t`` (sequence steps, output pixels). A kernel only says how to read
``a`` of shape ``(n, G, T, P)`` and ``g`` of shape ``(K, n, G, T, Q)`` off the captured input and
output gradient (:mod:`.linear`, :mod:`.conv`, :mod:`.embedding`); this module does the rest
once:

* per-example gradients: ``einsum('kngtq,ngtp->kngqp')``;
* the diagonal without per-example gradients when ``T = 1``: ``Σ (g ⊙ g)ᵀ (a ⊙ a)``;
* the Gram matrix ``Σ_{t,s} (a_t·a'_s)(g_t·g'_s)`` without per-example gradients when it is the
  cheaper route (for Linear on 2-D inputs it is ``(A Aᵀ) ⊙ (G Gᵀ)``), following "Fast Finite
  Width Neural Tangent Kernel" (Novak, Sohl-Dickstein & Schoenholz, ICML 2022).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fimntk.engine.layers.base import LayerKernel
from fimntk.engine.layers.layout import MatLayout

# Largest intermediate (elements) the structured Gram may build before the Jacobian route wins.
_GRAM_MAX_ELEMENTS = 1 << 26

#: Bytes of ``a ⊙ a`` formed at once by :meth:`OuterKernel.add_sq_grad_from_output_sum`.
_SQUARE_CHUNK_BYTES = 1 << 18


class OuterKernel(LayerKernel):
    """Base of the outer-product layers; subclasses implement :meth:`inputs` and
    :meth:`output_grads`."""

    input_linear = True

    def inputs(self, x: Tensor) -> Tensor:
        """The input side ``a (n, G, T, P)``; it does not depend on the pseudo-output, so
        callers that see several chunks of pseudo-outputs of one batch compute it once."""
        raise NotImplementedError

    def output_grads(self, x: Tensor, gy: Tensor) -> Tensor:
        """The output side ``g (K, n, G, T, Q)``."""
        raise NotImplementedError

    def outer(self, x: Tensor, gy: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``a (n, G, T, P)`` and ``g (K, n, G, T, Q)``."""
        return self.inputs(x), self.output_grads(x, gy)

    def weight_from_outer(self, gw: Tensor) -> Tensor:
        """Map ``(..., G, Q, P)`` outer-product gradients to the flat weight ``(..., d_w)``."""
        return gw.reshape(*gw.shape[:-3], -1)

    def outer_view(self, flat_w: Tensor, groups: int, q: int, p: int) -> Tensor:
        """The inverse of :meth:`weight_from_outer` as a view: the flat weight ``(d_w,)`` seen
        as ``(G, Q, P)``, so that writing the view writes the flat vector."""
        return flat_w.view(groups, q, p)

    def bias_grad(self, gy: Tensor, g: Tensor) -> Tensor:
        """Per-example bias gradient ``(K, n, d_b)``; by default ``Σ_t g_t``."""
        return g.sum(dim=3).reshape(g.shape[0], g.shape[1], -1)

    @property
    def has_bias(self) -> bool:
        return isinstance(getattr(self.module, "bias", None), nn.Parameter)

    #: Whether the bias gradient is ``Σ_t g_t`` so that it folds into the input factor.
    bias_folds = True

    def mat_layout(self) -> MatLayout | None:
        """The ``(groups, Q, P + bias)`` view of the parameters, when the bias folds."""
        if self.has_bias and not self.bias_folds:
            return None
        return self._layout()

    def _layout(self) -> MatLayout:
        raise NotImplementedError

    def per_example_grads(self, x: Tensor, gy: Tensor) -> Tensor:
        a, g = self.outer(x, gy)
        gw = self.weight_from_outer(torch.einsum("kngtq,ngtp->kngqp", g, a))
        if self.has_bias:
            return torch.cat([gw, self.bias_grad(gy, g)], dim=2)
        return gw

    def grad_sum(self, x: Tensor, gy: Tensor) -> Tensor:
        a, g = self.outer(x, gy)
        w = self.weight_from_outer(torch.einsum("ngtq,ngtp->gqp", g.sum(0), a))
        if self.has_bias:
            return torch.cat([w, self.bias_grad(gy, g).sum(dim=(0, 1))])
        return w

    def sq_grad_sum(self, x: Tensor, gy: Tensor) -> Tensor:
        part = self.sq_output_sum(x, gy)
        if part is not None:
            out = part.new_zeros(self.numel())
            self.add_sq_grad_from_output_sum(x, part, out)
            return out
        return super().sq_grad_sum(x, gy)

    def sq_output_sum(self, x: Tensor, gy: Tensor) -> Tensor | None:
        """With one position (``T = 1``) the gradient is ``g aᵀ`` and its square ``g² (a²)ᵀ``:
        the output side ``Σ_k g²``, ``(n, G, Q)``. The bias gradient is ``g`` itself where the
        bias folds (not for a transposed convolution, whose bias sums ``g`` over the kernel)."""
        if self.positions(x) != 1 or (self.has_bias and not self.bias_folds):
            return None
        g = self.output_grads(x, gy)[:, :, :, 0]
        return (g * g).sum(dim=0)

    def positions(self, x: Tensor) -> int:
        """T: positions per example (sequence steps, pixels) of input ``x``."""
        return self.inputs(x).shape[2]

    def add_sq_grad_from_output_sum(self, x: Tensor, total: Tensor, out: Tensor) -> None:
        """``out_w += Σ_i total_iᵀ (a_i ⊙ a_i)`` per group, straight into the flat buffer (no
        ``(G, Q, P)`` temporary, ``a ⊙ a`` in blocks of :data:`_SQUARE_CHUNK_BYTES`);
        ``out_b += Σ_i total_i``."""
        a = self.inputs(x)[:, :, 0]
        n, groups, q = total.shape
        p = a.shape[-1]
        w = self.outer_view(out[: groups * q * p], groups, q, p)
        tt, at = total.permute(1, 2, 0), a.transpose(0, 1)
        step = max(1, _SQUARE_CHUNK_BYTES // max(1, a[0].numel() * a.element_size()))
        for s in range(0, n, step):  # a ⊙ a a few rows at a time
            w.baddbmm_(tt[..., s : s + step], at[:, s : s + step].square())
        if self.has_bias:
            out[groups * q * p :].add_(total.sum(dim=0).reshape(-1))

    def gram(self, x1: Tensor, gy1: Tensor, x2: Tensor, gy2: Tensor) -> Tensor:
        a1, g1 = self.outer(x1, gy1)
        a2, g2 = (a1, g1) if (x2 is x1 and gy2 is gy1) else self.outer(x2, gy2)
        k, n1, grp, t, q = g1.shape
        n2, p = a2.shape[0], a1.shape[3]
        structured = n1 * n2 * grp * t * t * (p + k * k * q)
        jacobian = k * (n1 + n2) * grp * t * p * q + k * k * n1 * n2 * grp * p * q
        if structured > jacobian or k * k * n1 * n2 * grp * t > _GRAM_MAX_ELEMENTS:
            return super().gram(x1, gy1, x2, gy2)
        out = g1.new_zeros(k, n1, k, n2)
        for step in range(t):
            aa = torch.einsum("igp,jgsp->ijgs", a1[:, :, step], a2)
            gg = torch.einsum("kigq,ljgsq->kiljgs", g1[:, :, :, step], g2)
            out += (gg * aa[None, :, None]).sum(dim=(-2, -1))
        if self.has_bias:
            b1 = self.bias_grad(gy1, g1)
            b2 = b1 if (x2 is x1 and gy2 is gy1) else self.bias_grad(gy2, g2)
            out += torch.einsum("kib,ljb->kilj", b1, b2)
        return out

    def add_gram(self, x1: Tensor, gy1: Tensor, x2: Tensor, gy2: Tensor, out: Tensor) -> None:
        """With one position (``T = 1``) and a folding bias the Gram of layer ``g ãᵀ`` is
        ``(g₁·g₂)(a₁·a₂ + 1)``: per group one product of the output sides, multiplied into
        ``out`` by ``addcmul_`` (no zero-filled, summed or added ``(K, n1, K, n2)`` temporaries);
        otherwise :meth:`gram`."""
        a1, g1 = self.outer(x1, gy1)
        a2, g2 = (a1, g1) if (x2 is x1 and gy2 is gy1) else self.outer(x2, gy2)
        k, n1, grp, t, q = g1.shape
        n2 = a2.shape[0]
        if (
            t != 1
            or (self.has_bias and not self.bias_folds)
            or k * k * n1 * n2 > _GRAM_MAX_ELEMENTS
        ):
            out.add_(self.gram(x1, gy1, x2, gy2))
            return
        aa = torch.einsum("igp,jgp->gij", a1[:, :, 0], a2[:, :, 0])  # (G, n1, n2)
        if self.has_bias:
            aa += 1
        for gi in range(grp):
            left = g1[:, :, gi, 0].reshape(k * n1, q)
            right = left if g2 is g1 else g2[:, :, gi, 0].reshape(k * n2, q)
            gg = (left @ right.t()).view(k, n1, k, n2)
            out.addcmul_(gg, aa[gi][None, :, None, :])
