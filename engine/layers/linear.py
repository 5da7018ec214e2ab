"""Kernel of ``nn.Linear``: one outer product per position."""

from __future__ import annotations

from torch import Tensor, nn

from fimntk.engine.layers.layout import MatLayout
from fimntk.engine.layers.outer_product import OuterKernel


class LinearKernel(OuterKernel):
    """``nn.Linear`` on inputs ``(n, ..., d_in)``: positions are the middle dimensions."""

    module: nn.Linear

    def _layout(self) -> MatLayout:
        m = self.module
        return MatLayout(1, m.out_features, m.in_features, self.has_bias)

    def inputs(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], 1, -1, x.shape[-1])

    def output_grads(self, x: Tensor, gy: Tensor) -> Tensor:
        return gy.reshape(gy.shape[0], x.shape[0], 1, -1, gy.shape[-1])
