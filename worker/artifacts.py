"""Writing job outputs: tensors and kept representations, as safetensors artifacts.

Representations go through ``fimntk.engine.save``/``fimntk.engine.load`` when the engine provides
them; tensors are written here with ``safetensors.torch.save_file`` (one tensor named ``value``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from safetensors.torch import save_file

from fimntk import engine
from fimntk.core.storage.artifacts import ArtifactStore


def save_tensor(
    store: ArtifactStore, job_id: str, name: str, tensor: torch.Tensor
) -> dict[str, Any]:
    """Publish a tensor artifact and describe it for the result document.

    Returns:
        ``{"artifact", "shape", "dtype"}``.
    """
    staged = store.staging_path(job_id, name)
    value = tensor.detach().to("cpu").contiguous()
    try:
        save_file({"value": value}, str(staged), metadata={"job": job_id})
        store.publish(job_id, name, staged)
    finally:
        staged.unlink(missing_ok=True)  # published files were moved away; failures removed
    return {"artifact": name, "shape": list(value.shape), "dtype": str(value.dtype)[6:]}


def scalar(value: torch.Tensor | float) -> float | str:
    """A 0-d tensor or number as JSON: a float, or ``"nan"``/``"inf"``/``"-inf"``."""
    number = float(value.item() if isinstance(value, torch.Tensor) else value)
    return number if math.isfinite(number) else str(number)


def can_persist() -> bool:
    """Whether the engine can save and load representations."""
    return hasattr(engine, "save") and hasattr(engine, "load")


def save_representation(
    store: ArtifactStore, job_id: str, representation: Any, metadata: dict[str, str]
) -> str:
    """Persist a representation with ``fimntk.engine.save``.

    Returns:
        The artifact name.
    """
    name = "representation"
    staged = store.staging_path(job_id, name)
    try:
        engine.save(representation, staged, metadata=metadata)
        store.publish(job_id, name, staged)
    finally:
        staged.unlink(missing_ok=True)
    return name


def load_representation(store: ArtifactStore, job_id: str) -> Any:
    """Load a representation kept by ``job_id``.

    Raises:
        NotFoundError: The job kept none on disk.
    """
    return engine.load(store.path(job_id, "representation"))
