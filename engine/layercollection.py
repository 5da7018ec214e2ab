"""The parameters an object is about, grouped by layer, and their order in flat vectors.

A *layer* is a module that owns parameters directly (``recurse=False``), named by its path in
the model (``"features.0"``; the root module is ``""``). Layers come in the order of
``model.named_modules()`` and, inside a layer, parameters in the order of
``module.named_parameters(recurse=False)`` — weight before bias for every built-in layer. A flat
parameter vector is the concatenation of the flattened parameters in that order, so layer ``l``
occupies ``[offset(l), offset(l) + numel(l))``.

Parameters with ``requires_grad=False`` are left out. A parameter shared by several modules (tied
weights) is counted once, in the first layer that owns it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fimntk.engine.errors import InvalidInputError


@dataclass(frozen=True)
class LayerEntry:
    """One layer: its module path, module type and ``(attribute, shape)`` of its parameters."""

    name: str
    module_type: str
    params: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def numel(self) -> int:
        total = 0
        for _, shape in self.params:
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def param_names(self) -> list[str]:
        """Full names as in ``model.named_parameters()``."""
        return [f"{self.name}.{a}" if self.name else a for a, _ in self.params]

    def has_bias(self) -> bool:
        """Whether the layer has a ``bias`` parameter (a method, as NNGeometry's layers)."""
        return any(a == "bias" for a, _ in self.params)

    def renamed(self, name: str) -> LayerEntry:
        """This layer under another module path (same type and parameter shapes)."""
        return LayerEntry(name, self.module_type, self.params)

    @classmethod
    def of_module(cls, name: str, module: nn.Module) -> LayerEntry | None:
        """The entry of ``module`` (its trainable parameters of its own, not its children's), or
        None when it has none."""
        params = tuple(
            (attr, tuple(p.shape))
            for attr, p in module.named_parameters(recurse=False)
            if p.requires_grad
        )
        return cls(name, type(module).__name__, params) if params else None

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "type": self.module_type,
            "params": [[a, list(s)] for a, s in self.params],
        }

    @classmethod
    def from_json(cls, d: dict) -> LayerEntry:
        return cls(
            str(d["name"]),
            str(d["type"]),
            tuple((str(a), tuple(int(x) for x in s)) for a, s in d["params"]),
        )


class LayerCollection:
    """An ordered set of layers; defines the flat layout of parameter-space objects.

    Example::

        lc = LayerCollection.from_model(model)
        lc.numel()                 # d
        lc.offsets()["0"]          # (0, 650) for a Linear(64, 10) first layer
        sub = lc.sub(["2"])        # only some layers
    """

    def __init__(self, layers: Iterable[LayerEntry] = ()) -> None:
        self._entries: OrderedDict[str, LayerEntry] = OrderedDict((e.name, e) for e in layers)

    @property
    def layers(self) -> OrderedDict[str, Any]:
        """``{name: LayerEntry}`` in flat order."""
        return self._entries

    @classmethod
    def from_model(cls, model: nn.Module, layers: Iterable[str] | None = None) -> LayerCollection:
        """All layers of ``model`` with trainable parameters (or only those named in ``layers``)."""
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"expected a torch.nn.Module, got {type(model).__name__}")
        seen: set[int] = set()
        entries = []
        for name, module in model.named_modules(remove_duplicate=True):
            params = []
            for attr, p in module.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                params.append((attr, tuple(p.shape)))
            if params:
                entries.append(LayerEntry(name, type(module).__name__, tuple(params)))
        lc = cls(entries)
        if layers is not None:
            lc = lc.sub(layers)
        if len(lc) == 0:
            raise InvalidInputError(
                "the model has no parameters to differentiate (none with requires_grad=True): "
                "unfreeze some parameters or pass a layer_collection that names them"
            )
        return lc

    @classmethod
    def resolve(
        cls, model: nn.Module, layer_collection: LayerCollection | None = None
    ) -> LayerCollection:
        """``layer_collection``, or every trainable layer of ``model`` when it is ``None``.

        An empty collection is refused rather than read as "not given": it would otherwise
        silently stand for the whole model (an empty collection is falsy).
        """
        if layer_collection is None:
            return cls.from_model(model)
        if not isinstance(layer_collection, LayerCollection):
            raise InvalidInputError(
                f"layer_collection must be a LayerCollection, got "
                f"{type(layer_collection).__name__}: build one with LayerCollection.from_model"
            )
        if len(layer_collection) == 0:
            raise InvalidInputError(
                "layer_collection is empty, so there is nothing to differentiate: pass "
                "LayerCollection.from_model(model) (or leave layer_collection out for all layers)"
            )
        return layer_collection

    # ----- building a collection by hand (NNGeometry's API) ---------------------------------
    def add_layer(self, name: str, layer: Any) -> None:
        """Append a layer: a :class:`LayerEntry` (e.g. one of another collection's ``layers``),
        kept under ``name``, or a layer description with ``to_entry(name)`` (NNGeometry's
        ``LinearLayer(...)`` etc. in :mod:`fimntk.nngeometry.layercollection`)."""
        if name in self._entries:
            raise InvalidInputError(f"the collection already has a layer {name!r}")
        if isinstance(layer, LayerEntry):
            entry = layer if layer.name == name else layer.renamed(name)
        elif callable(getattr(layer, "to_entry", None)):
            entry = layer.to_entry(name)
        else:
            raise InvalidInputError(
                f"cannot add a {type(layer).__name__} as a layer: pass a LayerEntry or use "
                "add_layer_from_model(model, module)"
            )
        self._entries[name] = entry

    def add_layer_from_model(self, model: nn.Module, module: nn.Module) -> None:
        """Append ``module`` (a sub-module of ``model``) under its path in ``model``."""
        name = next((n for n, m in model.named_modules() if m is module), None)
        if name is None:
            raise InvalidInputError("the module is not a sub-module of the model")
        entry = LayerEntry.of_module(name, module)
        if entry is None:
            raise InvalidInputError(f"module {name!r} has no trainable parameters of its own")
        self.add_layer(name, entry)

    @property
    def p_pos(self) -> dict[str, int]:
        """``{layer: offset of its first parameter}`` in flat vectors (NNGeometry's name)."""
        return {name: start for name, (start, _) in self.offsets().items()}

    def get_layerid_module_map(self, model: nn.Module) -> dict[str, nn.Module]:
        """NNGeometry's name for :meth:`modules`."""
        return self.modules(model)

    def sub(self, names: Iterable[str]) -> LayerCollection:
        """The sub-collection of the named layers, kept in this collection's order."""
        wanted = list(names)
        unknown = [n for n in wanted if n not in self._entries]
        if unknown:
            raise InvalidInputError(
                f"unknown layer(s) {unknown}; known layers are {list(self._entries)}"
            )
        keep = set(wanted)
        return type(self)(e for n, e in self._entries.items() if n in keep)

    def __iter__(self) -> Iterator[LayerEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> LayerEntry:
        return self._entries[name]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayerCollection) and list(self) == list(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"LayerCollection({len(self)} layers, {self.numel()} parameters)"

    def numel(self) -> int:
        """Number of parameters d."""
        return sum(e.numel for e in self)

    def offsets(self) -> dict[str, tuple[int, int]]:
        """``{layer: (start, end)}`` in flat vectors."""
        out, start = {}, 0
        for e in self:
            out[e.name] = (start, start + e.numel)
            start += e.numel
        return out

    def param_names(self) -> list[str]:
        """Full parameter names in flat order."""
        return [n for e in self for n in e.param_names()]

    def parameters(self, model: nn.Module) -> list[torch.Tensor]:
        """The model's parameter tensors, in flat order."""
        named = dict(model.named_parameters(remove_duplicate=False))
        missing = [n for n in self.param_names() if n not in named]
        if missing:
            raise InvalidInputError(f"the model has no parameters named {missing}")
        declared = [shape for e in self for _, shape in e.params]
        for name, shape in zip(self.param_names(), declared):
            if tuple(named[name].shape) != shape:  # a collection built by hand (add_layer)
                raise InvalidInputError(
                    f"parameter {name} has shape {tuple(named[name].shape)} in the model but "
                    f"{shape} in the layer collection: describe the layer as the model has it"
                )
        return [named[n] for n in self.param_names()]

    def modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """``{layer: module}``."""
        mods = dict(model.named_modules(remove_duplicate=False))
        return {e.name: mods[e.name] for e in self}

    def to_json(self) -> list[dict]:
        return [e.to_json() for e in self]

    @classmethod
    def from_json(cls, data: list[dict]) -> LayerCollection:
        return cls(LayerEntry.from_json(d) for d in data)
