"""The base of the representations made of one block per layer: KFAC (:mod:`.kfac`), EKFAC
(:mod:`.ekfac`), QuasiDiag (:mod:`.quasidiag`) and Mixed (:mod:`.mixed`).

A layerwise matrix is block-diagonal across layers; each layer's block has its own structure
(:mod:`fimntk.engine.pspace.blocks`). Which structure a layer gets is the representation's
*policy*:

========================  ===========================================================
representation            block per layer
========================  ===========================================================
``PMatKFAC``              Kronecker ``G ⊗ A`` for Linear, Conv1d/2d, Embedding; an exact
                          dense block for every other layer with at most
                          ``DENSE_BLOCK_LIMIT`` parameters, else its diagonal
``PMatEKFAC``             as KFAC, Kronecker blocks in their eigenbasis
``PMatQuasiDiag``         quasi-diagonal for layers with a bias (Linear, Conv, norms),
                          else the diagonal
``PMatMixed`` (default)   KFAC for Linear/Conv/Embedding, dense for normalisation layers,
                          diagonal for everything on the ``torch.func`` path
========================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.generator.accumulators import Accumulator, DenseAcc, DiagAcc, QuasiDiagAcc
from fimntk.engine.generator.kfac_factors import KFAC_APPROX, KronAcc
from fimntk.engine.layers import LayerKernel
from fimntk.engine.layers.layout import MatLayout
from fimntk.engine.pspace.base import PMatAbstract, solves_maps
from fimntk.engine.pspace.blocks import (
    Block,
    DenseBlock,
    DiagBlock,
    EKronBlock,
    KronBlock,
    QuasiDiagBlock,
)
from fimntk.engine.vector import PVector

if TYPE_CHECKING:
    from fimntk.engine.generator.jacobian import Jacobian

#: Largest layer (parameters) that gets an exact dense block where its structure is unknown.
DENSE_BLOCK_LIMIT = 4096

BLOCK_KINDS = ("kfac", "ekfac", "quasidiag", "dense", "diag")


def kron_capable(generator: Jacobian, name: str) -> bool:
    """Whether layer ``name`` has a hooked outer-product kernel whose bias folds."""
    k = generator.kernel(name)
    return k is not None and hasattr(k, "outer") and k.mat_layout() is not None


class PMatLayerwise(PMatAbstract):
    """Block-diagonal across layers; ``data = {layer: Block}``."""

    name = "layered"

    def _set_options(self, kfac_approx: str = "expand", **options: Any) -> None:
        if kfac_approx not in KFAC_APPROX:
            raise InvalidInputError(
                f"kfac_approx must be one of {list(KFAC_APPROX)}, got {kfac_approx!r}"
            )
        self.kfac_approx = kfac_approx
        super()._set_options(**options)

    # ----- building ----------------------------------------------------------------------------
    def _policy(self, generator: Jacobian) -> dict[str, str]:
        raise NotImplementedError

    def _fallback_kind(self, name: str) -> str:
        return "dense" if self.layer_collection[name].numel <= DENSE_BLOCK_LIMIT else "diag"

    def _compute(self, generator: Jacobian, examples: Iterable) -> dict[str, Block]:
        kinds: dict[str, str] = {}
        kron_accs: dict[str, KronAcc] = {}

        def make_accumulators() -> list:  # after the first batch has settled the paths
            kinds.update(self._policy(generator))
            accs: list[Accumulator] = []
            for name, kind in kinds.items():
                kernel = generator.kernel(name)
                if kind in ("kfac", "ekfac"):
                    kron_accs[name] = KronAcc(name, self.kfac_approx)
                    accs.append(kron_accs[name])
                elif kind == "quasidiag":
                    accs.append(QuasiDiagAcc(name, _layout_of(kernel)))
                elif kind == "dense":
                    accs.append(DenseAcc(name))
                else:
                    accs.append(DiagAcc(name))
            return accs

        stats = generator.accumulate(examples, make_accumulators, stage=self.name)
        blocks: dict[str, Block] = {}
        for name, kind in kinds.items():
            st = stats[name]
            if kind in ("kfac", "ekfac"):
                blk = KronBlock(
                    st[0], st[1], _layout_of(generator.kernel(name)), kron_accs[name].rows
                )
                blocks[name] = EKronBlock.from_kron(blk) if kind == "ekfac" else blk
            elif kind == "quasidiag":
                blocks[name] = QuasiDiagBlock(st[0], st[1], _layout_of(generator.kernel(name)))
            elif kind == "dense":
                blocks[name] = DenseBlock(st)
            else:
                blocks[name] = DiagBlock(st)
        return blocks

    @property
    def kinds(self) -> dict[str, str]:
        """``{layer: block kind}``."""
        return {n: b.kind for n, b in self.data.items()}

    # ----- operations --------------------------------------------------------------------------
    def _split(self, x: Tensor) -> Iterator[tuple[str, Tensor]]:
        for name, (start, end) in self.layer_collection.offsets().items():
            yield name, x[..., start:end]

    def _apply(self, v: PVector, fn: Callable[[Block, Tensor], Tensor]) -> PVector:
        self._check_vector(v)
        x = v.get_flat_representation()
        return PVector(
            self.layer_collection,
            torch.cat([fn(self.data[n], xl) for n, xl in self._split(x)], dim=-1),
        )

    def mv(self, v: PVector) -> PVector:
        return self._apply(v, lambda b, x: b.mm(x))

    def trace(self) -> Tensor:
        return sum(b.trace() for b in self.data.values())

    def _frobenius_norm(self) -> Tensor:
        sq = sum(b.frob_sq() for b in self.data.values())
        return sq.sqrt().to(self._dtype)

    @property
    def _dtype(self) -> torch.dtype:
        return next(iter(next(iter(self.data.values())).tensors().values())).dtype

    def get_diag(self, split_weight_bias: bool = True) -> Tensor:
        """The diagonal ``(d,)``; ``split_weight_bias=False`` orders each layer's entries as
        its matrix view (see :meth:`to_torch`)."""
        parts = [self.data[e.name].diag() for e in self.layer_collection]
        if not split_weight_bias:
            parts = [p[self._mat_order(e.name)] for p, e in zip(parts, self.layer_collection)]
        return torch.cat(parts)

    def _mat_order(self, name: str) -> Tensor | slice:
        """Indices of a layer's flat parameters in the row-major order of its matrix view
        ``(groups, Q, P [+ bias column])``: each output unit's weights then its bias (NNGeometry's
        ``split_weight_bias=False``); all of them in order for a layer without a matrix view."""
        layout = self.data[name].layout
        if layout is None:
            return slice(None)
        return layout.to_mat(torch.arange(layout.numel)).reshape(-1)

    def _mm_same(self, other: PMatAbstract) -> PMatLayerwise:
        """Layer by layer (:meth:`Block.product`): KFAC stays KFAC (``G₁G₂ ⊗ A₁A₂``)."""
        return self._new({n: _block_product(b, other.data[n]) for n, b in self.data.items()})

    def _rows_times(self, rows: Tensor) -> Tensor:
        """Each layer's block applied to all rows at once (blocks take leading dimensions)."""
        return torch.cat([self.data[n].mm(xl) for n, xl in self._split(rows)], dim=-1)

    def eigenvalues(self) -> Tensor:
        """The union of the layers' spectra (:meth:`Block.eigenvalues`), ascending."""
        spectra = [self.data[e.name].eigenvalues() for e in self.layer_collection]
        return torch.sort(torch.cat(spectra).to(self._dtype)).values

    def to_torch(self, split_weight_bias: bool = True) -> Tensor:
        """The dense ``(d, d)`` matrix in the parameters' order (``split_weight_bias=True``: each
        layer's weight, then its bias, as every other representation orders them). With
        ``False`` each layer's rows and columns follow its matrix view instead (a bias entry
        after the weights of its output unit: NNGeometry's mixed order, where ``G ⊗ A`` is a
        plain Kronecker product)."""
        blocks = [self.data[e.name].dense() for e in self.layer_collection]
        if not split_weight_bias:
            orders = [self._mat_order(e.name) for e in self.layer_collection]
            blocks = [b[o][:, o] for b, o in zip(blocks, orders)]
        return torch.block_diag(*blocks)

    @solves_maps
    def solve(self, v: PVector, regul: float = 1e-8, solve: str = "default") -> PVector:
        """``(M + regul·I)⁻¹ v`` blockwise; ``solve="lstsq"`` applies the pseudo-inverse
        instead, eigenvalues ``≤ regul`` dropped (:meth:`pinv`, NNGeometry's spelling)."""
        regul = self._check_regul(regul)
        if solve == "lstsq":
            return self.pinv(regul).mv(v)
        if solve != "default":
            raise InvalidInputError(f"solve must be 'default' or 'lstsq', got {solve!r}")
        return self._apply(v, lambda b, x: b.solve(x, regul))

    def pinv(self, atol: float = 1e-8) -> PMatLayerwise:
        """The pseudo-inverse blockwise: in each block's eigenbasis ``1/λ`` for ``λ > atol`` and
        0 otherwise. EKFAC blocks keep their basis; a KFAC block becomes an EKFAC block (the
        threshold applies to the products of its factors' eigenvalues, which leaves the
        Kronecker family); dense and diagonal blocks stay so; others become dense."""
        atol = self._check_regul(atol)
        return self._new({n: _block_pinv(b, atol) for n, b in self.data.items()})

    def inv(self, regul: float = 1e-8, use_pi: bool = True) -> PMatLayerwise:
        """``(M + regul·I)⁻¹`` blockwise; Kronecker blocks damp their factors with the
        π-correction (Martens & Grosse 2015, §6.3), or split ``√regul`` evenly with
        ``use_pi=False``."""
        regul = self._check_regul(regul)
        return self._new(
            {
                n: b.pow(-1.0, regul, use_pi=use_pi) if isinstance(b, KronBlock) else b.inv(regul)
                for n, b in self.data.items()
            }
        )

    def pow(self, exponent: float, regul: float = 0.0) -> PMatLayerwise:
        """``M^exponent`` blockwise, damped like :meth:`solve` (KFAC: π-corrected factors)."""
        regul = self._check_regul(regul)
        return self._new({n: b.pow(float(exponent), regul) for n, b in self.data.items()})

    def _new(self, data: dict[str, Block]) -> PMatLayerwise:
        out = type(self)(self.layer_collection, data=data, kfac_approx=self.kfac_approx)
        out.paths = self.paths
        return out

    def __add__(self, other: PMatAbstract) -> PMatLayerwise:
        self._same(other, "+")
        return self._new({n: b.combine(other.data[n], 1.0) for n, b in self.data.items()})

    def __sub__(self, other: PMatAbstract) -> PMatLayerwise:
        self._same(other, "-")
        return self._new({n: b.combine(other.data[n], -1.0) for n, b in self.data.items()})

    def __mul__(self, x: float) -> PMatLayerwise:
        if isinstance(x, Tensor) and x.dim() == 0:
            x = x.item()
        if not isinstance(x, (int, float)):
            return NotImplemented
        return self._new({n: b.scaled(float(x)) for n, b in self.data.items()})

    __rmul__ = __mul__


def _layout_of(kernel: LayerKernel | None) -> MatLayout:
    """The matrix view of a layer that its representation's policy gave a structured block."""
    layout = None if kernel is None else kernel.mat_layout()
    if layout is None:
        raise InvalidInputError("a structured block needs a layer with a matrix view")
    return layout


def _block_pinv(b: Block, atol: float) -> Block:
    if isinstance(b, KronBlock):
        return EKronBlock.from_kron(b).pinv(atol)
    if isinstance(b, (EKronBlock, DenseBlock, DiagBlock)):
        return b.pinv(atol)
    return DenseBlock(b.dense()).pinv(atol)


def _block_product(b: Block, c: Block) -> Block:
    """``B C`` in ``B``'s kind where it is closed under products, else a dense block (as a
    layer on the ``torch.func`` path holds, ``d_l²`` entries)."""
    same = b.product(c)
    return same if same is not None else DenseBlock(b.dense() @ c.dense())
