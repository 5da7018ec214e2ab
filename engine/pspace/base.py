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

import functools
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from fimntk.engine.errors import (
    InvalidInputError,
    UnsupportedOperationError,
    unknown_norm_order,
)
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
            for_layers = getattr(generator, "for_layers", None)
            if callable(for_layers):  # a generator over other layers: differentiate these
                generator = self.generator = for_layers(layer_collection)
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
    def eigenvalues(self) -> Tensor:
        """All ``d`` eigenvalues of the symmetric matrix, ascending, ``(d,)``.

        This default diagonalises :meth:`to_torch` (``O(d³)``); the structured representations
        use their structure (a diagonal, per-block spectra, products of Kronecker factors'
        eigenvalues, the Gram of a low-rank factor)."""
        return torch.linalg.eigvalsh(self.to_torch())

    def norm(self, ord: str | int | None = None) -> Tensor:
        """``torch.linalg.norm``'s matrix norms: Frobenius (``None`` or ``"fro"``) or spectral:
        ``ord=2`` the largest singular value, ``ord=-2`` the smallest. ``M`` is symmetric, so
        its singular values are ``|λ_i|`` and the spectral norms are ``max |λ_i|`` and
        ``min |λ_i|`` over :meth:`eigenvalues` (0 for a singular matrix)."""
        if ord is None or ord == "fro":
            return self._frobenius_norm()
        if isinstance(ord, int | float) and ord in (2, -2):
            s = self.eigenvalues().abs()
            return s.max() if ord == 2 else s.min()
        raise unknown_norm_order(ord)

    def frobenius_norm(self) -> Tensor:
        """Deprecated alias of ``norm()`` (NNGeometry deprecates it with the same warning)."""
        warnings.warn('Use norm(ord="fro") instead', DeprecationWarning, stacklevel=2)
        return self._frobenius_norm()

    def get_dense_tensor(self) -> Tensor:
        """Alias of :meth:`to_torch` (NNGeometry paper spelling)."""
        return self.to_torch()

    def inverse(self, regul: float = 1e-8, **options: Any) -> PMatAbstract:
        """Deprecated alias of :meth:`inv` (NNGeometry deprecates it with the same warning);
        ``options`` go to :meth:`inv` (KFAC's ``use_pi``)."""
        warnings.warn(
            "inverse() is deprecated: use inv(regul) instead", DeprecationWarning, stacklevel=2
        )
        return self.inv(regul, **options)

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

    # ----- products with matrices and maps --------------------------------------------------
    def mm(self, other: Any) -> Any:
        """``M · X``.

        * ``X`` a PushForward map :class:`~fimntk.engine.pfmap.PFMapDense` ``J`` (``(K, n, d)``):
          the map ``J M`` (each row ``j`` becomes ``M j``: ``J Mᵀ``, which is ``J M`` for the
          symmetric matrices the representations hold), computed by the representation's
          structure (:meth:`_rows_times`).
        * ``X`` a matrix of the same representation: ``M X`` in that representation where the
          product stays in it (dense, diagonal, block-diagonal, scaled identity); other pairs
          raise :class:`UnsupportedOperationError`.
        """
        if _is_dense_map(other):
            if other.layer_collection != self.layer_collection:
                raise InvalidInputError("mm needs a map on the matrix's layer collection")
            d = self.layer_collection.numel()
            rows = self._rows_times(other.data.reshape(-1, d))
            return type(other)(self.layer_collection, data=rows.reshape(other.data.shape))
        if isinstance(other, PMatAbstract):
            self._same(other, "mm")
            return self._mm_same(other)
        raise InvalidInputError(
            f"mm takes a PFMapDense or a {type(self).__name__}; got {type(other).__name__} "
            "(use mv for a PVector)"
        )

    def mapTMmap(self, pfmap: Any, reduction: str = "sum") -> Tensor:
        """The quadratic form on each row of a stored PushForward map ``J`` (``(K, n, d)``):
        ``q[k, i] = J_kiᵀ M J_ki``, computed through the structure (:meth:`_rows_times`).
        ``reduction="diag"`` returns ``q`` ``(K, n)``; ``"sum"`` sums over the K outputs,
        ``(n,)`` (NNGeometry's names)."""
        if not _is_dense_map(pfmap):
            raise InvalidInputError(
                f"mapTMmap takes a PFMapDense; got {type(pfmap).__name__} (an implicit map: "
                "build PFMapDense from the same generator and examples)"
            )
        if pfmap.layer_collection != self.layer_collection:
            raise InvalidInputError("mapTMmap needs a map on the matrix's layer collection")
        if reduction not in ("sum", "diag"):
            raise InvalidInputError(f"reduction must be 'sum' or 'diag', got {reduction!r}")
        d = self.layer_collection.numel()
        rows = pfmap.data.reshape(-1, d)
        q = (rows * self._rows_times(rows)).sum(dim=1).reshape(pfmap.data.shape[:2])
        return q.sum(dim=0) if reduction == "sum" else q

    def mmap(self, other: Any) -> Any:
        """NNGeometry's name for :meth:`mm` with a map."""
        return self.mm(other)

    def __pow__(self, exponent: float) -> PMatAbstract:
        """``M ** e`` is ``M.pow(e)`` where the representation offers powers."""
        pow_ = getattr(self, "pow", None)
        if pow_ is None or not isinstance(exponent, int | float):
            return NotImplemented
        return pow_(exponent)

    def __matmul__(self, other: Any) -> Any:
        """``M @ v`` is :meth:`mv` for a :class:`PVector`, :meth:`mm` otherwise."""
        if isinstance(other, PVector):
            return self.mv(other)
        return self.mm(other)

    def matmat(self, vectors: Tensor) -> Tensor:
        """``M V`` for ``V: (d, r)`` (columns are vectors), batched through the structure."""
        return self._rows_times(vectors.t()).t()

    def _rows_times(self, rows: Tensor) -> Tensor:
        """``M`` applied to each row of ``rows: (m, d)``: ``(M rowsᵀ)ᵀ = rows Mᵀ``. This default
        runs one :meth:`mv` per row; the structured representations batch it."""
        outs = [self.mv(PVector(self.layer_collection, r)).get_flat_representation() for r in rows]
        return torch.stack(outs) if outs else rows.clone()

    def _solve_rows(self, rows: Tensor, regul: float) -> Tensor | None:
        """``(M + regul·I)⁻¹`` applied to each row of ``rows: (m, d)`` in one factorisation,
        where the representation offers it (else None: one :meth:`solve` per row)."""
        return None

    def _mm_same(self, other: PMatAbstract) -> PMatAbstract:
        raise UnsupportedOperationError(
            f"the product of two {type(self).__name__} is not a {type(self).__name__}: convert "
            "with to_torch() and use PMatDense"
        )

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

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its Jacobian generator (which holds the model and a function that
        need not pickle): a loaded matrix computes every operation on its values, and
        recomputing from data (``update_diag``) asks for a generator."""
        return {**self.__dict__, "generator": None}


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


def _is_dense_map(x: Any) -> bool:
    """A stored PushForward map (:class:`~fimntk.engine.pfmap.PFMapDense`, which imports this
    package, hence the test by shape): ``layer_collection`` and a ``(K, n, d)`` ``data``."""
    data = getattr(x, "data", None)
    return (
        not isinstance(x, PMatAbstract)
        and callable(getattr(x, "jvp", None))
        and isinstance(data, Tensor)
        and data.dim() == 3
        and isinstance(getattr(x, "layer_collection", None), LayerCollection)
    )


def solves_maps(solve: Callable[..., Any]) -> Callable[..., Any]:
    """Let a representation's ``solve(v, regul, ...)`` also take a PushForward map
    (:class:`~fimntk.engine.pfmap.PFMapDense`): it is then solved row by row
    (:meth:`PMatAbstract.solve_map`), as NNGeometry's ``solve`` does for a Jacobian."""

    @functools.wraps(solve)
    def wrapper(self: PMatAbstract, v: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(v, PVector):
            return solve(self, v, *args, **kwargs)
        if _is_dense_map(v):
            d = self.layer_collection.numel()
            if v.layer_collection != self.layer_collection:
                raise InvalidInputError("solve needs a map on the matrix's layer collection")
            extra = set(kwargs) - {"regul"}
            if len(args) + len(kwargs) <= 1 and not extra:  # all rows in one factorisation
                regul = self._check_regul(args[0] if args else kwargs.get("regul", 1e-8))
                at_once = self._solve_rows(v.data.reshape(-1, d), regul)
                if at_once is not None:
                    return type(v)(self.layer_collection, data=at_once.reshape(v.data.shape))
            rows = [
                solve(self, PVector(self.layer_collection, r), *args, **kwargs)
                for r in v.data.reshape(-1, d)
            ]
            flat = [r.get_flat_representation() for r in rows]
            data = torch.stack(flat).reshape(v.data.shape) if flat else v.data.clone()
            return type(v)(self.layer_collection, data=data)
        return solve(self, v, *args, **kwargs)

    return wrapper


def frobenius(t: Tensor) -> Tensor:
    """Frobenius norm accumulated in float64, returned in ``t``'s dtype."""
    return torch.linalg.vector_norm(t.double()).to(t.dtype)
