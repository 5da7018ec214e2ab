"""Models from JSON: built-in layer sequences, graphs of allowlisted operations
(:mod:`.graph`), Hugging Face configs (:mod:`.hf`), torchvision and timm models by name
(:mod:`.library`) and a registry of builders; never user code.

A model is first built on the meta device (no memory), its size checked, its state dict
compared key by key with the safetensors header of the weights (shapes and dtypes), and only
then are the weights loaded into it with ``assign=True``.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from fimntk.contract.arguments import (
    ArgumentError,
    check_architecture_size,
    check_builder_arguments,
    check_layer_arguments,
)
from fimntk.contract.graph import check_graph
from fimntk.contract.hf import check_hf
from fimntk.contract.vocabulary import ALLOWED_LAYERS
from fimntk.core.safetensors_header import read_header
from fimntk.worker.errors import JobInputError
from fimntk.worker.graph import build_graph
from fimntk.worker.hf import build_hf
from fimntk.worker.library import build_library

Builder = Callable[..., nn.Module]

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
#: Safetensors dtype codes of torch dtypes.
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_MAX_LISTED = 20


def mlp(
    in_features: int,
    hidden: list[int],
    out_features: int,
    activation: str = "relu",
    bias: bool = True,
) -> nn.Module:
    """A multilayer perceptron: Linear layers with an activation between them.

    Args:
        in_features: Input size.
        hidden: Hidden layer sizes.
        out_features: Number of outputs c.
        activation: ``relu``, ``tanh``, ``gelu`` or ``sigmoid``.
        bias: Whether the Linear layers have biases.
    """
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
    if activation not in acts:
        raise ValueError(f"activation must be one of {sorted(acts)}")
    sizes = [in_features, *hidden, out_features]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(acts[activation]())
    return nn.Sequential(*layers)


def cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    channels: list[int] | None = None,
    image_size: int = 28,
) -> nn.Module:
    """A small CNN: [Conv3x3, ReLU, MaxPool2] per entry of ``channels``, then a Linear head."""
    channels = channels or [16, 32]
    layers: list[nn.Module] = []
    size, prev = image_size, in_channels
    for ch in channels:
        layers += [nn.Conv2d(prev, ch, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        prev, size = ch, size // 2
    layers += [nn.Flatten(), nn.Linear(prev * size * size, num_classes)]
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and an identity (or 1x1) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(1, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(1, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


def resnet(
    in_channels: int = 3, num_classes: int = 10, width: int = 16, blocks: int = 2
) -> nn.Module:
    """A small ResNet: a stem, ``blocks`` basic blocks doubling width and halving resolution
    after the first, global average pooling and a Linear head. GroupNorm, not BatchNorm, so
    that examples stay independent."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.ReLU()]
    cin = width
    for i in range(blocks):
        cout = width * 2**i
        layers.append(_BasicBlock(cin, cout, 1 if i == 0 else 2))
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


BUILTIN_BUILDERS: dict[str, Builder] = {"mlp": mlp, "cnn": cnn, "resnet": resnet}
#: Builders of the spec kinds whose models come from a library (Hugging Face, torchvision,
#: timm), by kind.
_LIBRARIES: dict[str, Callable[[dict[str, Any], str], nn.Module]] = {
    "hf": build_hf,
    "library": build_library,
}


def load_builders(modules: Iterable[str]) -> dict[str, Builder]:
    """The builder registry: the built-ins plus those of the configured lab modules.

    Only the modules listed in the server configuration are imported: this is the allowlist,
    and no request can add to it.

    Args:
        modules: Importable module names, each defining ``BUILDERS: dict[str, callable]``.

    Returns:
        Builders by name.

    Raises:
        ValueError: A module defines a name that is built in or that another module defines
            (a worker refuses to start rather than build another model than the one meant).
    """
    registry: dict[str, Builder] = dict(BUILTIN_BUILDERS)
    for module_name in modules:
        # Allowlist: module names come from the server configuration only, never from a job.
        defined = getattr(importlib.import_module(module_name), "BUILDERS", {})
        taken = sorted(set(defined) & set(registry))
        if taken:
            raise ValueError(
                f"builder module {module_name!r} defines {taken}, names already taken by a "
                "built-in or another module: rename them"
            )
        registry.update(defined)
    return registry


def _short_reason(exc: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters: never a C++ stack
    trace, install path or library address."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else type(exc).__name__
    return first if len(first) <= 200 else first[:197] + "..."


def _build_layers(layers: list[dict[str, Any]], field: str) -> list[nn.Module]:
    modules: list[nn.Module] = []
    for i, layer in enumerate(layers):
        where = f"{field}[{i}]"
        kind = layer["type"]
        if kind not in ALLOWED_LAYERS:
            raise JobInputError("unknown layer type", f"{where}.type")
        try:
            bound = check_layer_arguments(
                kind, layer.get("args", []), layer.get("kwargs", {}), where
            )
        except ArgumentError as exc:
            raise JobInputError(str(exc), exc.field) from None
        if kind == "Sequential":
            modules.append(
                nn.Sequential(*_build_layers(layer.get("layers") or [], f"{where}.layers"))
            )
            continue
        try:
            modules.append(getattr(nn, kind)(**bound))
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise JobInputError(f"cannot build {kind}: {_short_reason(exc)}", where) from None
    return modules


def build_on_meta(arch: dict[str, Any], builders: dict[str, Builder]) -> nn.Module:
    """Build an architecture on the meta device, in its declared parameter dtype.

    Args:
        arch: The ``model.architecture`` of a spec.
        builders: The builder registry.

    Raises:
        JobInputError: Unknown layer or builder, or bad constructor arguments.
    """
    kind = arch["kind"]
    try:
        kwargs: dict[str, Any] = {}
        if kind == "sequential":
            check_architecture_size(arch["layers"], "model.architecture.layers")
        elif kind == "graph":
            check_graph(arch, "model.architecture")
        elif kind == "hf":
            check_hf(arch, "model.architecture")
        elif kind != "library":  # checked by its builder, which needs the arguments
            kwargs = check_builder_arguments(
                arch["name"], arch.get("kwargs", {}), "model.architecture"
            )
    except ArgumentError as exc:
        raise JobInputError(str(exc), exc.field) from None
    # Factory arguments are refused above, so nothing leaves the meta device.
    with torch.device("meta"):
        if kind == "sequential":
            model: nn.Module = nn.Sequential(
                *_build_layers(arch["layers"], "model.architecture.layers")
            )
        elif kind == "graph":
            model = build_graph(arch, "model.architecture")
        elif kind in _LIBRARIES:
            model = _LIBRARIES[kind](arch, "model.architecture")
        else:
            name = arch["name"]
            if name not in builders:
                raise JobInputError("unknown builder", "model.architecture.name")
            try:
                model = builders[name](**kwargs)
            except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
                raise JobInputError(
                    f"builder {name!r}: {_short_reason(exc)}", "model.architecture.kwargs"
                ) from None
            if not isinstance(model, nn.Module):
                raise JobInputError(
                    f"builder {name!r} did not return a module", "model.architecture.name"
                )
    return model.to(DTYPES[arch.get("dtype", "float32")])


def check_size(model: nn.Module, max_bytes: int) -> None:
    """Refuse a model whose parameters and buffers exceed ``max_bytes``."""
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if size > max_bytes:
        raise JobInputError(
            f"model needs {size} bytes, above the limit of {max_bytes}", "model.architecture"
        )


def check_against_weights(model: nn.Module, weights: Path, max_header_bytes: int) -> None:
    """Require an exact match of keys, shapes and dtypes between a model and its weights.

    Raises:
        JobInputError: Listing every mismatch.
    """
    header = read_header(weights, "model.weights", max_header_bytes).tensors
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in header]
    problems += [f"unexpected {k}" for k in header if k not in expected]
    for key, tensor in expected.items():
        info = header.get(key)
        if info is None:
            continue
        if tuple(info.shape) != tuple(tensor.shape):
            problems.append(
                f"{key}: shape {list(info.shape)} in weights, {list(tensor.shape)} in architecture"
            )
        want = ST_DTYPES.get(tensor.dtype, str(tensor.dtype))
        if info.dtype != want:
            problems.append(f"{key}: dtype {info.dtype} in weights, {want} in architecture")
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise JobInputError(
            f"weights do not match the architecture: {listed}{more}", "model.weights"
        )


def load_model(
    arch: dict[str, Any],
    weights: Path,
    builders: dict[str, Builder],
    max_bytes: int,
    max_header_bytes: int,
) -> nn.Module:
    """Build, check and load a model on the CPU, in eval mode.

    Args:
        arch: The spec's architecture.
        weights: Path of the weights blob.
        builders: The builder registry.
        max_bytes: Model size cap.
        max_header_bytes: Safetensors header cap.

    Raises:
        JobInputError: Any mismatch, or non-finite weights.
    """
    model = build_on_meta(arch, builders)
    check_size(model, max_bytes)
    check_against_weights(model, weights, max_header_bytes)
    state = load_file(str(weights), device="cpu")
    bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise JobInputError(
            f"weights hold NaN or infinite values in {bad[:_MAX_LISTED]}", "model.weights"
        )
    build = _LIBRARIES.get(arch["kind"])
    if build is not None:
        # Built again for real: a library model's non-persistent buffers (position ids, causal
        # masks) are computed at construction and are not in the weights.
        with torch.device("cpu"):
            model = build(arch, "model.architecture").to(DTYPES[arch.get("dtype", "float32")])
        model.load_state_dict(state, strict=True)
    else:
        model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:
        raise JobInputError(
            f"tensors not in the weights: {leftover[:_MAX_LISTED]}", "model.architecture"
        )
    return model.eval()  # nn.Module.eval: inference mode (not Python's eval)
