"""Function-space matrices: ``FMatDense``, e.g. the NTK Gram matrix of shape ``(c, n, c, n)``."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError, UnsupportedOperationError, unknown_norm_order
from fimntk.engine.vector import FVector

if TYPE_CHECKING:
    from fimntk.engine.generator import Jacobian
    from fimntk.engine.layercollection import LayerCollection


class FMatDense:
    """A dense ``(c, n, c, n)`` matrix on function space.

    ``K[k, i, l, j] = ⟨∂_θ f_k(x_i), ∂_θ f_l(x_j)⟩`` for the NTK (not divided by n).
    """

    name = "fdense"

    def __init__(self, data: Tensor, paths: dict[str, str] | None = None) -> None:
        if data.dim() != 4 or data.shape[:2] != data.shape[2:]:
            raise InvalidInputError(f"an FMatDense is (c, n, c, n); got {tuple(data.shape)}")
        self.data = data
        self.paths = paths or {}

    @classmethod
    def from_generator(
        cls,
        generator: Jacobian,
        examples: Iterable,
        layer_collection: LayerCollection | None = None,
    ) -> FMatDense:
        """The Gram matrix ``K[k, i, l, j] = ⟨g_{k,i}, g_{l,j}⟩`` of ``generator``'s
        pseudo-output gradients over ``examples`` (``C K C``, ``C = I_n − 11ᵀ/n``, when the
        generator centres), not divided by n: ``(K, n, K, n)``. With the identity
        pseudo-outputs it is :func:`~fimntk.engine.GramMatrix`'s NTK."""
        if layer_collection is not None:  # a sub-collection: differentiate only its layers
            generator = generator.for_layers(layer_collection)
        return cls(generator.get_gram_matrix(examples), paths=generator.paths)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def size(self) -> tuple[int, ...]:
        return self.shape

    def _flat(self) -> Tensor:
        c, n = self.data.shape[:2]
        return self.data.reshape(c * n, c * n)

    def mv(self, v: FVector) -> FVector:
        """``K v`` for ``v`` of shape ``(c, n)``."""
        t = v.get_flat_representation()
        if tuple(t.shape) != tuple(self.data.shape[:2]):
            raise InvalidInputError(
                f"the FVector has shape {tuple(t.shape)}; this matrix needs "
                f"{tuple(self.data.shape[:2])}"
            )
        return FVector((self._flat() @ t.reshape(-1)).reshape(t.shape))

    def vTMv(self, v: FVector) -> Tensor:
        return (v.get_flat_representation() * self.mv(v).get_flat_representation()).sum()

    def trace(self) -> Tensor:
        return torch.diagonal(self._flat()).sum()

    def _frobenius_norm(self) -> Tensor:
        return torch.linalg.vector_norm(self.data.double()).to(self.data.dtype)

    def norm(self, ord: str | int | None = None) -> Tensor:
        """Frobenius (``None``/``"fro"``) or spectral (``2``/``-2``: the largest/smallest
        ``|λ|`` of the ``(c·n, c·n)`` symmetric Gram matrix)."""
        if ord is None or ord == "fro":
            return self._frobenius_norm()
        if isinstance(ord, int | float) and ord in (2, -2):
            s = torch.linalg.eigvalsh(self._flat()).abs()
            return s.max() if ord == 2 else s.min()
        raise unknown_norm_order(ord)

    def frobenius_norm(self) -> Tensor:
        """Deprecated alias of ``norm()`` (NNGeometry deprecates it with the same warning)."""
        warnings.warn('Use norm(ord="fro") instead', DeprecationWarning, stacklevel=2)
        return self._frobenius_norm()

    def to_torch(self) -> Tensor:
        return self.data

    get_dense_tensor = to_torch

    def compute_eigendecomposition(self, impl: str = "eigh") -> None:
        """Eigenpairs of the ``(c·n, c·n)`` flattened matrix, kept for
        :meth:`get_eigendecomposition`: ``impl="eigh"`` (ascending eigenvalues) or ``"svd"``
        (singular values, descending; equal to the eigenvalues of this PSD matrix)."""
        if impl == "eigh":
            self._eig = torch.linalg.eigh(self._flat())
        elif impl == "svd":
            _, s, vh = torch.linalg.svd(self._flat())
            self._eig = (s, vh.mH)
        else:
            raise UnsupportedOperationError(f"impl must be 'eigh' or 'svd'; got {impl!r}")

    def get_eigendecomposition(self) -> tuple[Tensor, Tensor]:
        """``(evals (c·n,), evecs (c·n, c·n))`` from :meth:`compute_eigendecomposition`, the
        eigenvectors as columns."""
        eig = getattr(self, "_eig", None)
        if eig is None:
            raise InvalidInputError("call compute_eigendecomposition() first")
        return eig

    def eigenpairs(self, k: int | None = None) -> tuple[Tensor, Tensor]:
        """Top-k eigenvalues (descending) ``(k,)`` and eigenvectors ``(k, c, n)``."""
        c, n = self.data.shape[:2]
        evals, evecs = torch.linalg.eigh(self._flat())
        evals, evecs = evals.flip(0), evecs.flip(1)
        if k is not None:
            evals, evecs = evals[:k], evecs[:, :k]
        return evals, evecs.t().reshape(-1, c, n)

    def __add__(self, other: FMatDense) -> FMatDense:
        return FMatDense(self.data + other.data)

    def __sub__(self, other: FMatDense) -> FMatDense:
        return FMatDense(self.data - other.data)

    def __mul__(self, x: float) -> FMatDense:
        return FMatDense(self.data * x)

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"FMatDense(shape={self.shape})"
