"""Checks of a job spec that need no torch: layer and builder names, operations allowed for a
representation, the role of each blob (weights, dataset, vector), named datasets.

Whatever can only be checked once the model is built (shapes against the architecture, NaN
weights, constructor arguments) is checked by the worker and reported as the job's error.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Iterable
from functools import cache
from typing import Any

from fimntk.contract.schemas import JobCreate, LayerSpec
from fimntk.contract.vocabulary import (
    ALLOWED_LAYERS,
    BUFFER_SUFFIXES,
    BUILTIN_BUILDERS,
    NTK_KEY,
    OPERATIONS,
)
from fimntk.core.errors import InvalidInputError
from fimntk.core.safetensors_header import FLOAT_DTYPES, Header


@cache
def lab_builders(modules: tuple[str, ...]) -> frozenset[str]:
    """Names of the builders that the configured lab modules define.

    Only modules listed in the server configuration (``FIMNTK_BUILDER_MODULES``) are imported
    here; no module name ever comes from a request.

    Args:
        modules: Importable module names, each defining ``BUILDERS: dict[str, callable]``.

    Returns:
        The builder names.
    """
    names: set[str] = set()
    for module_name in modules:
        # Allowlist: only module names from the server's own configuration
        # (FIMNTK_BUILDER_MODULES), never a name a user sends.
        module = importlib.import_module(module_name)
        names.update(getattr(module, "BUILDERS", {}))
    return frozenset(names)


def check_layers(layers: Iterable[LayerSpec], field: str) -> None:
    """Refuse unknown layer types and misplaced children, recursively.

    Args:
        layers: Layers of a sequential architecture.
        field: Field path of ``layers``.

    Raises:
        InvalidInputError: Naming the first offending layer.
    """
    for i, layer in enumerate(layers):
        where = f"{field}[{i}]"
        if layer.type not in ALLOWED_LAYERS:
            raise InvalidInputError(f"unknown layer type {layer.type!r}", f"{where}.type")
        if layer.type == "Sequential":
            if not layer.layers:
                raise InvalidInputError("a Sequential layer needs 'layers'", f"{where}.layers")
            check_layers(layer.layers, f"{where}.layers")
        elif layer.layers is not None:
            raise InvalidInputError("only a Sequential layer has 'layers'", f"{where}.layers")


def check_architecture(spec: JobCreate, builder_modules: Iterable[str]) -> None:
    """Check layer types or the builder name of the spec's architecture.

    Args:
        spec: Job spec with a model.
        builder_modules: Configured lab builder modules.

    Raises:
        InvalidInputError: Unknown layer type or builder.
    """
    assert spec.model is not None
    arch = spec.model.architecture
    if arch.kind == "sequential":
        check_layers(arch.layers, "model.architecture.layers")
        return
    known = BUILTIN_BUILDERS | lab_builders(tuple(builder_modules))
    if arch.name not in known:
        raise InvalidInputError(
            f"unknown builder {arch.name!r}; known: {sorted(known)}", "model.architecture.name"
        )


def check_operations(spec: JobCreate) -> None:
    """Refuse operations the representation does not define.

    Raises:
        InvalidInputError: Naming ``operations[i].op``.
    """
    key = NTK_KEY if spec.metric == "ntk" else str(spec.representation)
    allowed = OPERATIONS[key]
    for i, operation in enumerate(spec.operations):
        if operation.op not in allowed:
            hint = " (try 'lanczos_eigenpairs')" if operation.op == "eigenpairs" else ""
            raise InvalidInputError(
                f"operation {operation.op!r} is not defined for {key!r}{hint}; "
                f"defined: {sorted(allowed)}",
                f"operations[{i}].op",
            )


def check_weights(header: Header, field: str) -> int:
    """Check a weights header and count its parameters (buffers excluded).

    Args:
        header: Header of the weights blob.
        field: Field reported on error.

    Returns:
        The parameter count d.

    Raises:
        InvalidInputError: No tensors.
    """
    if not header.tensors:
        raise InvalidInputError("weights hold no tensors", field)
    return sum(
        info.numel for name, info in header.tensors.items() if not name.endswith(BUFFER_SUFFIXES)
    )


def check_dataset(header: Header, field: str) -> int:
    """Check a dataset header: ``inputs`` and optional ``targets`` with matching first axes.

    Returns:
        The number of examples.

    Raises:
        InvalidInputError: Missing ``inputs``, extra tensors, or mismatched lengths.
    """
    tensors = header.tensors
    if "inputs" not in tensors:
        raise InvalidInputError("dataset has no tensor named 'inputs'", field)
    extra = set(tensors) - {"inputs", "targets"}
    if extra:
        raise InvalidInputError(f"dataset has unexpected tensors {sorted(extra)}", field)
    inputs = tensors["inputs"]
    if not inputs.shape or inputs.shape[0] == 0:
        raise InvalidInputError("'inputs' must have a non-empty first axis", field)
    targets = tensors.get("targets")
    if targets is not None and (not targets.shape or targets.shape[0] != inputs.shape[0]):
        raise InvalidInputError(
            f"'targets' first axis {targets.shape[:1]} differs from inputs' {inputs.shape[0]}",
            field,
        )
    return inputs.shape[0]


def check_vector(header: Header, field: str, expected: int | None) -> None:
    """Check a vector header: one floating tensor of ``expected`` elements.

    Args:
        header: Header of the vector blob.
        field: Field reported on error.
        expected: Required number of elements, when known.

    Raises:
        InvalidInputError: Not a single floating tensor, or the wrong size.
    """
    if len(header.tensors) != 1:
        raise InvalidInputError("a vector blob holds exactly one tensor", field)
    (info,) = header.tensors.values()
    if info.dtype not in FLOAT_DTYPES:
        raise InvalidInputError(f"vector dtype {info.dtype} is not floating point", field)
    if expected is not None and info.numel != expected:
        raise InvalidInputError(
            f"vector has shape {list(info.shape)} ({info.numel} elements), "
            f"the model has {expected} parameters",
            field,
        )


def representation_key(spec: dict[str, Any]) -> str:
    """Hash of everything that determines the computed representation.

    Two specs with the same key compute the same object, so a kept one can be reused.

    Args:
        spec: Resolved job spec (JSON).

    Returns:
        A hex SHA-256.
    """
    keys = (
        "model",
        "dataset",
        "metric",
        "representation",
        "variant",
        "trials",
        "seed",
        "centering",
        "dtype",
        "update_diag",
    )
    material = {k: spec.get(k) for k in keys}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
