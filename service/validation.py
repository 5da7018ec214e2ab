"""Checks of a job spec that need no torch: layer and builder names, operations allowed for a
representation, the role of each blob (weights, dataset, vector), named datasets.

Constructor arguments are checked against their typed, bounded allowlist
(:mod:`fimntk.contract.arguments`), and the layer tree against the depth and module caps.
Whatever can only be checked once the model is built (shapes against the architecture, NaN
weights) is checked by the worker and reported as the job's error.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Iterable
from functools import cache
from typing import Any

from fimntk.contract.arguments import (
    ArgumentError,
    check_architecture_size,
    check_builder_arguments,
    check_layer_arguments,
)
from fimntk.contract.graph import check_graph
from fimntk.contract.hf import check_hf
from fimntk.contract.library import check_library
from fimntk.contract.schemas import BuilderArchitecture, JobCreate, LayerSpec
from fimntk.contract.vocabulary import (
    ALLOWED_LAYERS,
    BUFFER_SUFFIXES,
    BUILTIN_BUILDERS,
    DICT_INPUT,
    HESSIAN_LOSSES,
    HESSIAN_REPRESENTATIONS,
    JACOBIAN_REPRESENTATIONS,
    MAX_PROBE,
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

    Raises:
        ValueError: A module defines a name that is built in or that another module defines.
    """
    names: set[str] = set()
    for module_name in modules:
        # Allowlist: only module names from the server's own configuration
        # (FIMNTK_BUILDER_MODULES), never a name a user sends.
        module = importlib.import_module(module_name)
        defined = set(getattr(module, "BUILDERS", {}))
        taken = defined & (names | BUILTIN_BUILDERS)
        if taken:
            raise ValueError(
                f"builder module {module_name!r} defines {sorted(taken)}, names already taken "
                "by a built-in or another module: rename them"
            )
        names |= defined
    return frozenset(names)


def check_layers(layers: Iterable[LayerSpec], field: str, max_depth: int, max_modules: int) -> None:
    """Refuse unknown layer types, misplaced children, constructor arguments outside their
    allowlist or bounds, and layer trees past the depth or module caps.

    Args:
        layers: Layers of a sequential architecture.
        field: Field path of ``layers``.
        max_depth: Most nested ``Sequential`` levels.
        max_modules: Most modules in all.

    Raises:
        InvalidInputError: Naming the first offending layer or argument.
    """
    todo = [(list(layers), field)]
    try:
        check_architecture_size(
            [layer.model_dump() for layer in todo[0][0]], field, max_depth, max_modules
        )
        while todo:
            children, path = todo.pop()
            for i, layer in enumerate(children):
                where = f"{path}[{i}]"
                if layer.type not in ALLOWED_LAYERS:
                    raise InvalidInputError("unknown layer type", f"{where}.type")
                check_layer_arguments(layer.type, layer.args, layer.kwargs, where)
                if layer.type == "Sequential":
                    if not layer.layers:
                        raise InvalidInputError(
                            "a Sequential layer needs 'layers'", f"{where}.layers"
                        )
                    todo.append((layer.layers, f"{where}.layers"))
                elif layer.layers is not None:
                    raise InvalidInputError(
                        "only a Sequential layer has 'layers'", f"{where}.layers"
                    )
    except ArgumentError as exc:
        raise InvalidInputError(str(exc), exc.field) from None


def check_architecture(
    spec: JobCreate,
    builder_modules: Iterable[str],
    max_depth: int,
    max_modules: int,
) -> None:
    """Check layer types and arguments, or the builder name and arguments, of the spec's
    architecture.

    Args:
        spec: Job spec with a model.
        builder_modules: Configured lab builder modules.
        max_depth: Most nested ``Sequential`` levels.
        max_modules: Most modules in all.

    Raises:
        InvalidInputError: Unknown layer type or builder, or a bad constructor argument.
    """
    assert spec.model is not None
    arch = spec.model.architecture
    if arch.kind == "sequential":
        check_layers(arch.layers, "model.architecture.layers", max_depth, max_modules)
        return
    if not isinstance(arch, BuilderArchitecture):
        check = {"graph": check_graph, "hf": check_hf, "library": check_library}[arch.kind]
        try:
            check(arch.model_dump(mode="json"), "model.architecture")
        except ArgumentError as exc:
            raise InvalidInputError(str(exc), exc.field) from None
        return
    known = BUILTIN_BUILDERS | lab_builders(tuple(builder_modules))
    if arch.name not in known:
        raise InvalidInputError(
            f"unknown builder; known: {sorted(known)}", "model.architecture.name"
        )
    try:
        check_builder_arguments(arch.name, arch.kwargs, "model.architecture")
    except ArgumentError as exc:
        raise InvalidInputError(str(exc), exc.field) from None


#: Metrics with representations of their own (keyed ``<metric>_<rep>`` in ``OPERATIONS``), each
#: run on one worker: what the object is called in messages, its representations, and why it
#: does not split over workers.
_OWN_REPRESENTATIONS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "hessian": ("the Hessian's", HESSIAN_REPRESENTATIONS, "a Hessian job runs on one worker"),
    "jacobian": (
        "the Jacobian map's",
        JACOBIAN_REPRESENTATIONS,
        "a Jacobian job runs on one worker (J v is per example, not a sum)",
    ),
}


def check_hessian(spec: JobCreate) -> None:
    """Check the loss of a ``hessian`` job (and that no other job names a loss).

    Raises:
        InvalidInputError: Naming ``loss``.
    """
    if spec.metric != "hessian":
        if spec.loss is not None:
            raise InvalidInputError("'loss' applies to metric 'hessian' only", "loss")
        return
    if spec.loss is None:
        raise InvalidInputError(
            f"metric 'hessian' needs a loss: one of {list(HESSIAN_LOSSES)}", "loss"
        )


def check_own_representation(spec: JobCreate) -> None:
    """Check the representation and the shards of a metric with representations of its own
    (``hessian``, ``jacobian``: :data:`_OWN_REPRESENTATIONS`).

    Raises:
        InvalidInputError: Naming ``representation`` or ``shards``.
    """
    own = _OWN_REPRESENTATIONS.get(str(spec.metric))
    if own is None:
        return
    whose, representations, one_worker = own
    if spec.representation not in representations:
        raise InvalidInputError(
            f"representation {spec.representation!r} is not one of {whose}: "
            f"{list(representations)}",
            "representation",
        )
    if spec.shards != 1:
        raise InvalidInputError(f"{one_worker}: use shards=1", "shards")


def check_operations(spec: JobCreate) -> None:
    """Refuse operations the representation does not define.

    Raises:
        InvalidInputError: Naming ``operations[i].op``.
    """
    key = NTK_KEY if spec.metric == "ntk" else str(spec.representation)
    if spec.metric in _OWN_REPRESENTATIONS:
        key = f"{spec.metric}_{spec.representation}"
    allowed = OPERATIONS[key]
    for i, operation in enumerate(spec.operations):
        if operation.op not in allowed:
            hint = " (try 'lanczos_eigenpairs')" if operation.op == "eigenpairs" else ""
            raise InvalidInputError(
                f"operation {operation.op!r} is not defined for {key!r}{hint}; "
                f"defined: {sorted(allowed)}",
                f"operations[{i}].op",
            )


def check_weights(header: Header, field: str, buffers: Iterable[str] = ()) -> int:
    """Check a weights header and count its parameters (buffers excluded).

    Args:
        header: Header of the weights blob.
        field: Field reported on error.
        buffers: Names of buffers beyond those of built-in layers (a graph's own buffers).

    Returns:
        The parameter count d.

    Raises:
        InvalidInputError: No tensors.
    """
    if not header.tensors:
        raise InvalidInputError("weights hold no tensors", field)
    skipped = set(buffers)
    return sum(
        info.numel
        for name, info in header.tensors.items()
        if not name.endswith(BUFFER_SUFFIXES) and name not in skipped
    )


def check_dataset(header: Header, field: str, second: str = "targets") -> int:
    """Check a dataset header: ``inputs`` (or dictionary inputs ``inputs.<key>``) and optional
    ``targets``, all with one non-empty first axis.

    Args:
        header: Header of the blob.
        field: Field reported on error.
        second: Name of the optional tensor beside the inputs (``outputs`` for a probe).

    Returns:
        The number of examples.

    Raises:
        InvalidInputError: Missing ``inputs``, extra tensors, or mismatched lengths.
    """
    tensors = header.tensors
    keyed = [k for k in tensors if DICT_INPUT.match(k)]
    if ("inputs" in tensors) == bool(keyed):
        raise InvalidInputError(
            "a dataset holds one tensor 'inputs', or dictionary inputs 'inputs.<key>'", field
        )
    extra = set(tensors) - {"inputs", second, *keyed}
    if extra:
        raise InvalidInputError(f"dataset has unexpected tensors {sorted(extra)[:5]}", field)
    firsts = {k: info.shape[0] if info.shape else 0 for k, info in tensors.items()}
    if 0 in firsts.values():
        raise InvalidInputError("every tensor needs a non-empty first axis", field)
    if len(set(firsts.values())) != 1:
        raise InvalidInputError(f"first axes differ: {dict(sorted(firsts.items())[:5])}", field)
    return next(iter(firsts.values()))


def check_probe(header: Header, field: str) -> None:
    """Check a probe header: inputs as a dataset's, ``outputs``, at most :data:`MAX_PROBE`
    examples.

    Raises:
        InvalidInputError: Naming the probe field.
    """
    n = check_dataset(header, field, "outputs")
    if "outputs" not in header.tensors:
        raise InvalidInputError("a probe holds the model's 'outputs' on its inputs", field)
    if n > MAX_PROBE:
        raise InvalidInputError(f"a probe holds at most {MAX_PROBE} examples, not {n}", field)


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
    if spec.get("loss") is not None:  # only a Hessian's: the keys of other jobs stay as they were
        material["loss"] = spec["loss"]
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
