"""A lab's builder module, as ``FIMNTK_BUILDER_MODULES`` names it for the client tests."""

from __future__ import annotations

import torch
from torch import nn


class TwoTower(nn.Module):
    """Two Linear towers on the same input, summed: not an ``nn.Sequential``."""

    def __init__(self, in_features: int, out_features: int, hidden: int = 5) -> None:
        super().__init__()
        self.left = nn.Sequential(
            nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, out_features)
        )
        self.right = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(x) + self.right(x)


def two_tower(in_features: int, out_features: int, hidden: int = 5) -> nn.Module:
    """A :class:`TwoTower`."""
    return TwoTower(in_features, out_features, hidden)


BUILDERS = {"two_tower": two_tower}
