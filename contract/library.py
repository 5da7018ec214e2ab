"""The library spec: ``{"kind": "library", "library": "torchvision", "name": "resnet18",
"kwargs": {"num_classes": 10}}``, checked without the libraries.

The server builds ``torchvision.models.get_model(name, weights=None, **kwargs)`` or
``timm.create_model(name, pretrained=False, **kwargs)``: no pretrained weights are fetched (the
client sends its own), names come from an allowlist per library and the keyword arguments are
typed and bounded. Optional on the server: a worker without the library refuses the job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fimntk.contract.arguments import MAX_FEATURES, ArgumentError, Int, Signature

#: Model names each library may build (architectures whose layers the engine knows).
LIBRARY_MODELS: dict[str, frozenset[str]] = {
    "torchvision": frozenset(
        {
            "resnet18",
            "resnet34",
            "resnet50",
            "wide_resnet50_2",
            "resnext50_32x4d",
            "vgg11",
            "vgg11_bn",
            "vgg16",
            "vgg16_bn",
            "mobilenet_v2",
            "densenet121",
        }
    ),
    "timm": frozenset(
        {"resnet18", "resnet26", "resnet50", "vgg11", "densenet121", "mobilenetv2_100"}
    ),
}
#: The keyword arguments each library's builder accepts from a spec.
LIBRARY_ARGUMENTS: dict[str, Signature] = {
    "torchvision": Signature({"num_classes": Int(1, MAX_FEATURES)}, positional=False),
    "timm": Signature(
        {"num_classes": Int(1, MAX_FEATURES), "in_chans": Int(1, 4096)}, positional=False
    ),
}


def check_library(arch: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check a ``library`` architecture.

    Args:
        arch: The raw ``model.architecture``.
        where: Its field path.

    Returns:
        The checked keyword arguments.

    Raises:
        ArgumentError: An unknown library or model name, or a bad argument.
    """
    library = arch.get("library")
    if not isinstance(library, str) or library not in LIBRARY_MODELS:
        raise ArgumentError(f"the library is one of {sorted(LIBRARY_MODELS)}", f"{where}.library")
    name = arch.get("name")
    if not isinstance(name, str) or name not in LIBRARY_MODELS[library]:
        raise ArgumentError(
            f"{library} models the server builds: {sorted(LIBRARY_MODELS[library])}; for "
            "another, send the model itself (the client traces it) or register a builder",
            f"{where}.name",
        )
    kwargs = arch.get("kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise ArgumentError("expected an object", f"{where}.kwargs")
    return LIBRARY_ARGUMENTS[library].bind((), kwargs, where)
