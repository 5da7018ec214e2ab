"""Datasets from safetensors (``inputs``, optional ``targets``) and their loaders.

The spec carries loader parameters (batch size, subset, seed), never a loader object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from fimntk.worker.errors import JobInputError


def make_loader(
    path: Path, params: dict[str, Any], dtype: torch.dtype, field: str, needs_targets: bool
) -> DataLoader:
    """A deterministic loader over a dataset file.

    Args:
        path: Safetensors file with ``inputs`` and optional ``targets``.
        params: The spec's ``dataset`` (``batch_size``, ``subset``, ``seed``).
        dtype: dtype floating inputs (and regression targets) are cast to.
        field: Spec field of the dataset, for errors.
        needs_targets: Whether the metric needs targets (empirical Fisher).

    Returns:
        A loader of ``(x,)`` or ``(x, y)`` batches, in a fixed order.

    Raises:
        JobInputError: Missing targets, non-finite inputs, or a subset larger than the data.
    """
    tensors = load_file(str(path), device="cpu")
    inputs = tensors["inputs"]
    targets = tensors.get("targets")
    if needs_targets and targets is None:
        raise JobInputError("the empirical Fisher needs 'targets' in the dataset", field)
    if inputs.is_floating_point():
        if not torch.isfinite(inputs).all():
            raise JobInputError("dataset inputs hold NaN or infinite values", field)
        inputs = inputs.to(dtype)
    if targets is not None and targets.is_floating_point():
        targets = targets.to(dtype)
    n = inputs.shape[0]
    subset = params.get("subset")
    if subset is not None:
        if subset > n:
            raise JobInputError(f"subset {subset} exceeds the {n} examples", "dataset.subset")
        gen = torch.Generator().manual_seed(int(params.get("seed", 0)))
        index = torch.randperm(n, generator=gen)[:subset].sort().values
        inputs = inputs[index]
        targets = targets[index] if targets is not None else None
    parts = (inputs,) if targets is None else (inputs, targets)
    return DataLoader(TensorDataset(*parts), batch_size=int(params["batch_size"]), shuffle=False)
