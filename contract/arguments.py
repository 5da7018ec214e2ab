"""Typed, bounded constructor arguments of the layers and builders a spec may name.

A spec builds a model from JSON: ``{"type": "Linear", "args": [4, 8], "kwargs": {}}`` or
``{"kind": "builder", "name": "mlp", "kwargs": {...}}``. Every argument a constructor may
receive is listed here with its type and bounds (an allowlist): an argument not listed is
refused, so no factory argument (``device``, ``dtype``, ``_weight``, ``_freeze``) can leave the
meta-device build, and no size can ask for more than the bounds allow before the worker pays
for it. The checks are plain Python (no torch): the API runs them at submit and the worker runs
them again before building.

Architectures are bounded too: at most :data:`MAX_DEPTH` nested ``Sequential`` levels and
:data:`MAX_MODULES` modules (servers may lower both in their settings).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Largest feature, channel or embedding count a layer may declare.
MAX_FEATURES = 1 << 24
#: Largest kernel, stride, padding or dilation along one axis.
MAX_KERNEL = 4096
#: Largest number of nested ``Sequential`` levels of an architecture.
MAX_DEPTH = 32
#: Largest number of modules (layers, ``Sequential`` containers included) of an architecture.
MAX_MODULES = 4096
#: Longest list argument (``hidden`` of the mlp builder, a shape).
MAX_LIST = 256
#: Longest string argument.
MAX_STRING = 64
#: Most keyword arguments a lab builder without declared arguments accepts.
MAX_LAB_KWARGS = 32


class ArgumentError(ValueError):
    """A constructor argument outside its allowlist or its bounds.

    Attributes:
        field: Path of the offending value, e.g. ``model.architecture.layers[0].args[1]``.
    """

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _short(value: Any) -> str:
    """A representation of ``value`` bounded to 40 characters (problems never echo input)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Param:
    """Type and bounds of one argument; :meth:`check` returns the value or raises."""

    def check(self, value: Any, where: str) -> Any:
        """Return ``value`` if it is allowed.

        Raises:
            ArgumentError: Naming ``where``.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Param):
    """An integer in ``[lo, hi]`` (booleans refused)."""

    lo: int
    hi: int

    def check(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ArgumentError(f"expected an integer, got {_short(value)}", where)
        if not self.lo <= value <= self.hi:
            raise ArgumentError(f"{_short(value)} is out of bounds [{self.lo}, {self.hi}]", where)
        return value


@dataclass(frozen=True)
class Float(Param):
    """A finite number in ``[lo, hi]`` (integers accepted, booleans refused)."""

    lo: float
    hi: float

    def check(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ArgumentError(f"expected a number, got {_short(value)}", where)
        if isinstance(value, int) and abs(value) > 2**53:
            raise ArgumentError(f"{_short(value)} is out of bounds [{self.lo}, {self.hi}]", where)
        if not math.isfinite(value) or not self.lo <= value <= self.hi:
            raise ArgumentError(f"{_short(value)} is out of bounds [{self.lo}, {self.hi}]", where)
        return float(value)


@dataclass(frozen=True)
class Bool(Param):
    """``true`` or ``false``."""

    def check(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise ArgumentError(f"expected true or false, got {_short(value)}", where)
        return value


@dataclass(frozen=True)
class Choice(Param):
    """One of a few strings."""

    values: tuple[str, ...]

    def check(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or value not in self.values:
            raise ArgumentError(f"expected one of {list(self.values)}, got {_short(value)}", where)
        return value


@dataclass(frozen=True)
class Ints(Param):
    """An integer, or a list of ``lengths`` integers, each in ``[lo, hi]`` (a kernel size,
    a shape)."""

    lo: int
    hi: int
    lengths: tuple[int, ...]
    scalar: bool = True

    def check(self, value: Any, where: str) -> int | list[int]:
        if not isinstance(value, list):
            if not self.scalar:
                raise ArgumentError(f"expected a list of integers, got {_short(value)}", where)
            return Int(self.lo, self.hi).check(value, where)
        if len(value) not in self.lengths:
            raise ArgumentError(
                f"expected a list of {' or '.join(map(str, self.lengths))} integers, "
                f"got {len(value)}",
                where,
            )
        return [Int(self.lo, self.hi).check(v, f"{where}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class IntList(Param):
    """A list of at most ``max_len`` integers in ``[lo, hi]``."""

    lo: int
    hi: int
    max_len: int = MAX_LIST
    min_len: int = 0

    def check(self, value: Any, where: str) -> list[int]:
        if not isinstance(value, list):
            raise ArgumentError(f"expected a list of integers, got {_short(value)}", where)
        if not self.min_len <= len(value) <= self.max_len:
            raise ArgumentError(
                f"expected between {self.min_len} and {self.max_len} entries, got {len(value)}",
                where,
            )
        return [Int(self.lo, self.hi).check(v, f"{where}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class AnyOf(Param):
    """The first of ``options`` that accepts the value."""

    options: tuple[Param, ...]

    def check(self, value: Any, where: str) -> Any:
        errors = []
        for option in self.options:
            try:
                return option.check(value, where)
            except ArgumentError as exc:
                errors.append(str(exc))
        raise ArgumentError("; or ".join(errors), where)


@dataclass(frozen=True)
class Maybe(Param):
    """``null`` or a value ``inner`` accepts."""

    inner: Param

    def check(self, value: Any, where: str) -> Any:
        return None if value is None else self.inner.check(value, where)


CrossCheck = Callable[[dict[str, Any], str], None]


@dataclass(frozen=True)
class Signature:
    """Constructor parameters in positional order, and a check across them.

    Attributes:
        params: Parameter name to its type, in the constructor's positional order.
        required: Names that must be given.
        cross: Check of the bound arguments together (e.g. ``num_channels % num_groups``).
    """

    params: dict[str, Param]
    required: tuple[str, ...] = ()
    cross: CrossCheck | None = None
    positional: bool = True
    extra: Callable[[str, Any, str], Any] | None = field(default=None)

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Check and bind positional and keyword arguments to parameter names.

        Args:
            args: Positional arguments (refused when the signature is keyword-only).
            kwargs: Keyword arguments.
            where: Field path of the layer or builder, e.g. ``model.architecture.layers[0]``.

        Returns:
            The arguments by name, each checked.

        Raises:
            ArgumentError: Naming the offending argument's field.
        """
        names = list(self.params)
        if args and not self.positional:
            raise ArgumentError("takes keyword arguments only", f"{where}.args")
        if len(args) > len(names):
            raise ArgumentError(
                f"takes at most {len(names)} positional arguments, got {len(args)}",
                f"{where}.args",
            )
        bound: dict[str, Any] = {}
        for i, value in enumerate(args):
            name = names[i]
            bound[name] = self.params[name].check(value, f"{where}.args[{i}]")
        for key, value in kwargs.items():
            kw_where = f"{where}.kwargs.{_short(key)[1:-1] if len(key) > 40 else key}"
            if key in bound:
                raise ArgumentError(f"argument {key!r} given twice", kw_where)
            if key in self.params:
                bound[key] = self.params[key].check(value, kw_where)
            elif self.extra is not None:
                bound[key] = self.extra(key, value, kw_where)
            else:
                allowed = ", ".join(names) or "none"
                raise ArgumentError(
                    f"unknown argument {_short(key)}; allowed: {allowed}", f"{where}.kwargs"
                )
        for name in self.required:
            if name not in bound:
                raise ArgumentError(f"missing required argument {name!r}", where)
        if self.cross is not None:
            self.cross(bound, where)
        return bound


_FEATURES = Int(1, MAX_FEATURES)
_EPS = Float(0.0, 1.0)
_MOMENTUM = Maybe(Float(0.0, 1.0))
_DIM = Int(-8, 8)
_SHAPE = Ints(1, MAX_FEATURES, (1, 2, 3, 4))
_PROB = Float(0.0, 1.0)
_INPLACE = {"inplace": Bool()}


def _kernel(n: int, lo: int = 1) -> Ints:
    return Ints(lo, MAX_KERNEL, (n,))


def _conv(n: int) -> Signature:
    return Signature(
        {
            "in_channels": _FEATURES,
            "out_channels": _FEATURES,
            "kernel_size": _kernel(n),
            "stride": _kernel(n),
            "padding": AnyOf((Choice(("same", "valid")), _kernel(n, 0))),
            "dilation": _kernel(n),
            "groups": _FEATURES,
            "bias": Bool(),
            "padding_mode": Choice(("zeros", "reflect", "replicate", "circular")),
        },
        ("in_channels", "out_channels", "kernel_size"),
        _groups_divide("in_channels", "out_channels"),
    )


def _conv_transpose(n: int) -> Signature:
    return Signature(
        {
            "in_channels": _FEATURES,
            "out_channels": _FEATURES,
            "kernel_size": _kernel(n),
            "stride": _kernel(n),
            "padding": _kernel(n, 0),
            "output_padding": _kernel(n, 0),
            "groups": _FEATURES,
            "bias": Bool(),
            "dilation": _kernel(n),
            "padding_mode": Choice(("zeros",)),
        },
        ("in_channels", "out_channels", "kernel_size"),
        _groups_divide("in_channels", "out_channels"),
    )


def _groups_divide(*names: str) -> CrossCheck:
    def check(bound: dict[str, Any], where: str) -> None:
        groups = bound.get("groups", 1)
        for name in names:
            if bound[name] % groups:
                raise ArgumentError(f"{name} must be divisible by groups ({groups})", where)

    return check


def _group_norm_check(bound: dict[str, Any], where: str) -> None:
    if bound["num_channels"] % bound["num_groups"]:
        raise ArgumentError("num_channels must be divisible by num_groups", where)


def _embedding_check(bound: dict[str, Any], where: str) -> None:
    padding_idx = bound.get("padding_idx")
    n = bound["num_embeddings"]
    if padding_idx is not None and not -n <= padding_idx < n:
        raise ArgumentError(f"padding_idx must be within [-{n}, {n - 1}]", where)


def _hardtanh_check(bound: dict[str, Any], where: str) -> None:
    if bound.get("max_val", 1.0) <= bound.get("min_val", -1.0):
        raise ArgumentError("max_val must be greater than min_val", where)


def _upsample_check(bound: dict[str, Any], where: str) -> None:
    if (bound.get("size") is None) == (bound.get("scale_factor") is None):
        raise ArgumentError("give exactly one of size and scale_factor", where)


def _pool(n: int, avg: bool) -> Signature:
    params: dict[str, Param] = {
        "kernel_size": _kernel(n),
        "stride": Maybe(_kernel(n)),
        "padding": _kernel(n, 0),
    }
    if avg:
        params |= {"ceil_mode": Bool(), "count_include_pad": Bool()}
        if n > 1:
            params["divisor_override"] = Maybe(Int(1, MAX_KERNEL))
    else:
        params |= {"dilation": _kernel(n), "ceil_mode": Bool()}
    return Signature(params, ("kernel_size",))


def _norm(affine: str = "affine", running: bool = True) -> Signature:
    params: dict[str, Param] = {"num_features": _FEATURES, "eps": _EPS, "momentum": _MOMENTUM}
    params[affine] = Bool()
    if running:
        params["track_running_stats"] = Bool()
    return Signature(params, ("num_features",))


def _no_args() -> Signature:
    return Signature({})


def _inplace_only() -> Signature:
    return Signature(dict(_INPLACE))


#: The constructor signature of each layer type a sequential spec may name (``Sequential``
#: takes children, not arguments).
LAYER_ARGUMENTS: dict[str, Signature] = {
    "Sequential": _no_args(),
    "Identity": _no_args(),
    "Flatten": Signature({"start_dim": _DIM, "end_dim": _DIM}),
    "Unflatten": Signature(
        {"dim": _DIM, "unflattened_size": IntList(1, MAX_FEATURES, 8, 1)},
        ("dim", "unflattened_size"),
    ),
    "Linear": Signature(
        {"in_features": _FEATURES, "out_features": _FEATURES, "bias": Bool()},
        ("in_features", "out_features"),
    ),
    "Bilinear": Signature(
        {
            "in1_features": _FEATURES,
            "in2_features": _FEATURES,
            "out_features": _FEATURES,
            "bias": Bool(),
        },
        ("in1_features", "in2_features", "out_features"),
    ),
    "Conv1d": _conv(1),
    "Conv2d": _conv(2),
    "Conv3d": _conv(3),
    "ConvTranspose1d": _conv_transpose(1),
    "ConvTranspose2d": _conv_transpose(2),
    "Embedding": Signature(
        {
            "num_embeddings": _FEATURES,
            "embedding_dim": _FEATURES,
            "padding_idx": Maybe(Int(-MAX_FEATURES, MAX_FEATURES)),
            "max_norm": Maybe(Float(0.0, 1e30)),
            "norm_type": Float(0.0, 1e3),
            "scale_grad_by_freq": Bool(),
        },
        ("num_embeddings", "embedding_dim"),
        _embedding_check,
    ),
    "BatchNorm1d": _norm(),
    "BatchNorm2d": _norm(),
    "BatchNorm3d": _norm(),
    "InstanceNorm1d": _norm(),
    "InstanceNorm2d": _norm(),
    "LayerNorm": Signature(
        {"normalized_shape": _SHAPE, "eps": _EPS, "elementwise_affine": Bool(), "bias": Bool()},
        ("normalized_shape",),
    ),
    "GroupNorm": Signature(
        {"num_groups": _FEATURES, "num_channels": _FEATURES, "eps": _EPS, "affine": Bool()},
        ("num_groups", "num_channels"),
        _group_norm_check,
    ),
    "RMSNorm": Signature(
        {"normalized_shape": _SHAPE, "eps": Maybe(_EPS), "elementwise_affine": Bool()},
        ("normalized_shape",),
    ),
    "ReLU": _inplace_only(),
    "ReLU6": _inplace_only(),
    "LeakyReLU": Signature({"negative_slope": Float(-1e3, 1e3), **_INPLACE}),
    "ELU": Signature({"alpha": Float(0.0, 1e3), **_INPLACE}),
    "SELU": _inplace_only(),
    "CELU": Signature({"alpha": Float(1e-6, 1e3), **_INPLACE}),
    "GELU": Signature({"approximate": Choice(("none", "tanh"))}),
    "SiLU": _inplace_only(),
    "Mish": _inplace_only(),
    "Tanh": _no_args(),
    "Sigmoid": _no_args(),
    "Softplus": Signature({"beta": Float(1e-6, 1e3), "threshold": Float(0.0, 1e3)}),
    "Softsign": _no_args(),
    "Hardtanh": Signature(
        {"min_val": Float(-1e6, 1e6), "max_val": Float(-1e6, 1e6), **_INPLACE},
        cross=_hardtanh_check,
    ),
    "Hardswish": _inplace_only(),
    "Hardsigmoid": _inplace_only(),
    "LogSigmoid": _no_args(),
    "Softmax": Signature({"dim": Maybe(_DIM)}),
    "LogSoftmax": Signature({"dim": Maybe(_DIM)}),
    "Dropout": Signature({"p": _PROB, **_INPLACE}),
    "Dropout1d": Signature({"p": _PROB, **_INPLACE}),
    "Dropout2d": Signature({"p": _PROB, **_INPLACE}),
    "MaxPool1d": _pool(1, avg=False),
    "MaxPool2d": _pool(2, avg=False),
    "MaxPool3d": _pool(3, avg=False),
    "AvgPool1d": _pool(1, avg=True),
    "AvgPool2d": _pool(2, avg=True),
    "AvgPool3d": _pool(3, avg=True),
    "AdaptiveAvgPool1d": Signature({"output_size": _kernel(1)}, ("output_size",)),
    "AdaptiveAvgPool2d": Signature({"output_size": Ints(1, MAX_KERNEL, (2,))}, ("output_size",)),
    "AdaptiveMaxPool2d": Signature({"output_size": Ints(1, MAX_KERNEL, (2,))}, ("output_size",)),
    "Upsample": Signature(
        {
            "size": Maybe(Ints(1, MAX_KERNEL, (1, 2, 3))),
            "scale_factor": Maybe(Float(1e-3, 64.0)),
            "mode": Choice(("nearest", "linear", "bilinear", "bicubic", "trilinear")),
            "align_corners": Maybe(Bool()),
        },
        cross=_upsample_check,
    ),
    "ZeroPad2d": Signature({"padding": Ints(0, MAX_KERNEL, (4,))}, ("padding",)),
}

_ACTIVATIONS = Choice(("relu", "tanh", "gelu", "sigmoid"))

#: Keyword arguments of the builders shipped with the worker (``fimntk.worker.models``).
BUILDER_ARGUMENTS: dict[str, Signature] = {
    "mlp": Signature(
        {
            "in_features": _FEATURES,
            "hidden": IntList(1, MAX_FEATURES, 64),
            "out_features": _FEATURES,
            "activation": _ACTIVATIONS,
            "bias": Bool(),
        },
        ("in_features", "hidden", "out_features"),
        positional=False,
    ),
    "cnn": Signature(
        {
            "in_channels": Int(1, 4096),
            "num_classes": _FEATURES,
            "channels": Maybe(IntList(1, 4096, 16, 1)),
            "image_size": Int(1, 4096),
        },
        positional=False,
    ),
    "resnet": Signature(
        {
            "in_channels": Int(1, 4096),
            "num_classes": _FEATURES,
            "width": Int(1, 1024),
            "blocks": Int(1, 8),
        },
        positional=False,
    ),
}


def _lab_value(key: str, value: Any, where: str) -> Any:
    """A keyword argument of a lab builder that declares none: a bounded scalar, a short
    string or a short list of them."""
    if key.startswith("_") or key in {"device", "dtype"} or len(key) > MAX_STRING:
        raise ArgumentError("factory and private arguments are not allowed", where)
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ArgumentError(f"strings are at most {MAX_STRING} characters", where)
        return value
    if isinstance(value, list):
        if len(value) > MAX_LIST:
            raise ArgumentError(f"lists are at most {MAX_LIST} entries", where)
        return [_lab_value(key, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None:
        return None
    try:
        return AnyOf((Bool(), Int(-(2**31), 2**31), Float(-1e30, 1e30))).check(value, where)
    except ArgumentError:
        raise ArgumentError(
            "a lab builder argument is a number, a boolean, a short string or a list of them",
            where,
        ) from None


#: Signature of a lab builder that declares no ``ARGUMENTS``: keyword arguments only, each a
#: bounded scalar, short string or short list (no ``device``, ``dtype`` or private names).
LAB_BUILDER_DEFAULT = Signature({}, positional=False, extra=_lab_value)


def check_layer_arguments(
    kind: str, args: Sequence[Any], kwargs: Mapping[str, Any], where: str
) -> dict[str, Any]:
    """Check a layer's constructor arguments against its allowlisted signature.

    Args:
        kind: Layer type (a name in :data:`LAYER_ARGUMENTS`).
        args: Positional arguments from the spec.
        kwargs: Keyword arguments from the spec.
        where: Field path of the layer.

    Returns:
        The arguments by parameter name, ready for ``getattr(nn, kind)(**bound)``.

    Raises:
        ArgumentError: Unknown layer type, unknown or out-of-bounds argument.
    """
    signature = LAYER_ARGUMENTS.get(kind)
    if signature is None:
        raise ArgumentError(f"unknown layer type {_short(kind)}", f"{where}.type")
    return signature.bind(args, kwargs, where)


def check_builder_arguments(
    name: str,
    kwargs: Mapping[str, Any],
    where: str,
    declared: Mapping[str, Signature] | None = None,
) -> dict[str, Any]:
    """Check a builder's keyword arguments.

    Args:
        name: Builder name.
        kwargs: Keyword arguments from the spec.
        where: Field path of the architecture (``model.architecture``).
        declared: Signatures that lab modules declare (their ``ARGUMENTS``); a lab builder
            without one gets :data:`LAB_BUILDER_DEFAULT`.

    Returns:
        The checked keyword arguments.

    Raises:
        ArgumentError: Unknown or out-of-bounds argument.
    """
    signature = BUILDER_ARGUMENTS.get(name) or (declared or {}).get(name) or LAB_BUILDER_DEFAULT
    return signature.bind((), kwargs, where)


def check_architecture_size(
    layers: Sequence[Mapping[str, Any]],
    where: str,
    max_depth: int = MAX_DEPTH,
    max_modules: int = MAX_MODULES,
) -> None:
    """Refuse a layer tree deeper than ``max_depth`` or with more than ``max_modules`` modules.

    Iterative (no recursion), so it is safe on any nesting the JSON parser returned.

    Args:
        layers: Raw layer dicts (``{"type", "layers", ...}``) of a sequential architecture.
        where: Field path of ``layers``.
        max_depth: Most nested ``Sequential`` levels.
        max_modules: Most modules in all.

    Raises:
        ArgumentError: Naming the first layer past a cap.
    """
    stack: list[tuple[Sequence[Any], str, int]] = [(layers, where, 1)]
    count = 0
    while stack:
        children, path, depth = stack.pop()
        if depth > max_depth:
            raise ArgumentError(f"layers are nested more than {max_depth} deep", path)
        for i, layer in enumerate(children):
            count += 1
            if count > max_modules:
                raise ArgumentError(f"the architecture has more than {max_modules} modules", path)
            sub = layer.get("layers") if isinstance(layer, Mapping) else None
            if isinstance(sub, list):
                stack.append((sub, f"{path}[{i}].layers", depth + 1))
