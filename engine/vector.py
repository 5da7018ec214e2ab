"""Vectors in parameter space (:class:`PVector`) and function space (:class:`FVector`).

A ``PVector`` is a flat tensor of d entries laid out by its :class:`LayerCollection` (see that
module for the order); :meth:`PVector.get_dict_representation` gives the per-layer view
``{layer: (weight, bias)}`` with the parameters' shapes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fimntk.engine.errors import InvalidInputError, NotDifferentiableError
from fimntk.engine.layercollection import LayerCollection


class PVector:
    """A vector of parameter space, e.g. a weight update or a gradient.

    Args:
        layer_collection: the layout.
        vector_repr: flat tensor ``(d,)``.
        dict_repr: alternatively ``{layer: tuple of tensors shaped like the parameters}``.
    """

    def __init__(
        self,
        layer_collection: LayerCollection,
        vector_repr: Tensor | None = None,
        dict_repr: dict[str, tuple[Tensor, ...]] | None = None,
    ) -> None:
        self.layer_collection = layer_collection
        d = layer_collection.numel()
        if vector_repr is None:
            if dict_repr is None:
                raise InvalidInputError("give vector_repr (a flat tensor) or dict_repr")
            parts: list[Tensor] = []
            for e in layer_collection:
                if e.name not in dict_repr:
                    raise InvalidInputError(f"dict_repr has no entry for layer {e.name!r}")
                parts.extend(t.reshape(-1) for t in dict_repr[e.name])
            vector_repr = torch.cat(parts)
        if vector_repr.dim() != 1 or vector_repr.numel() != d:
            raise InvalidInputError(
                f"a PVector of this layer collection has {d} entries; got a tensor of shape "
                f"{tuple(vector_repr.shape)}"
            )
        self._flat = vector_repr
        #: The parameters this vector was copied from (by :meth:`from_model`), else ``None``.
        self.source_parameters: tuple[Tensor, ...] | None = None

    @classmethod
    def from_model(
        cls, model: nn.Module, layer_collection: LayerCollection | None = None
    ) -> PVector:
        """A copy of the model's current parameters; it remembers them, so that :func:`grad`
        can differentiate a model's output with respect to this vector."""
        lc = LayerCollection.resolve(model, layer_collection)
        params = lc.parameters(model)
        v = cls(lc, torch.cat([p.detach().reshape(-1) for p in params]).clone())
        v.source_parameters = tuple(params)
        return v

    @classmethod
    def from_model_grad(
        cls, model: nn.Module, layer_collection: LayerCollection | None = None
    ) -> PVector:
        """The model's ``.grad`` fields (zeros where a gradient is missing)."""
        lc = LayerCollection.resolve(model, layer_collection)
        parts = [
            torch.zeros_like(p).reshape(-1) if p.grad is None else p.grad.reshape(-1)
            for p in lc.parameters(model)
        ]
        return cls(lc, torch.cat(parts).detach().clone())

    @classmethod
    def random(
        cls,
        layer_collection: LayerCollection,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> PVector:
        """Standard normal entries."""
        v = torch.randn(layer_collection.numel(), generator=generator, dtype=dtype)
        return cls(layer_collection, v.to(device))

    @classmethod
    def zeros_like_collection(
        cls,
        layer_collection: LayerCollection,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> PVector:
        return cls(
            layer_collection, torch.zeros(layer_collection.numel(), dtype=dtype, device=device)
        )

    def get_flat_representation(self) -> Tensor:
        """The flat tensor ``(d,)`` (not a copy)."""
        return self._flat

    to_torch = get_flat_representation

    def get_dict_representation(self) -> dict[str, tuple[Tensor, ...]]:
        """``{layer: (tensor per parameter, shaped like the parameter)}`` (views)."""
        out = {}
        offsets = self.layer_collection.offsets()
        for e in self.layer_collection:
            start = offsets[e.name][0]
            parts: list[Tensor] = []
            for _, shape in e.params:
                n = 1
                for s in shape:
                    n *= s
                parts.append(self._flat[start : start + n].reshape(shape))
                start += n
            out[e.name] = tuple(parts)
        return out

    def to_dict(self) -> dict[str, tuple[Tensor, ...]]:
        """NNGeometry's name for :meth:`get_dict_representation`."""
        return self.get_dict_representation()

    def copy_to_model(self, model: nn.Module) -> None:
        """Write this vector into the model's parameters."""
        self._into_model(model, add=False)

    def add_to_model(self, model: nn.Module) -> None:
        """Add this vector to the model's parameters in place (``θ ← θ + v``, a step)."""
        self._into_model(model, add=True)

    def _into_model(self, model: nn.Module, add: bool) -> None:
        with torch.no_grad():
            start = 0
            for p in self.layer_collection.parameters(model):
                n = p.numel()
                part = self._flat[start : start + n].reshape(p.shape)
                p.add_(part) if add else p.copy_(part)
                start += n

    def _check(self, other: PVector) -> None:
        if not isinstance(other, PVector):
            raise TypeError(f"expected a PVector, got {type(other).__name__}")
        if other.layer_collection != self.layer_collection:
            raise InvalidInputError("the two PVectors have different layer collections")

    def __add__(self, other: PVector) -> PVector:
        self._check(other)
        return PVector(self.layer_collection, self._flat + other._flat)

    def __sub__(self, other: PVector) -> PVector:
        self._check(other)
        return PVector(self.layer_collection, self._flat - other._flat)

    def __neg__(self) -> PVector:
        return PVector(self.layer_collection, -self._flat)

    def __mul__(self, x: float) -> PVector:
        if not isinstance(x, (int, float)) and not (isinstance(x, Tensor) and x.dim() == 0):
            return NotImplemented
        return PVector(self.layer_collection, self._flat * x)

    __rmul__ = __mul__

    def __truediv__(self, x: float) -> PVector:
        return PVector(self.layer_collection, self._flat / x)

    def __pow__(self, x: float) -> PVector:
        """Entrywise power ``v_j ** x`` (e.g. ``v ** 2`` for squared gradients)."""
        if not isinstance(x, (int, float)) and not (isinstance(x, Tensor) and x.dim() == 0):
            return NotImplemented
        return PVector(self.layer_collection, self._flat**x)

    def __iadd__(self, other: PVector) -> PVector:
        """In place: ``self += other`` writes into this vector's tensor."""
        self._check(other)
        self._flat.add_(other._flat)
        return self

    def __isub__(self, other: PVector) -> PVector:
        self._check(other)
        self._flat.sub_(other._flat)
        return self

    def __imul__(self, x: float) -> PVector:
        if not isinstance(x, (int, float)) and not (isinstance(x, Tensor) and x.dim() == 0):
            return NotImplemented
        self._flat.mul_(x)
        return self

    def size(self) -> tuple[int]:
        """``(d,)``, the number of parameters."""
        return (self._flat.numel(),)

    def dot(self, other: PVector) -> Tensor:
        """Inner product ``⟨self, other⟩``."""
        self._check(other)
        return torch.dot(self._flat, other._flat)

    __matmul__ = dot

    def norm(self, p: float = 2) -> Tensor:
        """The p-norm (accumulated in float64 for accuracy, returned in the vector's dtype)."""
        return torch.linalg.vector_norm(self._flat.double(), ord=p).to(self._flat.dtype)

    def clone(self) -> PVector:
        return PVector(self.layer_collection, self._flat.clone())

    def detach(self) -> PVector:
        return PVector(self.layer_collection, self._flat.detach())

    def to(self, *args: Any, **kwargs: Any) -> PVector:
        return PVector(self.layer_collection, self._flat.to(*args, **kwargs))

    @property
    def dtype(self) -> torch.dtype:
        return self._flat.dtype

    @property
    def device(self) -> torch.device:
        return self._flat.device

    def __repr__(self) -> str:
        return f"PVector(d={self._flat.numel()}, dtype={self._flat.dtype})"


class FVector:
    """A vector of function space: one value per output and example, shape ``(c, n)``."""

    def __init__(self, vector_repr: Tensor) -> None:
        if vector_repr.dim() != 2:
            raise InvalidInputError(
                f"an FVector is a (c, n) tensor; got shape {tuple(vector_repr.shape)}"
            )
        self._t = vector_repr

    def get_flat_representation(self) -> Tensor:
        """The ``(c, n)`` tensor."""
        return self._t

    to_torch = get_flat_representation

    def __add__(self, other: FVector) -> FVector:
        return FVector(self._t + other._t)

    def __sub__(self, other: FVector) -> FVector:
        return FVector(self._t - other._t)

    def __mul__(self, x: float) -> FVector:
        return FVector(self._t * x)

    __rmul__ = __mul__

    def dot(self, other: FVector) -> Tensor:
        return (self._t * other._t).sum()

    def norm(self) -> Tensor:
        return torch.linalg.vector_norm(self._t.double()).to(self._t.dtype)

    def __repr__(self) -> str:
        return f"FVector(shape={tuple(self._t.shape)})"


def grad(output: Tensor, vec: PVector, **kwargs: Any) -> PVector:
    """``∂ output / ∂ vec`` as a :class:`PVector` of ``vec``'s layout, for a scalar ``output``.

    ``vec`` is either a vector made by :meth:`PVector.from_model` (the gradient is then taken
    with respect to the model parameters it was copied from, as ``output.backward()`` would
    give them) or one whose flat tensor ``output`` was computed from. ``kwargs`` go to
    :func:`torch.autograd.grad` (e.g. ``retain_graph=True``).

    Example::

        v = PVector.from_model(model)
        g = grad(model(x).sum(), v)       # equals PVector.from_model_grad after .backward()
    """
    if not isinstance(vec, PVector):
        raise InvalidInputError(f"vec must be a PVector, got {type(vec).__name__}")
    if not isinstance(output, Tensor) or output.numel() != 1:
        raise InvalidInputError("output must be a scalar tensor: reduce it (e.g. .sum()) first")
    if vec.source_parameters is not None:
        grads = torch.autograd.grad(output, vec.source_parameters, allow_unused=True, **kwargs)
        parts = [
            torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
            for p, g in zip(vec.source_parameters, grads)
        ]
        return PVector(vec.layer_collection, torch.cat(parts))
    if not vec._flat.requires_grad:
        raise NotDifferentiableError(
            "vec is not part of output's graph: build it with PVector.from_model(model), or "
            "compute output from a vector whose tensor has requires_grad=True"
        )
    (g,) = torch.autograd.grad(output, vec._flat, allow_unused=True, **kwargs)
    return PVector(vec.layer_collection, torch.zeros_like(vec._flat) if g is None else g)
