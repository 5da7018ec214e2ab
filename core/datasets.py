"""Named datasets: safetensors files a lab puts in ``<data_dir>/datasets/``.

A name is checked against a strict pattern and resolved inside the folder, so no name reaches
another path.
"""

from __future__ import annotations

import re
from pathlib import Path

from fimntk.core.errors import InvalidInputError

_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def dataset_path(datasets_dir: Path, name: str) -> Path:
    """Resolve a named dataset inside the data directory, refusing any escape.

    Args:
        datasets_dir: Directory of named datasets.
        name: Dataset name.

    Returns:
        Path of ``<name>.safetensors``.

    Raises:
        InvalidInputError: Invalid name, escape, or no such dataset.
    """
    if not _DATASET_NAME.match(name):
        raise InvalidInputError(f"invalid dataset name {name!r}", "dataset.name")
    root = datasets_dir.resolve()
    path = (root / f"{name}.safetensors").resolve()
    if path.parent != root:
        raise InvalidInputError(f"invalid dataset name {name!r}", "dataset.name")
    if not path.is_file():
        raise InvalidInputError(f"no dataset named {name!r}", "dataset.name")
    return path
