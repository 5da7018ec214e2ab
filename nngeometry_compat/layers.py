"""``nngeometry.layers``: the normalised layers NNGeometry's models use, so those models load.

They are parts of a model, not of the Fisher: the engine differentiates them like any custom
module (the ``torch.func`` path). Same parameters (names and shapes) as NNGeometry's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _unit_rows(w: Tensor, eps: float) -> Tensor:
    """``w`` with each output row (dimension 0) divided by ``√(‖row‖² + eps)``."""
    dims = tuple(range(1, w.dim()))
    return w / torch.sqrt(w.pow(2).sum(dim=dims, keepdim=True) + eps)


class WeightNorm1d(nn.Linear):
    """``y = x Ŵᵀ`` with the rows of ``Ŵ`` of norm 1 (no bias)."""

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-5) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.eps = eps

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, _unit_rows(self.weight, self.eps))


class Cosine1d(WeightNorm1d):
    """``y_k = ⟨x/‖x‖, w_k/‖w_k‖⟩``: cosine similarities between the input and each row."""

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(_unit_rows(input, self.eps))


class WeightNorm2d(nn.Conv2d):
    """A ``Conv2d`` without bias whose filters are each of norm 1."""

    def __init__(self, *args: Any, eps: float = 1e-5, **kwargs: Any) -> None:
        if kwargs.get("bias", False):
            raise ValueError("WeightNorm2d has no bias: leave bias out")
        kwargs["bias"] = False
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, _unit_rows(self.weight, self.eps), None)


class Affine1d(nn.Module):
    """``y = x ⊙ γ + β`` per feature (γ starts at 1, β at 0), as BatchNorm's affine part."""

    def __init__(
        self,
        num_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = (
            nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype)) if bias else None
        )

    def forward(self, input: Tensor) -> Tensor:
        out = input * self.weight
        return out if self.bias is None else out + self.bias
