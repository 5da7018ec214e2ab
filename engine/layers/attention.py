"""``nn.MultiheadAttention`` as Linear layers: the q/k/v projections on their own inputs.

``nn.MultiheadAttention`` applies its projections functionally (``F.linear`` on
``in_proj_weight`` and ``out_proj.weight``), so no module hook sees their inputs and outputs.
During the generator's hooked passes :func:`attention_forward` replaces the module's output by a
re-computation with the same maths (Vaswani et al. 2017, "Attention is all you need"):

.. math::

    q = W_q x_q + b_q,\\quad k = W_k x_k + b_k,\\quad v = W_v x_v + b_v,\\qquad
    o = W_o \\,\\mathrm{concat}_h\\big(\\mathrm{softmax}(q_h k_hᵀ/\\sqrt{d_h} + M)\\, v_h\\big)
        + b_o,

in which the projections' outputs form one tensor ``y`` whose gradient the hooks capture, and
``out_proj`` is called as a module (its own Linear kernel then sees it). The kernel turns
``(inputs, ∂/∂y)`` into per-example gradients of ``in_proj_weight`` (or ``q/k/v_proj_weight``),
``in_proj_bias``, ``bias_k`` and ``bias_v``: each projection is a Linear layer whose positions are
the sequence steps, as in "Kronecker-Factored Approximate Curvature for Modern Neural Network
Architectures" (Eschenhagen, Immer, Turner, Schneider & Hennig, NeurIPS 2023), where KFAC's
``expand``/``reduce`` treat the sequence dimension.

Layout of ``y`` (batch first, ``(n, ..., E)``):

* self-attention with packed weights and no ``bias_k``/``bias_v`` (``query is key is value``):
  ``y = x W_inᵀ + b_in``, ``(n, L, 3E)`` — one Linear ``E → 3E``; the capture's input is ``x``;
* otherwise ``y = [q; k; v]`` stacked along the sequence, ``(n, L + 2S', E)`` with
  ``S' = S + 1`` when ``bias_k``/``bias_v`` are appended; the capture's input is
  :class:`AttentionInputs`.

With packed weights (and no ``bias_k``/``bias_v``) the three projections are the three groups
of a ``(3, E, E + 1)`` matrix view, so KFAC, EKFAC and the quasi-diagonal hold one Kronecker
block per projection; when ``L ≠ S`` the groups' positions are zero-padded to one length and
:meth:`MultiheadAttentionKernel.group_positions` gives each group's own count.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.layers.base import LayerKernel, chunked_sq_sum
from fimntk.engine.layers.layout import MatLayout
from fimntk.engine.layers.outer_product import OuterKernel

#: ``record(x, y) -> y``: called with each projection site's input and output.
Record = Callable[["Tensor | AttentionInputs", Tensor], Tensor]

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


@dataclass(frozen=True)
class AttentionInputs:
    """The inputs of the three projections, batch first: ``(n, L, E_q)``, ``(n, S, k_dim)``,
    ``(n, S, v_dim)``."""

    query: Tensor
    key: Tensor
    value: Tensor

    def detach(self) -> AttentionInputs:
        return AttentionInputs(self.query.detach(), self.key.detach(), self.value.detach())

    @property
    def shape(self) -> torch.Size:
        """The query's shape: its first dimension counts the examples."""
        return self.query.shape

    def __getitem__(self, rows: slice) -> AttentionInputs:
        return AttentionInputs(self.query[rows], self.key[rows], self.value[rows])


def bind_call(args: tuple, kwargs: dict) -> dict:
    """The arguments of one ``MultiheadAttention.forward`` call by name, defaults filled in."""
    bound = _SIGNATURE.bind(None, *args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop("self")
    return out


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True = not attended) as ``-inf``/0 to add to the scores; a float mask
    as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    return mask.to(dtype)


def _padded(mask: Tensor | None) -> Tensor | None:
    """One more attended key position (``bias_k`` or a zero key) at the end."""
    return None if mask is None else F.pad(mask, (0, 1))


def _projection_weights(m: nn.MultiheadAttention, params: dict[str, Tensor]) -> list[Tensor]:
    if m._qkv_same_embed_dim:
        return list(params["in_proj_weight"].chunk(3))
    return [params["q_proj_weight"], params["k_proj_weight"], params["v_proj_weight"]]


def self_attention_packed(m: nn.MultiheadAttention, call: dict) -> bool:
    """Whether one Linear ``E → 3E`` on one input computes q, k and v."""
    q = call["query"]
    return m._qkv_same_embed_dim and m.bias_k is None and q is call["key"] is call["value"]


def replay_attention(
    m: nn.Module,
    args: tuple,
    kwargs: dict,
    params: dict[str, Tensor],
    record: Record,
) -> tuple[Tensor, Tensor | None]:
    """:func:`attention_forward` on a call's positional and keyword arguments."""
    assert isinstance(m, nn.MultiheadAttention)
    return attention_forward(m, bind_call(args, kwargs), params, record)


def attention_forward(
    m: nn.MultiheadAttention, call: dict, params: dict[str, Tensor], record: Record
) -> tuple[Tensor, Tensor | None]:
    """``m``'s forward on the bound ``call`` with the projections' parameters ``params``
    (``{attribute: tensor}``), passing the projections' inputs and output through ``record``.

    Returns what ``m(**call)`` returns: the output (``(n, L, E)`` batch first, else
    ``(L, n, E)``) and the attention weights (``(n, L, S)``, per head ``(n, H, L, S)`` without
    ``average_attn_weights``) or ``None`` without ``need_weights``.
    """
    query, key, value = call["query"], call["key"], call["value"]
    if query.dim() != 3:
        raise InvalidInputError(
            "MultiheadAttention got an unbatched query: per-example gradients need a batch "
            "dimension; give inputs of shape (n, L, E) (batch_first) or (L, n, E)"
        )
    if call["is_causal"] and call["attn_mask"] is None:
        raise InvalidInputError(
            "MultiheadAttention(is_causal=True) needs attn_mask: pass the causal mask too"
        )
    packed = self_attention_packed(m, call)
    first = (lambda t: t) if m.batch_first else (lambda t: t.transpose(0, 1))
    xq, xk, xv = first(query), first(key), first(value)
    n, length, e = xq.shape[0], xq.shape[1], m.embed_dim
    bias = params.get("in_proj_bias")
    biases = [None] * 3 if bias is None else list(bias.chunk(3))
    if packed:
        q, k, v = record(xq, F.linear(xq, params["in_proj_weight"], bias)).chunk(3, dim=-1)
    else:
        ws = _projection_weights(m, params)
        q, k, v = (F.linear(x, w, b) for x, w, b in zip((xq, xk, xv), ws, biases))
        if m.bias_k is not None:
            k = torch.cat([k, params["bias_k"].reshape(1, 1, e).expand(n, 1, e)], dim=1)
            v = torch.cat([v, params["bias_v"].reshape(1, 1, e).expand(n, 1, e)], dim=1)
        y = record(AttentionInputs(xq, xk, xv), torch.cat([q, k, v], dim=1))
        q, k, v = y.split([length, k.shape[1], v.shape[1]], dim=1)
    scores_dtype = q.dtype
    attn_mask = _additive(call["attn_mask"], scores_dtype)
    pad_mask = _additive(call["key_padding_mask"], scores_dtype)
    if m.bias_k is not None:
        attn_mask, pad_mask = _padded(attn_mask), _padded(pad_mask)
    if m.add_zero_attn:
        k = torch.cat([k, k.new_zeros(n, 1, e)], dim=1)
        v = torch.cat([v, v.new_zeros(n, 1, e)], dim=1)
        attn_mask, pad_mask = _padded(attn_mask), _padded(pad_mask)
    heads, d_h = m.num_heads, m.head_dim
    split = lambda t: t.reshape(n, t.shape[1], heads, d_h).transpose(1, 2)  # noqa: E731
    qh, kh, vh = split(q), split(k), split(v)
    mask = _scores_mask(attn_mask, pad_mask, n, heads)
    # the math kernel, written out: forward-mode AD and double backward run through it (the
    # fused CPU kernels of F.scaled_dot_product_attention have neither)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d_h)
    weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
    ctx = weights @ vh
    returned = None
    if call["need_weights"]:
        returned = weights.mean(dim=1) if call["average_attn_weights"] else weights
    out = m.out_proj(ctx.transpose(1, 2).reshape(n, length, e))
    return (out if m.batch_first else out.transpose(0, 1)), returned


def _scores_mask(
    attn_mask: Tensor | None, pad_mask: Tensor | None, n: int, heads: int
) -> Tensor | None:
    """The additive mask of the scores ``(n, H, L, S)``, broadcast where it can be."""
    mask = None
    if attn_mask is not None:
        mask = attn_mask
        if attn_mask.dim() == 3:  # (n·H, L, S)
            mask = attn_mask.reshape(n, heads, *attn_mask.shape[1:])
    if pad_mask is not None:
        pad = pad_mask.reshape(n, 1, 1, -1)
        mask = pad if mask is None else mask + pad
    return mask


#: ``replay(module, args, kwargs, params, record)``: see
#: :data:`fimntk.engine.layers.registry.REPLAYS`.
Replay = Callable[[nn.Module, tuple, dict, dict[str, Tensor], Record], Any]


class MultiheadAttentionKernel(OuterKernel):
    """Per-example gradients of the input projections of ``nn.MultiheadAttention``.

    ``out_proj`` is a layer of its own (a Linear kernel); this kernel covers ``in_proj_weight``
    (or ``q/k/v_proj_weight``), ``in_proj_bias``, ``bias_k`` and ``bias_v``. The gradient of
    projection ``p ∈ {q, k, v}`` of one pseudo-output is ``Σ_t g_{p,t} x_{p,t}ᵀ`` over its
    positions t; ``bias_k``'s (``bias_v``'s) is the gradient of the appended key (value)
    position. With a matrix view (packed weights, no ``bias_k``/``bias_v``) the outer-product
    machinery of :class:`~fimntk.engine.layers.outer_product.OuterKernel` applies to the three
    projections as groups; without one, the generic per-example routes of
    :class:`~fimntk.engine.layers.base.LayerKernel`.
    """

    input_linear = False

    param_attrs = (
        "in_proj_weight",
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "in_proj_bias",
        "bias_k",
        "bias_v",
    )

    module: nn.MultiheadAttention

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return isinstance(module.out_proj, nn.Linear)

    def check(self) -> None:
        m = self.module
        if m.training and m.dropout > 0:
            raise InvalidInputError(
                "MultiheadAttention is in train mode with dropout, so the outputs are random and "
                "the Fisher or NTK would be a random matrix: call model.eval() first"
            )

    def carries_examples(self, x: object, n: int) -> bool:
        """Whether the projections' inputs (batch first, as the re-computation captures them)
        all hold the batch's ``n`` examples along their first dimension."""
        if isinstance(x, AttentionInputs):
            return all(t.dim() == 3 and t.shape[0] == n for t in (x.query, x.key, x.value))
        return super().carries_examples(x, n)

    # ----- the projections as (input, output gradient) pairs ------------------------------
    @property
    def has_bias(self) -> bool:
        return isinstance(self.module.in_proj_bias, nn.Parameter)

    def _extra(self) -> int:
        return int(self.module.bias_k is not None)

    def sites(self, x: Tensor | AttentionInputs, gy: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``[(x_p (n, T_p, P_p), g_p (K, n, T_p, E))]`` for p = q, k, v (bias positions
        left out)."""
        e = self.module.embed_dim
        if isinstance(x, Tensor):
            return [(x, g) for g in gy.split(e, dim=-1)]
        length, s = x.query.shape[1], x.key.shape[1]
        gq, gk, gv = gy.split([length, s + self._extra(), s + self._extra()], dim=2)
        return [(x.query, gq), (x.key, gk[:, :, :s]), (x.value, gv[:, :, :s])]

    def _bias_kv_grads(self, x: AttentionInputs, gy: Tensor) -> list[Tensor]:
        """Per-example gradients of ``bias_k`` and ``bias_v``: ``(K, n, E)`` each."""
        length, s = x.query.shape[1], x.key.shape[1]
        return [gy[:, :, length + s], gy[:, :, length + 2 * s + 1]]

    def per_example_grads(self, x: Tensor | AttentionInputs, gy: Tensor) -> Tensor:
        sites = self.sites(x, gy)
        k, n = gy.shape[0], gy.shape[1]
        parts = [torch.einsum("kntq,ntp->knqp", g, a).reshape(k, n, -1) for a, g in sites]
        if self.has_bias:
            parts += [g.sum(dim=2) for _, g in sites]
        if isinstance(x, AttentionInputs) and self._extra():
            parts += self._bias_kv_grads(x, gy)
        return torch.cat(parts, dim=2)

    def grad_sum(self, x: Tensor | AttentionInputs, gy: Tensor) -> Tensor:
        sites = self.sites(x, gy)
        parts = [torch.einsum("kntq,ntp->qp", g, a).reshape(-1) for a, g in sites]
        if self.has_bias:
            parts += [g.sum(dim=(0, 1, 2)) for _, g in sites]
        if isinstance(x, AttentionInputs) and self._extra():
            parts += [g.sum(dim=(0, 1)) for g in self._bias_kv_grads(x, gy)]
        return torch.cat(parts)

    def sq_grad_sum(self, x: Tensor | AttentionInputs, gy: Tensor) -> Tensor:
        return chunked_sq_sum(
            lambda rows: self.per_example_grads(x[rows], gy[:, rows]),
            x.shape[0],
            per_example_numel=gy.shape[0] * self.numel(),
        )

    # ----- the matrix view: one group per projection ---------------------------------------
    def mat_layout(self) -> MatLayout | None:
        """``(3, E, E + bias)`` for packed weights without ``bias_k``/``bias_v``; ``None``
        otherwise (the three weights differ in width, or ``bias_k``/``bias_v`` lie outside)."""
        m = self.module
        if not m._qkv_same_embed_dim or m.bias_k is not None:
            return None
        return MatLayout(3, m.embed_dim, m.embed_dim, self.has_bias)

    def sq_output_sum(self, x: Any, gy: Tensor) -> Tensor | None:
        return None if self.mat_layout() is None else super().sq_output_sum(x, gy)

    def gram(self, x1: Any, gy1: Tensor, x2: Any, gy2: Tensor) -> Tensor:
        if self.mat_layout() is None:
            return LayerKernel.gram(self, x1, gy1, x2, gy2)
        return super().gram(x1, gy1, x2, gy2)

    def add_gram(self, x1: Any, gy1: Tensor, x2: Any, gy2: Tensor, out: Tensor) -> None:
        if self.mat_layout() is None:
            out.add_(self.gram(x1, gy1, x2, gy2))
            return
        super().add_gram(x1, gy1, x2, gy2, out)

    def inputs(self, x: Tensor | AttentionInputs) -> Tensor:
        """``a (n, 3, T, E)``: the inputs of q, k and v (a broadcast view in self-attention),
        with ``T = max(L, S)`` and zeros after a group's own positions (see
        :meth:`group_positions`)."""
        if isinstance(x, Tensor):
            return x.unsqueeze(1).expand(x.shape[0], 3, *x.shape[1:])
        t = max(x.query.shape[1], x.key.shape[1])
        return torch.stack([_pad_positions(a, t) for a in (x.query, x.key, x.value)], dim=1)

    def output_grads(self, x: Tensor | AttentionInputs, gy: Tensor) -> Tensor:
        """``g (K, n, 3, T, E)``, zero-padded like :meth:`inputs`."""
        k, n, e = gy.shape[0], gy.shape[1], self.module.embed_dim
        if isinstance(x, Tensor):
            return gy.reshape(k, n, -1, 3, e).transpose(2, 3)
        if x.query.shape[1] == x.key.shape[1]:
            return gy.reshape(k, n, 3, -1, e)
        t = max(x.query.shape[1], x.key.shape[1])
        return torch.stack([_pad_positions(g, t, dim=2) for _, g in self.sites(x, gy)], dim=2)

    def group_positions(self, x: Tensor | AttentionInputs) -> tuple[int, int, int]:
        """Real positions of the q, k and v groups: ``(L, S, S)``."""
        if isinstance(x, Tensor):
            return (x.shape[1],) * 3
        return x.query.shape[1], x.key.shape[1], x.value.shape[1]

    def positions(self, x: Tensor | AttentionInputs) -> int:
        return max(self.group_positions(x))


def _pad_positions(t: Tensor, length: int, dim: int = 1) -> Tensor:
    """``t`` with zeros appended along ``dim`` up to ``length`` positions."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)
