"""``nngeometry.object.vector``: vectors, and NNGeometry's random constructors."""

from __future__ import annotations

import torch

from fimntk.engine import FVector, LayerCollection, PVector


def random_pvector(
    layer_collection: LayerCollection,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
) -> PVector:
    """NNGeometry's ``random_pvector``: standard normal entries (float64 by default)."""
    return PVector.random(layer_collection, dtype=dtype, device=device or "cpu")


def random_fvector(
    n_samples: int, n_output: int = 1, device: str | torch.device | None = None
) -> FVector:
    """NNGeometry's ``random_fvector``: a standard normal ``(n_output, n_samples)`` vector."""
    return FVector(torch.randn(n_output, n_samples, device=device))


def random_pvector_dict(
    layer_collection: LayerCollection,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> PVector:
    """NNGeometry's ``random_pvector_dict``: as :func:`random_pvector` (a ``PVector`` here
    keeps one flat tensor and gives the per-layer view on demand)."""
    return random_pvector(layer_collection, device=device, dtype=dtype or torch.float64)


__all__ = ["FVector", "PVector", "random_fvector", "random_pvector", "random_pvector_dict"]
