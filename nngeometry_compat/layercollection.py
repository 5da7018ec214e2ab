"""``nngeometry.layercollection``: the collection, and NNGeometry's layer descriptions.

A description (``LinearLayer(in_features, out_features, bias=True)``, ...) names a layer's type
and sizes; ``LayerCollection.add_layer(name, description)`` turns it into the engine's
:class:`~fimntk.engine.layercollection.LayerEntry` (module path, type, parameter shapes as torch
lays them out), so a hand-built collection is the engine's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from fimntk.engine import LayerCollection
from fimntk.engine.layercollection import LayerEntry

_Shape = tuple[int, ...]


def _entry(name: str, module_type: str, weight: _Shape, bias: _Shape | None) -> LayerEntry:
    params: tuple[tuple[str, _Shape], ...] = (("weight", weight),)
    if bias is not None:
        params += (("bias", bias),)
    return LayerEntry(name, module_type, params)


def _pair(k: int | tuple[int, int]) -> tuple[int, int]:
    return (k, k) if isinstance(k, int) else (int(k[0]), int(k[1]))


@dataclass(frozen=True)
class LinearLayer:
    in_features: int
    out_features: int
    bias: bool = True

    def to_entry(self, name: str) -> LayerEntry:
        out = (self.out_features,) if self.bias else None
        return _entry(name, "Linear", (self.out_features, self.in_features), out)


@dataclass(frozen=True)
class Conv1dLayer:
    in_channels: int
    out_channels: int
    kernel_size: int | tuple[int]
    bias: bool = True

    def to_entry(self, name: str) -> LayerEntry:
        k = self.kernel_size if isinstance(self.kernel_size, int) else self.kernel_size[0]
        shape = (self.out_channels, self.in_channels, k)
        return _entry(name, "Conv1d", shape, (self.out_channels,) if self.bias else None)


@dataclass(frozen=True)
class Conv2dLayer:
    in_channels: int
    out_channels: int
    kernel_size: int | tuple[int, int]
    bias: bool = True

    def to_entry(self, name: str) -> LayerEntry:
        shape = (self.out_channels, self.in_channels, *_pair(self.kernel_size))
        return _entry(name, "Conv2d", shape, (self.out_channels,) if self.bias else None)


@dataclass(frozen=True)
class ConvTranspose2dLayer:
    in_channels: int
    out_channels: int
    kernel_size: int | tuple[int, int]
    bias: bool = True

    def to_entry(self, name: str) -> LayerEntry:
        shape = (self.in_channels, self.out_channels, *_pair(self.kernel_size))
        bias = (self.out_channels,) if self.bias else None
        return _entry(name, "ConvTranspose2d", shape, bias)


@dataclass(frozen=True)
class EmbeddingLayer:
    num_embeddings: int
    embedding_dim: int

    def to_entry(self, name: str) -> LayerEntry:
        return _entry(name, "Embedding", (self.num_embeddings, self.embedding_dim), None)


@dataclass(frozen=True)
class BatchNorm1dLayer:
    num_features: int

    def to_entry(self, name: str) -> LayerEntry:
        return _entry(name, "BatchNorm1d", (self.num_features,), (self.num_features,))


@dataclass(frozen=True)
class BatchNorm2dLayer:
    num_features: int

    def to_entry(self, name: str) -> LayerEntry:
        return _entry(name, "BatchNorm2d", (self.num_features,), (self.num_features,))


@dataclass(frozen=True)
class GroupNormLayer:
    num_groups: int
    num_channels: int

    def to_entry(self, name: str) -> LayerEntry:
        return _entry(name, "GroupNorm", (self.num_channels,), (self.num_channels,))


@dataclass(frozen=True)
class LayerNormLayer:
    normalized_shape: int | tuple[int, ...]
    bias: bool = True

    def to_entry(self, name: str) -> LayerEntry:
        shape = (
            (self.normalized_shape,)
            if isinstance(self.normalized_shape, int)
            else tuple(self.normalized_shape)
        )
        return _entry(name, "LayerNorm", shape, shape if self.bias else None)


__all__ = [
    "BatchNorm1dLayer",
    "BatchNorm2dLayer",
    "Conv1dLayer",
    "Conv2dLayer",
    "ConvTranspose2dLayer",
    "EmbeddingLayer",
    "GroupNormLayer",
    "LayerCollection",
    "LayerNormLayer",
    "LinearLayer",
]
