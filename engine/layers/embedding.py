"""Kernel of ``nn.Embedding``: one-hot inputs, so outer products are row scatters."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fimntk.engine.layers.layout import MatLayout
from fimntk.engine.layers.outer_product import OuterKernel


class EmbeddingKernel(OuterKernel):
    """``nn.Embedding``: ``a`` is the one-hot token, so ``a·a'`` tests token equality."""

    module: nn.Embedding

    param_attrs = ("weight",)
    input_linear = False

    def _layout(self) -> MatLayout:
        m = self.module
        return MatLayout(1, m.embedding_dim, m.num_embeddings, False, transposed=True)

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return not module.sparse and module.max_norm is None and not module.scale_grad_by_freq

    def inputs(self, x: Tensor) -> Tensor:
        m = self.module
        a = F.one_hot(x.reshape(x.shape[0], -1), m.num_embeddings).to(m.weight.dtype)
        if m.padding_idx is not None:
            a[..., m.padding_idx] = 0
        return a.unsqueeze(1)

    def output_grads(self, x: Tensor, gy: Tensor) -> Tensor:
        return gy.reshape(gy.shape[0], x.shape[0], 1, -1, self.module.embedding_dim)

    def positions(self, x: Tensor) -> int:
        return x[0].numel()

    def weight_from_outer(self, gw: Tensor) -> Tensor:
        return gw.transpose(-1, -2).reshape(*gw.shape[:-3], -1)

    def outer_view(self, flat_w: Tensor, groups: int, q: int, p: int) -> Tensor:
        return flat_w.view(groups, p, q).transpose(-1, -2)

    @property
    def has_bias(self) -> bool:
        return False
