"""PushForward and PullBack: the Jacobian ``J`` as a linear map between parameter space and
function space (George et al. 2021, NNGeometry, section 2.2.1).

For a loader of n examples and K pseudo-outputs per example (the c outputs by default),
``J`` is ``(K, n, d)`` with ``J[k, i] = ∂ f_k(x_i) / ∂θ``:

* ``jvp(v)`` (push forward) → ``J v``, an :class:`FVector` ``(K, n)``;
* ``vjp(u)`` (pull back) → ``Jᵀ u = Σ_{k,i} u_{k,i} J[k, i]``, a :class:`PVector` ``(d,)``.

:class:`PFMapDense` stores ``J``; :class:`PFMapImplicit` stores nothing and makes one
forward-mode pass (``jvp``) or one backward pass (``vjp``) per batch. Neither divides by n
(the Fisher is ``(1/n) Jᵀ J`` for the regression variant).

Example::

    gen = Jacobian(model)
    J = PFMapDense(lc, generator=gen, examples=loader)
    J.vjp(J.jvp(v)).to_torch()   # n · F v for MSE with unit variance
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.generator.jacobian import Jacobian
from fimntk.engine.layercollection import LayerCollection
from fimntk.engine.pspace.implicit import PMatImplicit
from fimntk.engine.vector import FVector, PVector


def _check_pvector(lc: LayerCollection, v: PVector) -> Tensor:
    if not isinstance(v, PVector):
        raise InvalidInputError(
            f"expected a PVector, got {type(v).__name__}: wrap flat tensors with "
            "PVector(layer_collection, vector_repr=t)"
        )
    if v.layer_collection != lc:
        raise InvalidInputError("the vector's layer collection is not the map's")
    return v.get_flat_representation()


def _check_fvector(u: FVector, shape: tuple[int, ...] | None) -> Tensor:
    if not isinstance(u, FVector):
        raise InvalidInputError(
            f"expected an FVector, got {type(u).__name__}: wrap (K, n) tensors with FVector(t)"
        )
    t = u.get_flat_representation()
    if shape is not None and tuple(t.shape) != shape:
        raise InvalidInputError(
            f"the FVector has shape {tuple(t.shape)}; this map's function space is {shape} "
            "(pseudo-outputs, examples)"
        )
    return t


class PFMapDense:
    """``J`` stored as a ``(K, n, d)`` tensor (``data``), or computed by ``generator``.

    Args:
        layer_collection: the layout of the d parameters.
        generator: a :class:`Jacobian` (its pseudo-outputs give K).
        data: ``(K, n, d)``, when not computed.
        examples: the loader the generator iterates over.
    """

    def __init__(
        self,
        layer_collection: LayerCollection,
        generator: Jacobian | None = None,
        data: Tensor | None = None,
        examples: Iterable | None = None,
    ) -> None:
        self.layer_collection = layer_collection
        self.generator = generator
        if data is None:
            if generator is None or examples is None:
                raise InvalidInputError("PFMapDense needs data=, or generator= and examples=")
            generator = self.generator = generator.for_layers(layer_collection)
            data = generator.get_jacobian(examples)
        d = layer_collection.numel()
        if data.dim() != 3 or data.shape[2] != d:
            raise InvalidInputError(f"data must have shape (K, n, d={d}); got {tuple(data.shape)}")
        self.data = data

    def to_torch(self) -> Tensor:
        """``J``: ``(K, n, d)`` (not a copy)."""
        return self.data

    def __getstate__(self) -> dict:
        """Pickled without its generator (the model and a function that need not pickle)."""
        return {**self.__dict__, "generator": None}

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.data.size() if dim is None else self.data.size(dim)

    def to_torch_layer(self, layer: str) -> tuple[Tensor, ...]:
        """One layer's columns of ``J``, one ``(K, n, *shape)`` view per parameter (weight
        first, as NNGeometry's ``to_torch_layer``)."""
        if layer not in self.layer_collection.layers:
            raise InvalidInputError(
                f"unknown layer {layer!r}; known layers are {list(self.layer_collection.layers)}"
            )
        start = self.layer_collection.offsets()[layer][0]
        k, n = self.data.shape[:2]
        parts = []
        for _, shape in self.layer_collection[layer].params:
            size = math.prod(shape)
            parts.append(self.data[:, :, start : start + size].reshape(k, n, *shape))
            start += size
        return tuple(parts)

    def jvp(self, v: PVector) -> FVector:
        """``J v``: ``(K, n)``."""
        x = _check_pvector(self.layer_collection, v)
        return FVector(self.data @ x.to(self.data.dtype))

    def vjp(self, u: FVector) -> PVector:
        """``Jᵀ u``: ``(d,)`` for ``u`` of shape ``(K, n)``."""
        t = _check_fvector(u, tuple(self.data.shape[:2]))
        flat = self.data.reshape(-1, self.data.shape[2]).t() @ t.reshape(-1).to(self.data.dtype)
        return PVector(self.layer_collection, flat)

    def _same(self, other: PFMapDense) -> None:
        if not isinstance(other, PFMapDense) or other.data.shape != self.data.shape:
            raise InvalidInputError("+ and - need two PFMapDense of the same shape")

    def __add__(self, other: PFMapDense) -> PFMapDense:
        self._same(other)
        return PFMapDense(self.layer_collection, data=self.data + other.data)

    def __sub__(self, other: PFMapDense) -> PFMapDense:
        self._same(other)
        return PFMapDense(self.layer_collection, data=self.data - other.data)

    def __mul__(self, x: float) -> PFMapDense:
        if not isinstance(x, (int, float)) and not (isinstance(x, Tensor) and x.dim() == 0):
            return NotImplemented
        return PFMapDense(self.layer_collection, data=self.data * x)

    __rmul__ = __mul__


class PFMapImplicit:
    """``J`` as an operator, never stored: ``jvp`` by forward mode, ``vjp`` by one backward
    pass per batch (the same paths as :class:`PMatImplicit`).

    Args:
        layer_collection: the layout of the d parameters.
        generator: a :class:`Jacobian` (its pseudo-outputs give K).
        examples: the loader, iterated once per product.
    """

    def __init__(
        self, layer_collection: LayerCollection, generator: Jacobian, examples: Iterable
    ) -> None:
        if not isinstance(generator, Jacobian):
            raise InvalidInputError(
                f"generator must be a Jacobian, got {type(generator).__name__}: build one "
                "with Jacobian(model, layer_collection)"
            )
        generator = generator.for_layers(layer_collection)
        self.layer_collection = layer_collection
        self.generator = generator
        self.examples = examples
        self._op = PMatImplicit(  # centres its products itself (jvp, vjp)
            layer_collection, generator=generator.uncentred(), examples=examples
        )

    def jvp(self, v: PVector) -> FVector:
        """``J v``: ``(K, n)``; with the generator's ``centering``, ``J̃ v = C J v`` where
        ``C = I_n − 11ᵀ/n`` removes the mean over the examples."""
        _check_pvector(self.layer_collection, v)
        jv = self._op.push_forward(v)
        if self.generator.centering:
            jv = jv - jv.mean(dim=1, keepdim=True)
        return FVector(jv)

    def vjp(self, u: FVector) -> PVector:
        """``Jᵀ u``: ``(d,)`` for ``u`` of shape ``(K, n)`` in the loader's order; with the
        generator's ``centering``, ``J̃ᵀ u = Jᵀ C u`` (C symmetric)."""
        t = _check_fvector(u, None)
        if self.generator.centering:
            t = t - t.mean(dim=1, keepdim=True)
        return self._op.pull_back(t)


def random_pfmap(
    layer_collection: LayerCollection,
    output_size: tuple[int, int],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> PFMapDense:
    """A :class:`PFMapDense` of shape ``(K, n, d)`` with standard normal entries, for
    ``output_size = (K, n)``."""
    k, n = output_size
    if k < 1 or n < 1:
        raise InvalidInputError(f"output_size must be two positive sizes (K, n); got {output_size}")
    data = torch.randn(k, n, layer_collection.numel(), generator=generator, dtype=dtype)
    return PFMapDense(layer_collection, data=data.to(device))
