"""The base of parameter-space matrices (``PMat*``): the operations and their contracts.

Every representation offers, on a :class:`~fimntk.engine.vector.PVector` ``v`` of d entries:

* ``mv(v)`` → ``M v`` (PVector); ``vTMv(v)`` → ``vᵀ M v`` (0-d tensor);
* ``trace()``, ``norm()`` (Frobenius; deprecated alias ``frobenius_norm``), ``get_diag()``;
* ``to_torch()`` (alias ``get_dense_tensor``) → ``(d, d)``;
* ``solve(v, regul)`` → ``(M + regul·I)⁻¹ v``; ``inv(regul)`` (alias ``inverse``) → a matrix of
  the same representation (where the representation is closed under inversion);
* ``+``/``-`` with the same representation, ``*`` by a scalar.

A metric such as :func:`fimntk.engine.FIM` fills a representation from a Jacobian generator; the
matrix remembers which path each layer took in :attr:`paths`.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError, UnsupportedOperationError
from fimntk.engine.layercollection import LayerCollection
from fimntk.engine.vector import PVector


class PMatAbstract(ABC):
    """Abstract parameter-space matrix.

    Args:
        layer_collection: the layout of the d parameters.
        generator: a :class:`~fimntk.engine.generator.jacobian.Jacobian` to compute the matrix from.
        data: the stored tensors, when not computed (e.g. when loading a file).
        examples: the loader the generator iterates over.
    """

    #: Short name used in strings, files and errors.
    name: str = "abstract"

    def __init__(
        self,
        layer_collection: LayerCollection,
        generator: Any = None,
        data: Any = None,
        examples: Iterable | None = None,
        **options: Any,
    ) -> None:
        self.layer_collection = layer_collection
        self.generator = generator
        self.paths: dict[str, str] = {}
        self._set_options(**options)
        if data is None:
            if generator is None or examples is None:
                raise InvalidInputError(
                    f"{type(self).__name__} needs data=, or generator= and examples="
                )
            data = self._compute(generator, examples)
            self.paths = generator.paths
        self.data = data

    # ----- to implement ----------------------------------------------------------------------
    def _set_options(self, **options: Any) -> None:
        """Representation-specific options (e.g. ``kfac_approx``); none by default."""
        if options:
            raise InvalidInputError(f"{type(self).__name__} takes no option(s) {sorted(options)}")

    def _compute(self, generator: Any, examples: Iterable) -> Any:
        raise NotImplementedError

    @abstractmethod
    def mv(self, v: PVector) -> PVector:
        """``M v``."""

    def vTMv(self, v: PVector) -> Tensor:
        """``vᵀ M v`` as a 0-d tensor."""
        self._check_vector(v)
        return torch.dot(v.get_flat_representation(), self.mv(v).get_flat_representation())

    @abstractmethod
    def trace(self) -> Tensor:
        """``Σ_j M_jj``."""

    @abstractmethod
    def _frobenius_norm(self) -> Tensor:
        """``‖M‖_F``, accumulated in float64."""

    @abstractmethod
    def get_diag(self) -> Tensor:
        """The diagonal, ``(d,)``."""

    @abstractmethod
    def to_torch(self) -> Tensor:
        """The dense ``(d, d)`` matrix."""

    @abstractmethod
    def solve(self, v: PVector, regul: float = 1e-8) -> PVector:
        """``(M + regul·I)⁻¹ v``."""

    def inv(self, regul: float = 1e-8) -> PMatAbstract:
        """``(M + regul·I)⁻¹`` in the same representation."""
        raise UnsupportedOperationError(
            f"{type(self).__name__} is not closed under inversion: use solve(v, regul) instead"
        )

    def centered(self, mean: Tensor) -> PMatAbstract:
        """``M − ḡ ḡᵀ`` (centering of the empirical Fisher), where the representation allows."""
        raise UnsupportedOperationError(
            f"{type(self).__name__} cannot subtract a rank-one term exactly: use a dense, "
            "diagonal, block-diagonal or low-rank representation for a centered Fisher"
        )

    # ----- shared ------------------------------------------------------------------------------
    def norm(self, ord: str | None = None) -> Tensor:
        """The Frobenius norm (the only one defined for every representation)."""
        if ord not in (None, "fro"):
            raise InvalidInputError(f"unsupported norm ord={ord!r}; use the Frobenius norm")
        return self._frobenius_norm()

    def frobenius_norm(self) -> Tensor:
        """Deprecated alias of ``norm()`` (NNGeometry deprecates it with the same warning)."""
        warnings.warn('Use norm(ord="fro") instead', DeprecationWarning, stacklevel=2)
        return self._frobenius_norm()

    def get_dense_tensor(self) -> Tensor:
        """Alias of :meth:`to_torch` (NNGeometry paper spelling)."""
        return self.to_torch()

    def inverse(self, regul: float = 1e-8) -> PMatAbstract:
        """Deprecated alias of :meth:`inv` (NNGeometry deprecates it with the same warning)."""
        warnings.warn(
            "inverse() is deprecated: use inv(regul) instead", DeprecationWarning, stacklevel=2
        )
        return self.inv(regul)

    def size(self, dim: int | None = None) -> tuple[int, int] | int:
        d = self.layer_collection.numel()
        return (d, d) if dim is None else d

    @property
    def shape(self) -> tuple[int, int]:
        d = self.layer_collection.numel()
        return (d, d)

    def _check_vector(self, v: PVector) -> None:
        if not isinstance(v, PVector):
            raise InvalidInputError(
                f"expected a PVector, got {type(v).__name__}: wrap flat tensors with "
                "PVector(layer_collection, vector_repr=t)"
            )
        if v.layer_collection != self.layer_collection:
            d = v.layer_collection.numel()
            raise InvalidInputError(
                f"the vector's layer collection ({d} parameters) is not the matrix's "
                f"({self.layer_collection.numel()} parameters)"
            )

    def _check_regul(self, regul: float) -> float:
        regul = float(regul)
        if not regul >= 0:
            raise InvalidInputError(f"regul must be a non-negative number, got {regul}")
        return regul

    def _same(self, other: Any, op: str) -> None:
        if type(other) is not type(self):
            raise UnsupportedOperationError(
                f"{op} is defined between two {type(self).__name__}; got "
                f"{type(other).__name__}. Convert both with to_torch() and wrap the result in "
                "PMatDense(layer_collection, data=...) to combine different representations"
            )
        if other.layer_collection != self.layer_collection:
            raise InvalidInputError(f"{op} needs matrices on the same layer collection")

    def _map(self, fn: Callable[[Tensor], Any]) -> Any:
        """Apply ``fn`` to every stored tensor (``data`` may be a tensor, dict or tuple)."""
        return _tree_map(fn, self.data)

    def _zip(self, other: PMatAbstract, fn: Callable[[Tensor, Tensor], Any]) -> Any:
        return _tree_zip(fn, self.data, other.data)

    def _new(self, data: Any) -> PMatAbstract:
        return type(self)(self.layer_collection, data=data)

    def __add__(self, other: PMatAbstract) -> PMatAbstract:
        self._same(other, "+")
        return self._new(self._zip(other, torch.add))

    def __sub__(self, other: PMatAbstract) -> PMatAbstract:
        self._same(other, "-")
        return self._new(self._zip(other, torch.sub))

    def __mul__(self, x: float) -> PMatAbstract:
        if isinstance(x, Tensor) and x.dim() == 0:
            x = x.item()
        if not isinstance(x, (int, float)):
            return NotImplemented
        return self._new(self._map(lambda t: t * x))

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d={self.layer_collection.numel()})"


def _tree_map(fn, data):
    if isinstance(data, Tensor):
        return fn(data)
    if isinstance(data, dict):
        return {k: _tree_map(fn, v) for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(_tree_map(fn, v) for v in data)
    return data


def _tree_zip(fn, a, b):
    if isinstance(a, Tensor):
        return fn(a, b)
    if isinstance(a, dict):
        return {k: _tree_zip(fn, a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        return type(a)(_tree_zip(fn, x, y) for x, y in zip(a, b))
    return a


def frobenius(t: Tensor) -> Tensor:
    """Frobenius norm accumulated in float64, returned in ``t``'s dtype."""
    return torch.linalg.vector_norm(t.double()).to(t.dtype)
