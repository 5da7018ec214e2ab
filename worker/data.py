"""Datasets from safetensors (``inputs``, or dictionary inputs ``inputs.<key>``, and optional
``targets``) and their loaders.

The spec carries loader parameters (batch size, subset, seed), never a loader object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fimntk.contract.vocabulary import DICT_INPUT
from fimntk.worker.errors import JobInputError


def make_loader(
    path: Path, params: dict[str, Any], dtype: torch.dtype, field: str, needs_targets: bool
) -> DataLoader:
    """A deterministic loader over a dataset file.

    Args:
        path: Safetensors file with ``inputs`` (or ``inputs.<key>``) and optional ``targets``.
        params: The spec's ``dataset`` (``batch_size``, ``subset``, ``seed``).
        dtype: dtype floating inputs (and regression targets) are cast to.
        field: Spec field of the dataset, for errors.
        needs_targets: Whether the metric needs targets (empirical Fisher).

    Returns:
        A loader of ``(x,)`` or ``(x, y)`` batches (``x`` a dictionary for dictionary
        inputs), in a fixed order.

    Raises:
        JobInputError: Missing targets, non-finite inputs, or a subset larger than the data.
    """
    tensors = load_file(str(path), device="cpu")
    targets = tensors.pop("targets", None)
    if needs_targets and targets is None and "inputs.labels" not in tensors:
        raise JobInputError("the empirical Fisher needs 'targets' in the dataset", field)
    if any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors.values()):
        raise JobInputError("dataset inputs hold NaN or infinite values", field)
    inputs = split_inputs(tensors, dtype)
    if targets is not None and targets.is_floating_point():
        targets = targets.to(dtype)
    n = targets.shape[0] if targets is not None else next(iter(tensors.values())).shape[0]
    subset = params.get("subset")
    index = None
    if subset is not None:
        if subset > n:
            raise JobInputError(f"subset {subset} exceeds the {n} examples", "dataset.subset")
        gen = torch.Generator().manual_seed(int(params.get("seed", 0)))
        index = torch.randperm(n, generator=gen)[:subset].sort().values
    dataset = Examples(inputs, targets, index)
    return DataLoader(dataset, batch_size=int(params["batch_size"]), shuffle=False)


def split_inputs(tensors: dict[str, Tensor], dtype: torch.dtype) -> Tensor | dict[str, Tensor]:
    """The ``inputs`` tensor, or the dictionary of ``inputs.<key>`` tensors, of a dataset or
    probe blob (already checked by the API), floating ones in ``dtype``."""
    cast = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    if "inputs" in cast:
        return cast["inputs"]
    return {
        match.group(1): t for k, t in cast.items() if (match := DICT_INPUT.match(k)) is not None
    }


class Examples(Dataset[Any]):
    """Examples ``(x,)`` or ``(x, y)``, ``x`` a tensor or a dictionary of tensors (collated
    into dictionary batches), optionally restricted to ``index``."""

    def __init__(
        self,
        inputs: Tensor | dict[str, Tensor],
        targets: Tensor | None,
        index: Tensor | None,
    ) -> None:
        if index is not None:
            inputs = (
                {k: t[index] for k, t in inputs.items()}
                if isinstance(inputs, dict)
                else inputs[index]
            )
            targets = targets[index] if targets is not None else None
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        first = next(iter(self.inputs.values())) if isinstance(self.inputs, dict) else self.inputs
        return int(first.shape[0])

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        x: Any = (
            {k: t[i] for k, t in self.inputs.items()}
            if isinstance(self.inputs, dict)
            else self.inputs[i]
        )
        return (x,) if self.targets is None else (x, self.targets[i])
