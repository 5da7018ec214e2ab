"""Kernels of layers that Hugging Face ``transformers`` defines itself, recognised by their
qualified class name (the engine never imports ``transformers``).

* ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections): ``y = x W + b`` with ``W`` stored
  ``(in, out)``, i.e. a Linear layer whose weight is transposed. Per position ``t`` the gradient
  is the outer product ``g_t a_tᵀ`` of the matrix view ``[Wᵀ | b]`` ``(out, in + 1)``; the
  flat order of the parameters is the transposed one (:class:`~.layout.MatLayout`).
* ViT's embeddings (Dosovitskiy et al. 2021): ``y = [c; P(x)] + E`` with a class token ``c``
  ``(1, 1, D)`` and a position table ``E`` ``(1, L, D)`` used as raw parameters; per example
  ``∂c = gy[0]`` and ``∂E = gy``. The patch projection is a Conv2d of its own.
* RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization") as Llama, Mistral and
  Qwen2 write it: ``y = γ ⊙ x / sqrt(mean(x²) + ε)`` over the last dimension, the statistic in
  float32; ``torch.nn.RMSNorm`` over its ``normalized_shape``. Per example
  ``∂γ = Σ_pos gy ⊙ x̂``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fimntk.engine.layers.base import LayerKernel
from fimntk.engine.layers.layout import MatLayout
from fimntk.engine.layers.norm import AffineNormKernel
from fimntk.engine.layers.outer_product import OuterKernel


class Conv1DKernel(OuterKernel):
    """``transformers``' ``Conv1D`` on inputs ``(n, ..., in)``: positions are the middle
    dimensions, as for ``nn.Linear``."""

    def _layout(self) -> MatLayout:
        w = self.module.weight
        assert isinstance(w, Tensor)
        return MatLayout(1, w.shape[1], w.shape[0], self.has_bias, transposed=True)

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        w = getattr(module, "weight", None)
        return isinstance(w, Tensor) and w.dim() == 2

    def inputs(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], 1, -1, x.shape[-1])

    def output_grads(self, x: Tensor, gy: Tensor) -> Tensor:
        return gy.reshape(gy.shape[0], x.shape[0], 1, -1, gy.shape[-1])

    def weight_from_outer(self, gw: Tensor) -> Tensor:
        return gw.transpose(-1, -2).reshape(*gw.shape[:-3], -1)

    def outer_view(self, flat_w: Tensor, groups: int, q: int, p: int) -> Tensor:
        return flat_w.view(groups, p, q).transpose(-1, -2)


class RMSNormKernel(AffineNormKernel):
    """RMSNorm with a scale only: ``x̂ = x / sqrt(mean(x²) + ε)`` over the trailing dimensions,
    computed as the module computes it (Llama-style modules in float32, then in ``x``'s dtype)."""

    param_attrs = ("weight",)

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return isinstance(getattr(module, "weight", None), nn.Parameter)

    def _trailing(self) -> int:
        shape = getattr(self.module, "normalized_shape", None)
        return len(shape) if shape is not None else 1

    def _eps(self, x: Tensor) -> float:
        eps = getattr(self.module, "variance_epsilon", getattr(self.module, "eps", None))
        return float(torch.finfo(x.dtype).eps) if eps is None else float(eps)

    def normalized(self, x: Tensor) -> Tensor:
        dims = tuple(range(x.dim() - self._trailing(), x.dim()))
        if isinstance(self.module, nn.RMSNorm):
            return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + self._eps(x))
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + self._eps(x))
        return h.to(x.dtype)

    def param_dims(self, x: Tensor) -> tuple[int, ...]:
        k = self._trailing()
        return tuple(range(x.dim() - k, x.dim()))


class ViTEmbeddingsKernel(LayerKernel):
    """The class token and the position table of ViT's embeddings (no mask token)."""

    param_attrs = ("cls_token", "position_embeddings")
    forward_by_parameters = False  # y also holds the patch projection: not linear in (c, E)

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return getattr(module, "mask_token", None) is None

    def per_example_grads(self, x: Tensor, gy: Tensor) -> Tensor:
        k, n = gy.shape[0], gy.shape[1]
        return torch.cat([gy[:, :, 0, :], gy.reshape(k, n, -1)], dim=2)


#: Layers of ``transformers`` by ``(module, class name)``: exactly these classes, whose forward
#: is known to be the formula above (Gemma's RMSNorm scales by ``1 + γ`` and is not listed).
KERNELS_BY_NAME: dict[tuple[str, str], type[LayerKernel]] = {
    ("transformers.models.vit.modeling_vit", "ViTEmbeddings"): ViTEmbeddingsKernel,
    ("transformers.pytorch_utils", "Conv1D"): Conv1DKernel,
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"): RMSNormKernel,
    ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm"): RMSNormKernel,
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"): RMSNormKernel,
}
