"""What the client sends and gets back, without I/O: a model as safetensors weights plus a JSON
architecture, a loader or tensors as a safetensors dataset, vectors as safetensors, and results
turned back into engine objects (or plain tensors when the engine is not installed).

Imports torch; :mod:`client` imports this module only when a computation needs it, so that
``fimntk status`` and friends run without torch.

Architectures: an ``nn.Sequential`` (nesting allowed) of built-in ``torch.nn`` layers from the
server's allowlist is described layer by layer from each layer's constructor signature and
attributes, and each description is checked by rebuilding the layer from its JSON on the meta
device. A Hugging Face model is described by its config (:mod:`._hf`), a torchvision or timm
model built through :func:`from_library` by its name; any other model is traced into a graph
of allowlisted operations (:mod:`._graph`). A model none of these
describes comes from a builder the lab registered on the server, called through
:func:`register_builder` (or tagged with :func:`describe_as`). A probe batch (:func:`probe_blob`)
lets the server check that it rebuilt what the client has.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save, save_file
from torch import nn

from fimntk.client._blob import Blob
from fimntk.client._graph import GraphTraceError, describe_graph
from fimntk.client._hf import HFDescribeError, describe_hf, is_hf_model
from fimntk.client.errors import DataError, ModelNotSupportedError
from fimntk.contract.vocabulary import DICT_INPUT

_ATTR = "_fimntk_builder"
_LIBRARY_ATTR = "_fimntk_library"
_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}
_SKIPPED_ARGS = frozenset({"self", "device", "dtype"})
#: Registered builders, by name: their functions let the client check a model's shapes.
_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


@functools.cache
def engine_module() -> Any:
    """The engine package, or ``None`` when it is not installed."""
    try:
        from fimntk import engine
    except ImportError:
        return None
    return engine


# -- blobs ------------------------------------------------------------------------------------


def tensors_blob(tensors: dict[str, torch.Tensor]) -> Blob:
    """Safetensors bytes of CPU copies of ``tensors``, as a blob."""
    return Blob.from_bytes(save({k: _cpu(v) for k, v in tensors.items()}))


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


# -- models -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShipment:
    """A model as the server receives it.

    Attributes:
        architecture: The JSON ``model.architecture`` of a job spec.
        weights: The state dict as safetensors, keyed as the server's model names them.
        layout: ``(name, shape)`` of each differentiated parameter, in the order of flat
            vectors (the engine's ``LayerCollection`` order), named as in the local model.
        dtype: Parameter dtype name.
    """

    architecture: dict[str, Any]
    weights: Blob
    layout: tuple[tuple[str, tuple[int, ...]], ...]
    dtype: str

    @property
    def n_params(self) -> int:
        """Number of parameters d."""
        return sum(_numel(shape) for _, shape in self.layout)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def register_builder(name: str, function: Callable[..., nn.Module] | None = None) -> Any:
    """Register a model builder of the server under ``name``; returns the function to build
    models with, so that the client can describe them.

    The lab lists the same function on the server, in a module named by
    ``FIMNTK_BUILDER_MODULES`` that defines ``BUILDERS = {name: function}``. Models built
    through the returned function carry ``(name, kwargs)``; their keyword arguments must be
    JSON values. Usable as a decorator: ``@register_builder("two_tower")``.

    Args:
        name: The builder's name on the server.
        function: The builder; omitted when used as a decorator.

    Returns:
        The wrapped builder.

    Example::

        build = register_builder("resnet", worker.models.resnet)
        model = build(in_channels=3, num_classes=10)
        client.trace(model, loader, rep="kfac")
    """
    if function is None:
        return functools.partial(register_builder, name)
    signature = inspect.signature(function)

    @functools.wraps(function)
    def build(*args: Any, **kwargs: Any) -> nn.Module:
        bound = signature.bind(*args, **kwargs)
        model = function(*args, **kwargs)
        return describe_as(model, name, **bound.arguments)

    _BUILDERS[name] = function
    return build


def describe_as(model: nn.Module, name: str, **kwargs: Any) -> nn.Module:
    """Tag ``model`` as built by the server's builder ``name`` with ``kwargs``; returns it.

    Raises:
        ModelNotSupportedError: An argument that is not a JSON value.
    """
    try:
        json_kwargs = {k: _json_value(v) for k, v in kwargs.items()}
    except _UndescribableError as exc:
        raise ModelNotSupportedError(
            f"builder {name!r}: argument {exc} is not a JSON value; the server calls "
            f"builders with JSON keyword arguments only"
        ) from None
    object.__setattr__(model, _ATTR, (name, json_kwargs))
    return model


def from_library(library: str, name: str, **kwargs: Any) -> nn.Module:
    """Build a torchvision (``get_model``) or timm (``create_model``) model without pretrained
    weights, tagged so that the server builds the same one by name (a ``library`` spec).

    Load your weights into it as usual; the client ships them. Without the tag the model is
    traced into a graph spec instead, which needs nothing installed on the server.

    Args:
        library: ``"torchvision"`` or ``"timm"``.
        name: A model name of the server's allowlist, e.g. ``"resnet18"``.
        **kwargs: ``num_classes`` (and ``in_chans`` for timm).

    Raises:
        ModelNotSupportedError: A name or argument the server would refuse, or the library
            missing here.

    Example::

        model = from_library("torchvision", "resnet18", num_classes=10)
        client.trace(model, loader, rep="kfac")
    """
    from fimntk.contract.arguments import ArgumentError
    from fimntk.contract.library import check_library

    arch = {"kind": "library", "library": library, "name": name, "kwargs": kwargs}
    try:
        check_library(arch, "library")
    except ArgumentError as exc:
        raise ModelNotSupportedError(f"{exc.field}: {exc}") from None
    try:
        # One of the contract's two library names (checked above), never free text.
        module = importlib.import_module(
            "torchvision.models" if library == "torchvision" else "timm"
        )
    except Exception as exc:  # a broken install raises more than ImportError (CUDA, ABI)
        raise ModelNotSupportedError(
            f"{library} does not import here ({type(exc).__name__}); send the model without "
            "from_library: the client traces it into a graph spec"
        ) from None
    if library == "torchvision":
        model = module.get_model(name, weights=None, **kwargs)
    else:
        model = module.create_model(name, pretrained=False, **kwargs)
    object.__setattr__(model, _LIBRARY_ATTR, arch)
    return model


class _UndescribableError(Exception):
    """A layer or value the client cannot put into JSON."""


def _not_supported(model: nn.Module, reason: str) -> ModelNotSupportedError:
    cls = type(model).__name__
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", cls).lower()
    return ModelNotSupportedError(
        f"cannot describe {cls} to the server: {reason}.\n"
        "The client describes an nn.Sequential of built-in torch.nn layers (Linear, Conv2d, "
        "LayerNorm, ReLU, ...; the server's allowlist), a Hugging Face model of an allowed "
        "type, and any model torch.fx traces into built-in layers and allowed functions and "
        "methods. Any other model must be registered as a builder, under one name on both "
        "sides:\n"
        "  1. on the server (lab admin): in an importable module, say lab_models.py,\n"
        f'         BUILDERS = {{"{snake}": build_{snake}}}   # a function returning the model\n'
        "     and start the API and every worker with "
        "FIMNTK_BUILDER_MODULES='[\"lab_models\"]';\n"
        "  2. in your code, build the model through the same function, registered:\n"
        "         from client import register_builder\n"
        f'         build = register_builder("{snake}", build_{snake})\n'
        "         model = build(...)   # keyword arguments must be JSON values\n"
        f'     or tag a model you already built: describe_as(model, "{snake}", **kwargs).'
    )


def ship_model(model: nn.Module) -> ModelShipment:
    """Describe ``model`` for the server: a registered builder's tag, else a sequential spec
    for an ``nn.Sequential``, an ``hf`` spec for a Hugging Face ``PreTrainedModel``, and a
    graph spec traced with ``torch.fx`` for any other model.

    Raises:
        ModelNotSupportedError: A model none of these describes (untraceable code, a layer or
            operation outside the server's allowlist), or one with frozen, shared or
            mixed-dtype parameters; the message says why and how to register a builder.
    """
    if not isinstance(model, nn.Module):
        raise ModelNotSupportedError(f"expected a torch.nn.Module, got {type(model).__name__}")
    layout = _layout(model)
    dtype = _dtype(model)
    tag = getattr(model, _ATTR, None)
    library = getattr(model, _LIBRARY_ATTR, None)
    if tag is not None:
        name, kwargs = tag
        _check_builder(model, name, kwargs)
        architecture: dict[str, Any] = {"kind": "builder", "name": name, "kwargs": kwargs}
        state = model.state_dict()
    elif library is not None:
        architecture, state = dict(library), model.state_dict()
    else:
        architecture, state = _describe(model)
    if dtype != "float32":
        architecture["dtype"] = dtype
    weights = Blob.from_bytes(save({k: _cpu(v).clone() for k, v in state.items()}))
    return ModelShipment(architecture, weights, layout, dtype)


def _describe(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The architecture of an untagged model and its state dict keyed as the server's model
    keys it: sequential, else hf (whose config ties what it shares), else a traced graph."""
    if is_hf_model(model):
        try:
            return describe_hf(model), model.state_dict()
        except HFDescribeError as exc:
            raise _not_supported(model, f"a Hugging Face model, but {exc}") from None
    _check_unshared(model)
    if type(model) is nn.Sequential:
        try:
            layers = _describe_sequential(model, "")
        except _UndescribableError:
            pass  # a custom layer inside: traced as a graph below
        else:
            return {"kind": "sequential", "layers": layers}, dict(_positional_state(model, ""))
    try:
        return describe_graph(model, _describe_layer), model.state_dict()
    except (GraphTraceError, _UndescribableError) as exc:
        raise _not_supported(model, str(exc)) from None


def _layout(model: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Parameters in the engine's flat order (``named_modules``, then each module's own)."""
    seen: set[int] = set()
    layout = []
    for module_name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            if not p.requires_grad:
                raise _not_supported(
                    model,
                    f"parameter {module_name + '.' if module_name else ''}{attr} is "
                    "frozen (requires_grad=False), and the server differentiates every "
                    "parameter; unfreeze it",
                )
            seen.add(id(p))
            layout.append((f"{module_name}.{attr}" if module_name else attr, tuple(p.shape)))
    if not layout:
        raise ModelNotSupportedError("the model has no parameters")
    return tuple(layout)


def _dtype(model: nn.Module) -> str:
    dtypes = {p.dtype for p in model.parameters()}
    names = {_DTYPE_NAMES.get(d) for d in dtypes}
    if len(names) != 1 or None in names:
        raise ModelNotSupportedError(
            f"parameters must share one floating dtype (float16, bfloat16, float32 or "
            f"float64); found {sorted(str(d) for d in dtypes)}"
        )
    (name,) = names
    assert name is not None
    return name


def _check_unshared(model: nn.Module) -> None:
    """A module or parameter used twice would be two on the server."""
    owners: dict[int, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            where = f"{module_name}.{attr}"
            if id(p) in owners and owners[id(p)] != where:
                raise _not_supported(
                    model, f"parameter {where} is shared with {owners[id(p)]} (tied weights)"
                )
            owners[id(p)] = where


def _check_builder(model: nn.Module, name: str, kwargs: dict[str, Any]) -> None:
    """Compare the model's state-dict shapes with what the registered builder makes."""
    function = _BUILDERS.get(name)
    if function is None:
        return
    with torch.device("meta"):
        reference = function(**kwargs)
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))[:5]
        raise ModelNotSupportedError(
            f"the model no longer matches builder {name!r} with {kwargs}: state dicts differ "
            f"at {diff}; build it again through the builder"
        )


def _describe_sequential(seq: nn.Sequential, path: str) -> list[dict[str, Any]]:
    layers = []
    for key, child in seq._modules.items():
        where = f"{path}{key}"
        if child is None:
            raise _UndescribableError(f"layer {where} is None")
        if type(child) is nn.Sequential:
            children = _describe_sequential(child, f"{where}.")
            layers.append({"type": "Sequential", "layers": children})
        else:
            layers.append(_describe_layer(child, where))
    return layers


def _positional_state(seq: nn.Sequential, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The state dict keyed as ``nn.Sequential(*layers)`` keys it (``0.weight``, ``1.0.bias``)."""
    for i, child in enumerate(seq._modules.values()):
        assert child is not None
        if type(child) is nn.Sequential:
            yield from _positional_state(child, f"{prefix}{i}.")
        else:
            for key, tensor in child.state_dict().items():
                yield f"{prefix}{i}.{key}", tensor


@functools.cache
def _allowed_layers() -> frozenset[str]:
    from fimntk.contract.vocabulary import ALLOWED_LAYERS

    return ALLOWED_LAYERS


def _describe_layer(module: nn.Module, where: str) -> dict[str, Any]:
    """``{"type", "kwargs"}`` of a built-in layer, checked by rebuilding it."""
    name = type(module).__name__
    if name not in _allowed_layers() or getattr(nn, name, None) is not type(module):
        raise _UndescribableError(
            f"layer {where} is a {type(module).__module__}.{type(module).__qualname__}, not a "
            "built-in torch.nn layer that the server allows"
        )
    cls = type(module)
    kwargs: dict[str, Any] = {}
    for arg, param in inspect.signature(cls.__init__).parameters.items():
        if (
            arg in _SKIPPED_ARGS
            or arg.startswith("_")
            or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
        ):
            continue
        if arg == "bias" and isinstance(param.default, bool):
            value: Any = getattr(module, "bias", None) is not None
        elif hasattr(module, arg):
            value = getattr(module, arg)
        else:
            continue
        try:
            value = _json_value(value)
        except _UndescribableError as exc:
            raise _UndescribableError(
                f"layer {where} ({name}): {arg}={exc} is not a JSON value"
            ) from None
        if value != _default_json(param.default):
            kwargs[arg] = value
    if kwargs.get("bias") is False and _rebuilds(
        module, {k: v for k, v in kwargs.items() if k != "bias"}
    ):
        del kwargs["bias"]  # no bias anyway (affine=False): keep the spec portable
    if not _rebuilds(module, kwargs):
        raise _UndescribableError(
            f"layer {where} ({name}) differs from {name}(**{kwargs}) rebuilt from its "
            "constructor arguments (an attribute changed after construction?)"
        )
    spec: dict[str, Any] = {"type": name}
    if kwargs:
        spec["kwargs"] = kwargs
    return spec


def _default_json(default: Any) -> Any:
    try:
        return _json_value(default)
    except _UndescribableError:
        return object()  # never equal: the value is sent


def _rebuilds(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether ``type(module)(**kwargs)``, after a JSON round trip, equals ``module``."""
    try:
        with torch.device("meta"):
            rebuilt = type(module)(**json.loads(json.dumps(kwargs)))
    except (TypeError, ValueError, RuntimeError):
        return False
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    return repr(rebuilt) == repr(module) and shapes(rebuilt) == shapes(module)


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise _UndescribableError(repr(value))
        return value
    if isinstance(value, tuple | list | torch.Size):
        return [_json_value(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v) for k, v in value.items()}
    raise _UndescribableError(repr(value)[:80])


# -- data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteDataset:
    """A dataset the server already has: a blob you uploaded, or a named dataset of the lab
    (``<data_dir>/datasets/<name>.safetensors``), with the loader parameters.

    Pass it wherever a loader goes. ``Client.upload_dataset`` returns one for a loader you
    use many times, so that it is packed once.

    Attributes:
        blob: Digest of an uploaded dataset.
        name: Name of a server dataset.
        batch_size: Examples per batch.
        subset: Use this many examples, drawn with ``seed``.
        seed: Seed of the subset draw.
    """

    blob: str | None = None
    name: str | None = None
    batch_size: int = 32
    subset: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.blob is None) == (self.name is None):
            raise DataError("give exactly one of blob= and name=")

    def to_spec(self) -> dict[str, Any]:
        """The ``dataset`` of a job spec."""
        spec: dict[str, Any] = {"batch_size": self.batch_size, "seed": self.seed}
        spec["blob" if self.blob else "name"] = self.blob or self.name
        if self.subset is not None:
            spec["subset"] = self.subset
        return spec


@dataclass
class DataShipment:
    """A dataset to reference in a job, and the blob to upload first (if any)."""

    dataset: RemoteDataset
    blob: Blob | None = None
    n_examples: int | None = None
    has_targets: bool = False
    cleanup: list[Blob] = field(default_factory=list)
    head: torch.Tensor | dict[str, torch.Tensor] | None = None


def ship_data(data: Any, batch_size: int | None = None) -> DataShipment:
    """Pack a loader, tensors or ``(inputs, targets)`` into a dataset blob; pass a
    :class:`RemoteDataset` (or a server dataset's name) through.

    The examples are packed in the order the loader yields them (a ``drop_last`` loader
    yields fewer); the server rebuilds batches of the loader's ``batch_size`` in that order.

    Raises:
        DataError: Batches that are not ``x``, ``(x,)`` or ``(x, y)`` tensors, or no example.
    """
    if isinstance(data, RemoteDataset):
        if batch_size is not None:
            data = RemoteDataset(data.blob, data.name, batch_size, data.subset, data.seed)
        return DataShipment(data)
    if isinstance(data, str):
        return DataShipment(RemoteDataset(name=data, batch_size=batch_size or 32))
    parts, inferred = _collect(data)
    tensors = _named(parts)
    fd, name = tempfile.mkstemp(prefix="fimntk-dataset-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: _cpu(v) for k, v in tensors.items()}, name)
        blob = Blob.from_file(Path(name), owned=True)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    dataset = RemoteDataset(blob=blob.digest, batch_size=batch_size or inferred)
    x = parts[0]
    has_targets = len(parts) == 2 or (isinstance(x, dict) and "labels" in x)
    return DataShipment(dataset, blob, _n_examples(x), has_targets, [blob], _head(x))


Inputs = torch.Tensor | dict[str, torch.Tensor]
_PROBE_EXAMPLES = 4


def _named(parts: tuple[Inputs, ...]) -> dict[str, torch.Tensor]:
    """The tensors of a dataset blob: ``inputs`` (or ``inputs.<key>``) and ``targets``."""
    x = parts[0]
    tensors = {f"inputs.{k}": v for k, v in x.items()} if isinstance(x, dict) else {"inputs": x}
    if len(parts) == 2:
        tensors["targets"] = _tensor(parts[1])
    return tensors


def _tensor(value: Inputs) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise DataError("targets are one tensor, not a dictionary")
    return value


def _n_examples(x: Inputs) -> int:
    first = next(iter(x.values())) if isinstance(x, dict) else x
    return int(first.shape[0])


def _head(x: Inputs) -> Inputs:
    """The first examples, for the probe batch."""
    if isinstance(x, dict):
        return {k: v[:_PROBE_EXAMPLES] for k, v in x.items()}
    return x[:_PROBE_EXAMPLES]


def _inputs(value: Any) -> Inputs | None:
    """A tensor, or a dictionary of tensors with keys the server accepts; None otherwise."""
    if isinstance(value, torch.Tensor):
        return value
    if (
        isinstance(value, Mapping)
        and value
        and all(isinstance(t, torch.Tensor) for t in value.values())
    ):
        bad = [k for k in value if not isinstance(k, str) or not DICT_INPUT.match(f"inputs.{k}")]
        if bad:
            raise DataError(f"dictionary input keys must be identifiers, got {bad[:3]}")
        return dict(value)
    return None


def _batch_parts(batch: Any) -> tuple[Inputs, ...]:
    single = _inputs(batch)
    if single is not None:
        return (single,)
    if isinstance(batch, tuple | list) and 1 <= len(batch) <= 2:
        found = [p for p in map(_inputs, batch) if p is not None]
        if len(found) == len(batch) and (len(found) == 1 or isinstance(found[1], torch.Tensor)):
            return tuple(found)
    kind = type(batch).__name__
    size = f" of {len(batch)}" if isinstance(batch, tuple | list) else ""
    raise DataError(
        f"a batch is a {kind}{size}; the server's loader yields (inputs,) or (inputs, "
        "targets), inputs a tensor or a dictionary of tensors (input_ids, attention_mask, "
        "labels...) and targets a tensor: reshape your loader to that form"
    )


def _cat(chunks: list[Inputs]) -> Inputs:
    if isinstance(chunks[0], dict):
        keys = chunks[0].keys()
        if any(not isinstance(c, dict) or c.keys() != keys for c in chunks):
            raise DataError("batches have different dictionary keys")
        return {k: torch.cat([c[k] for c in chunks if isinstance(c, dict)]) for k in keys}
    if any(not isinstance(c, torch.Tensor) for c in chunks):
        raise DataError("batches mix tensors and dictionaries")
    return torch.cat([c for c in chunks if isinstance(c, torch.Tensor)])


def _collect(data: Any) -> tuple[tuple[Inputs, ...], int]:
    """Concatenated ``(inputs[, targets])`` and the batch size to rebuild batches with."""
    if isinstance(data, torch.Tensor) or (
        isinstance(data, tuple | list) and data and all(isinstance(t, torch.Tensor) for t in data)
    ):
        parts = _batch_parts(data)
        x = parts[0]
        if isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[0] == 0):
            raise DataError("no examples: the inputs tensor is empty")
        return parts, 32
    if not isinstance(data, Iterable) or isinstance(data, Mapping):
        raise DataError(
            f"expected a DataLoader, tensors or a RemoteDataset, got {type(data).__name__}"
        )
    batches: list[tuple[Inputs, ...]] = []
    for batch in data:
        parts = _batch_parts(batch)
        if batches and len(parts) != len(batches[0]):
            raise DataError("batches mix (inputs,) and (inputs, targets)")
        batches.append(parts)
    if not batches:
        raise DataError("the loader yielded no batch")
    joined = tuple(_cat([b[i] for b in batches]) for i in range(len(batches[0])))
    sizes = {_n_examples(p) for p in joined}
    if isinstance(joined[0], dict):
        sizes |= {int(v.shape[0]) for v in joined[0].values()}
    if len(sizes) != 1:
        raise DataError("targets and inputs have different numbers of examples")
    batch_size = getattr(data, "batch_size", None) or _n_examples(batches[0][0])
    return joined, int(batch_size)


def probe_blob(model: nn.Module, data: DataShipment) -> Blob | None:
    """A few inputs of the data and the model's outputs on them (in eval mode, as the server
    runs it), or None without local data or without the engine.

    Raises:
        DataError: The model fails on its own data.
    """
    engine = engine_module()
    if data.head is None or engine is None:
        return None
    from fimntk.engine.generator.inputs import default_function

    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    x = data.head
    cast = lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device)  # noqa: E731
    inputs = {k: cast(v) for k, v in x.items()} if isinstance(x, dict) else cast(x)
    training = model.training
    model.eval()  # nn.Module.eval: inference mode, as the server runs the model
    try:
        with torch.no_grad():
            outputs = default_function(model)(inputs)
    except Exception as exc:
        raise DataError(f"the model fails on the first examples: {exc}") from exc
    finally:
        model.train(training)
    tensors = _named((inputs,))
    tensors["outputs"] = outputs
    return tensors_blob(tensors)


# -- vectors and results ----------------------------------------------------------------------


def flat_vector(v: Any, model: nn.Module, shipment: ModelShipment) -> torch.Tensor:
    """A parameter-space vector as a flat ``(d,)`` tensor in the engine's order.

    Args:
        v: ``None`` (the model's own parameters), an engine ``PVector``, a flat tensor, or
            ``{parameter name: tensor}``.
        model: The local model.
        shipment: Its description.

    Raises:
        DataError: Wrong size or missing parameters.
    """
    d = shipment.n_params
    if v is None:
        named = dict(model.named_parameters())
        return torch.cat([named[n].detach().reshape(-1) for n, _ in shipment.layout])
    if hasattr(v, "get_flat_representation"):
        v = v.get_flat_representation()
    if isinstance(v, dict):
        missing = [n for n, _ in shipment.layout if n not in v]
        if missing:
            raise DataError(f"the vector has no entry for parameters {missing[:5]}")
        return torch.cat([torch.as_tensor(v[n]).reshape(-1) for n, _ in shipment.layout])
    if not isinstance(v, torch.Tensor):
        raise DataError(
            f"expected a PVector, a tensor or a dict of tensors, got {type(v).__name__}"
        )
    if v.numel() != d:
        raise DataError(f"the vector has {v.numel()} entries; the model has {d} parameters")
    return v.reshape(-1)


def function_vector(v: Any) -> torch.Tensor:
    """A function-space vector (an engine ``FVector`` or a ``(c, n)`` tensor) as a tensor.

    Raises:
        DataError: Not a ``(c, n)`` vector.
    """
    if v is None:
        raise DataError("the NTK acts on function space: give v as an FVector or a (c, n) tensor")
    if hasattr(v, "get_flat_representation"):
        v = v.get_flat_representation()
    if not isinstance(v, torch.Tensor):
        raise DataError(f"expected an FVector or a (c, n) tensor, got {type(v).__name__}")
    return v


def vector_blob(tensor: torch.Tensor) -> Blob:
    """A vector as a one-tensor safetensors blob."""
    return tensors_blob({"vector": tensor.reshape(-1) if tensor.dim() != 2 else tensor})


def pvector(flat: torch.Tensor, model: nn.Module, shipment: ModelShipment) -> Any:
    """An engine ``PVector`` on the local model's layout, or ``{name: tensor}`` without the
    engine."""
    engine = engine_module()
    if engine is not None:
        return engine.PVector(engine.LayerCollection.from_model(model), vector_repr=flat)
    out, start = {}, 0
    for name, shape in shipment.layout:
        n = _numel(shape)
        out[name] = flat[start : start + n].reshape(shape)
        start += n
    return out


def fvector(tensor: torch.Tensor) -> Any:
    """An engine ``FVector``, or the ``(c, n)`` tensor without the engine."""
    engine = engine_module()
    return tensor if engine is None else engine.FVector(tensor)


def fmat(tensor: torch.Tensor) -> Any:
    """An engine ``FMatDense``, or the ``(c, n, c, n)`` tensor without the engine."""
    engine = engine_module()
    return tensor if engine is None else engine.FMatDense(tensor)


def scalar(value: float | str, dtype: str) -> torch.Tensor:
    """A scalar output (``"nan"``, ``"inf"`` included) as a 0-d tensor, as the engine returns."""
    return torch.tensor(float(value), dtype=getattr(torch, dtype))


def load_tensor(content: bytes) -> torch.Tensor:
    """The ``value`` tensor of a downloaded artifact."""
    return load(content)["value"]


def load_representation(path: Path) -> Any:
    """``engine.load(path)``, or ``path`` itself without the engine."""
    engine = engine_module()
    return path if engine is None else engine.load(path)


def compute_dtype(model: nn.Module, dtype: str | torch.dtype | None) -> str:
    """The job's dtype: as asked, else float64 for a float64 model, else float32."""
    if dtype is None:
        return "float64" if next(model.parameters()).dtype == torch.float64 else "float32"
    name = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
    if name not in ("float32", "float64"):
        raise DataError(f"dtype must be float32 or float64, got {dtype}")
    return str(name)
