"""``nngeometry.layercollection``: the collection, and NNGeometry's layer descriptions.

A description (``LinearLayer(in_features, out_features, bias=True)``, ...) names a layer's type
and sizes, with NNGeometry's attributes: ``weight`` and ``bias`` (a :class:`Parameter` with
``size`` and ``numel()``, or None), ``numel()`` and ``has_bias()``.
``LayerCollection.add_layer(name, description)`` turns it into the engine's
:class:`~fimntk.engine.layercollection.LayerEntry` (module path, type, parameter shapes as torch
lays them out), and this package's :class:`LayerCollection` shows its layers as descriptions
again (``lc.layers``), so code that inspects NNGeometry's layer objects keeps working.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from typing import Any

from fimntk.engine import LayerCollection as EngineLayerCollection
from fimntk.engine.layercollection import LayerEntry

_Shape = tuple[int, ...]


class Parameter:
    """A parameter's shape, as NNGeometry's layer descriptions hold it."""

    def __init__(self, *size: int) -> None:
        self.size = tuple(int(s) for s in size)

    def numel(self) -> int:
        return math.prod(self.size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Parameter) and self.size == other.size

    def __hash__(self) -> int:
        return hash(self.size)

    def __repr__(self) -> str:
        return f"Parameter{self.size}"


def _pair(k: int | tuple[int, ...]) -> tuple[int, int]:
    return (k, k) if isinstance(k, int) else (int(k[0]), int(k[-1]))


class AbstractLayer:
    """A layer description: a module type and its ``weight`` (and ``bias``) shapes."""

    module_type = ""
    weight: Parameter
    bias: Parameter | None = None

    def numel(self) -> int:
        return self.weight.numel() + (self.bias.numel() if self.bias is not None else 0)

    def has_bias(self) -> bool:
        return self.bias is not None

    def to_entry(self, name: str) -> LayerEntry:
        params: tuple[tuple[str, _Shape], ...] = (("weight", self.weight.size),)
        if self.bias is not None:
            params += (("bias", self.bias.size),)
        return LayerEntry(name, self.module_type, params)

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and isinstance(other, AbstractLayer)
            and (self.weight, self.bias) == (other.weight, other.bias)
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.weight, self.bias))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight}, bias={self.bias})"


class LinearLayer(AbstractLayer):
    module_type = "Linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(out_features, in_features)
        self.bias = Parameter(out_features) if bias else None


class Conv1dLayer(AbstractLayer):
    module_type = "Conv1d"

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | tuple[int], bias: bool = True
    ) -> None:
        k = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (k,)
        self.weight = Parameter(out_channels, in_channels, k)
        self.bias = Parameter(out_channels) if bias else None


class Conv2dLayer(AbstractLayer):
    module_type = "Conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        bias: bool = True,
    ) -> None:
        k = _pair(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.weight = Parameter(*self._channels(), *k)
        self.bias = Parameter(out_channels) if bias else None

    def _channels(self) -> tuple[int, int]:
        """The weight's first two dimensions (torch's layout)."""
        return self.out_channels, self.in_channels


class ConvTranspose2dLayer(Conv2dLayer):
    module_type = "ConvTranspose2d"

    def _channels(self) -> tuple[int, int]:
        return self.in_channels, self.out_channels


class EmbeddingLayer(AbstractLayer):
    module_type = "Embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(num_embeddings, embedding_dim)


class BatchNorm1dLayer(AbstractLayer):
    module_type = "BatchNorm1d"

    def __init__(self, num_features: int) -> None:
        self.num_features = num_features
        self.weight = Parameter(num_features)
        self.bias = Parameter(num_features)


class BatchNorm2dLayer(BatchNorm1dLayer):
    module_type = "BatchNorm2d"


class GroupNormLayer(AbstractLayer):
    module_type = "GroupNorm"

    def __init__(self, num_groups: int, num_channels: int) -> None:
        self.num_groups, self.num_channels = num_groups, num_channels
        self.weight = Parameter(num_channels)
        self.bias = Parameter(num_channels)


class LayerNormLayer(AbstractLayer):
    module_type = "LayerNorm"

    def __init__(self, normalized_shape: int | tuple[int, ...], bias: bool = True) -> None:
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
        self.normalized_shape = tuple(shape)
        self.weight = Parameter(*self.normalized_shape)
        self.bias = Parameter(*self.normalized_shape) if bias else None


class RMSNormLayer(AbstractLayer):
    module_type = "RMSNorm"

    def __init__(self, normalized_shape: int | tuple[int, ...]) -> None:
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
        self.normalized_shape = tuple(shape)
        self.weight = Parameter(*self.normalized_shape)


class ModuleLayer(AbstractLayer):
    """Any other layer the engine handles (attention, a custom module): its type and its
    parameters by name; ``weight``/``bias`` are set where it has parameters of those names."""

    def __init__(self, entry: LayerEntry) -> None:
        self.module_type = entry.module_type
        self.params = OrderedDict((a, Parameter(*shape)) for a, shape in entry.params)
        self.weight = self.params.get("weight") or Parameter(0)
        self.bias = self.params.get("bias")

    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def to_entry(self, name: str) -> LayerEntry:
        return LayerEntry(
            name, self.module_type, tuple((a, p.size) for a, p in self.params.items())
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ModuleLayer)
            and self.module_type == other.module_type
            and self.params == other.params
        )

    def __hash__(self) -> int:
        return hash((self.module_type, tuple(self.params.items())))


_DESCRIPTIONS: dict[str, type[AbstractLayer]] = {
    c.module_type: c
    for c in (
        LinearLayer,
        Conv1dLayer,
        Conv2dLayer,
        ConvTranspose2dLayer,
        EmbeddingLayer,
        BatchNorm1dLayer,
        BatchNorm2dLayer,
        GroupNormLayer,
        LayerNormLayer,
        RMSNormLayer,
    )
}


def describe(entry: LayerEntry) -> AbstractLayer:
    """The NNGeometry description of an engine layer: the class of its module type when its
    parameters are exactly ``weight`` (and ``bias``), else a :class:`ModuleLayer`."""
    cls = _DESCRIPTIONS.get(entry.module_type)
    if cls is None or [a for a, _ in entry.params] not in (["weight"], ["weight", "bias"]):
        return ModuleLayer(entry)
    out = cls.__new__(cls)
    shapes = dict(entry.params)
    out.weight = Parameter(*shapes["weight"])
    out.bias = Parameter(*shapes["bias"]) if "bias" in shapes else None
    return out


class DescribedLayers(MutableMapping[str, AbstractLayer]):
    """A live view of a collection's entries as descriptions, ordered like NNGeometry's
    ``OrderedDict`` of layers (``popitem()`` takes the last layer, and removes it from the
    collection)."""

    def __init__(self, entries: OrderedDict[str, LayerEntry]) -> None:
        self._entries = entries

    def __getitem__(self, name: str) -> AbstractLayer:
        return describe(self._entries[name])

    def __setitem__(self, name: str, layer: Any) -> None:
        self._entries[name] = (
            layer.renamed(name) if isinstance(layer, LayerEntry) else (layer.to_entry(name))
        )

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def popitem(self, last: bool = True) -> tuple[str, AbstractLayer]:
        name, entry = self._entries.popitem(last=last)
        return name, describe(entry)


class LayerCollection(EngineLayerCollection):
    """The engine's collection, with NNGeometry's view of its layers: ``layers`` maps each name
    to a description (:func:`describe`, :class:`DescribedLayers`), so that
    ``type(layer) is LinearLayer``, ``layer.numel()`` and ``layer.weight.size`` work as in
    NNGeometry."""

    @property
    def layers(self) -> DescribedLayers:  # type: ignore[override]  # descriptions, not entries
        return DescribedLayers(self._entries)


__all__ = [
    "AbstractLayer",
    "BatchNorm1dLayer",
    "BatchNorm2dLayer",
    "Conv1dLayer",
    "Conv2dLayer",
    "ConvTranspose2dLayer",
    "DescribedLayers",
    "EmbeddingLayer",
    "GroupNormLayer",
    "LayerCollection",
    "LayerNormLayer",
    "LinearLayer",
    "ModuleLayer",
    "Parameter",
    "RMSNormLayer",
    "describe",
]
