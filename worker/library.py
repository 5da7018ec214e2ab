"""Models of torchvision and timm from ``library`` specs (:mod:`fimntk.contract.library`):
allowlisted names, no pretrained weights, each library imported only when a job names it."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from torch import nn

from fimntk.contract.arguments import ArgumentError
from fimntk.contract.library import check_library
from fimntk.worker.errors import JobInputError


def build_library(arch: Mapping[str, Any], where: str) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, **kwargs)`` or
    ``timm.create_model(name, pretrained=False, **kwargs)`` on the current device.

    Args:
        arch: A ``library`` architecture.
        where: Its field path.

    Raises:
        JobInputError: A name or argument outside the allowlist, or the library missing or
            failing to import on this worker.
    """
    try:
        kwargs = check_library(arch, where)
    except ArgumentError as exc:
        raise JobInputError(str(exc), exc.field) from None
    library, name = arch["library"], arch["name"]
    try:
        # The module name is one of the two keys of the contract's allowlist, never free text.
        module = importlib.import_module(
            "torchvision.models" if library == "torchvision" else "timm"
        )
    except Exception as exc:  # a broken install raises more than ImportError (CUDA, ABI)
        raise JobInputError(
            f"this server cannot build {library} models ({type(exc).__name__}): install "
            f"{library} on its workers, or send the model itself (the client traces it)",
            f"{where}.library",
        ) from None
    try:
        if library == "torchvision":
            model = module.get_model(name, weights=None, **kwargs)
        else:
            model = module.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise JobInputError(f"{library} cannot build {name}: {lines[0][:200]}", where) from None
    if not isinstance(model, nn.Module):
        raise JobInputError(f"{library} did not return a module for {name}", f"{where}.name")
    return model
