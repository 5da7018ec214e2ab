"""Representations made of one block per layer: KFAC, EKFAC, QuasiDiag and Mixed.

A layered matrix is block-diagonal across layers; each layer's block has its own structure
(:mod:`fimntk.engine.pspace._blocks`). Which structure a layer gets is the representation's
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

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from fimntk.engine.errors import InvalidInputError
from fimntk.engine.generator.covariance import (
    KFAC_APPROX,
    DenseAcc,
    DiagAcc,
    EigenDiagAcc,
    KronAcc,
    QuasiDiagAcc,
)
from fimntk.engine.layers.norm import AffineNormKernel
from fimntk.engine.pspace._blocks import (
    Block,
    DenseBlock,
    DiagBlock,
    EKronBlock,
    KronBlock,
    QuasiDiagBlock,
)
from fimntk.engine.pspace.base import PMatAbstract
from fimntk.engine.vector import PVector

#: Largest layer (parameters) that gets an exact dense block where its structure is unknown.
DENSE_BLOCK_LIMIT = 4096

BLOCK_KINDS = ("kfac", "ekfac", "quasidiag", "dense", "diag")


def kron_capable(generator, name: str) -> bool:
    """Whether layer ``name`` has a hooked outer-product kernel whose bias folds."""
    k = generator.kernel(name)
    return k is not None and hasattr(k, "outer") and k.mat_layout() is not None


class PMatLayered(PMatAbstract):
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
    def _policy(self, generator) -> dict[str, str]:
        raise NotImplementedError

    def _fallback_kind(self, name: str) -> str:
        return "dense" if self.layer_collection[name].numel <= DENSE_BLOCK_LIMIT else "diag"

    def _compute(self, generator, examples: Iterable) -> dict[str, Block]:
        kinds: dict[str, str] = {}
        kron_accs: dict[str, KronAcc] = {}

        def make_accumulators() -> list:  # after the first batch has settled the paths
            kinds.update(self._policy(generator))
            accs = []
            for name, kind in kinds.items():
                kernel = generator.kernel(name)
                if kind in ("kfac", "ekfac"):
                    kron_accs[name] = KronAcc(name, self.kfac_approx)
                    accs.append(kron_accs[name])
                elif kind == "quasidiag":
                    accs.append(QuasiDiagAcc(name, kernel.mat_layout()))
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
                    st[0], st[1], generator.kernel(name).mat_layout(), kron_accs[name].rows
                )
                blocks[name] = EKronBlock.from_kron(blk) if kind == "ekfac" else blk
            elif kind == "quasidiag":
                blocks[name] = QuasiDiagBlock(st[0], st[1], generator.kernel(name).mat_layout())
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
    def _split(self, x: Tensor):
        for name, (start, end) in self.layer_collection.offsets().items():
            yield name, x[..., start:end]

    def _apply(self, v: PVector, fn) -> PVector:
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

    def frobenius_norm(self) -> Tensor:
        sq = sum(b.frob_sq() for b in self.data.values())
        return sq.sqrt().to(self._dtype)

    @property
    def _dtype(self) -> torch.dtype:
        return next(iter(next(iter(self.data.values())).tensors().values())).dtype

    def get_diag(self) -> Tensor:
        return torch.cat([self.data[e.name].diag() for e in self.layer_collection])

    def to_torch(self) -> Tensor:
        return torch.block_diag(*[self.data[e.name].dense() for e in self.layer_collection])

    def solve(self, v: PVector, regul: float = 1e-8) -> PVector:
        regul = self._check_regul(regul)
        return self._apply(v, lambda b, x: b.solve(x, regul))

    def inv(self, regul: float = 1e-8) -> PMatLayered:
        regul = self._check_regul(regul)
        return self._new({n: b.inv(regul) for n, b in self.data.items()})

    def pow(self, exponent: float, regul: float = 0.0) -> PMatLayered:
        """``M^exponent`` blockwise, damped like :meth:`solve` (KFAC: π-corrected factors)."""
        regul = self._check_regul(regul)
        return self._new({n: b.pow(float(exponent), regul) for n, b in self.data.items()})

    def _new(self, data: dict[str, Block]) -> PMatLayered:
        out = type(self)(self.layer_collection, data=data, kfac_approx=self.kfac_approx)
        out.paths = self.paths
        return out

    def __add__(self, other: PMatAbstract) -> PMatLayered:
        self._same(other, "+")
        return self._new({n: b.combine(other.data[n], 1.0) for n, b in self.data.items()})

    def __sub__(self, other: PMatAbstract) -> PMatLayered:
        self._same(other, "-")
        return self._new({n: b.combine(other.data[n], -1.0) for n, b in self.data.items()})

    def __mul__(self, x: float) -> PMatLayered:
        if isinstance(x, Tensor) and x.dim() == 0:
            x = x.item()
        if not isinstance(x, (int, float)):
            return NotImplemented
        return self._new({n: b.scaled(float(x)) for n, b in self.data.items()})

    __rmul__ = __mul__


class PMatKFAC(PMatLayered):
    """Kronecker-factored approximate curvature (Martens & Grosse 2015; KFC, Grosse & Martens 2016).

    Per Linear/Conv/Embedding layer ``F_l ≈ G ⊗ A`` in the ``[W | b]`` matrix view, with
    ``A = (1/n) Σ ã ãᵀ`` (inputs with a 1 appended for the bias) and ``G = (1/n) Σ_k g gᵀ``
    (output gradients of the pseudo-outputs); positions follow ``kfac_approx`` ("expand", default,
    or "reduce"; :mod:`fimntk.engine.generator.covariance`). Other layers get exact blocks.
    ``solve``, ``inv`` and ``pow`` damp the factors with the π-correction.
    """

    name = "kfac"

    def _policy(self, generator) -> dict[str, str]:
        return {
            e.name: "kfac" if kron_capable(generator, e.name) else self._fallback_kind(e.name)
            for e in self.layer_collection
        }

    @property
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer: (A, G)}`` for the Kronecker layers; ``A: (groups, P+1, P+1)``."""
        return {n: (b.a, b.g) for n, b in self.data.items() if isinstance(b, KronBlock)}


class PMatEKFAC(PMatLayered):
    """Eigenvalue-corrected KFAC (George, Laurent, Bouthillier, Ballas & Vincent, NeurIPS 2018).

    Built as KFAC in the Kronecker eigenbasis ``U_G ⊗ U_A``; :meth:`update_diag` re-estimates the
    eigenvalues as ``E[(U_Gᵀ ∇W U_A)²]`` from per-example gradients, which makes the trace exact
    and the approximation at least as close to the block-diagonal Fisher in Frobenius norm.
    Damping is exact (``s + λ``).
    """

    name = "ekfac"

    def _policy(self, generator) -> dict[str, str]:
        return {
            e.name: "ekfac" if kron_capable(generator, e.name) else self._fallback_kind(e.name)
            for e in self.layer_collection
        }

    def update_diag(self, examples: Iterable, generator: Any = None) -> PMatEKFAC:
        """Re-estimate the eigenvalues (and exact blocks) on ``examples``; returns ``self``."""
        gen = generator or self.generator
        if gen is None:
            raise InvalidInputError(
                "update_diag needs a Jacobian generator: pass generator=Jacobian(model, ...)"
            )
        accs = []
        for name, blk in self.data.items():
            if isinstance(blk, EKronBlock):
                accs.append(EigenDiagAcc(name, blk.u_a, blk.u_g, blk.layout))
            elif isinstance(blk, DenseBlock):
                accs.append(DenseAcc(name))
            else:
                accs.append(DiagAcc(name))
        stats = gen.accumulate(examples, accs, stage="ekfac update_diag")
        for name, blk in list(self.data.items()):
            st = stats[name]
            if isinstance(blk, EKronBlock):
                s, rest = st if blk.thin else (st, None)
                self.data[name] = EKronBlock(blk.u_a, blk.u_g, s, blk.layout, rest)
            elif isinstance(blk, DenseBlock):
                self.data[name] = DenseBlock(st)
            else:
                self.data[name] = DiagBlock(st)
        self.diag_updated = True
        return self

    diag_updated = False


class PMatQuasiDiag(PMatLayered):
    """Quasi-diagonal (Ollivier 2015): the diagonal plus each bias's interactions with its row.

    Layers with a bias and a matrix view (Linear, Conv, Embedding has none, normalisation layers)
    get a :class:`~fimntk.engine.pspace._blocks.QuasiDiagBlock`; the others their diagonal.
    """

    name = "quasidiag"

    def _policy(self, generator) -> dict[str, str]:
        out = {}
        for e in self.layer_collection:
            k = generator.kernel(e.name)
            layout = k.mat_layout() if k is not None else None
            out[e.name] = "quasidiag" if layout is not None and layout.bias else "diag"
        return out


class PMatMixed(PMatLayered):
    """A representation per layer.

    ``policy`` maps a layer name, a module type name (``"Linear"``), a path (``"hooks"``,
    ``"torch.func"``) or ``"default"`` to one of ``kfac``, ``ekfac``, ``quasidiag``, ``dense``,
    ``diag`` — the first match wins in that order. Defaults: KFAC where the layer allows it,
    dense blocks for normalisation layers, the diagonal for the ``torch.func`` path and for any
    other layer above ``DENSE_BLOCK_LIMIT`` parameters. A requested kind a layer cannot take
    falls back to the default for that layer instead of raising.
    """

    name = "mixed"

    def _set_options(self, policy: dict[str, str] | None = None, **options: Any) -> None:
        policy = dict(policy or {})
        bad = {k: v for k, v in policy.items() if v not in BLOCK_KINDS}
        if bad:
            raise InvalidInputError(f"unknown block kind(s) {bad}; use {list(BLOCK_KINDS)}")
        self.policy = policy
        super()._set_options(**options)

    def _new(self, data: dict[str, Block]) -> PMatMixed:
        out = PMatMixed(
            self.layer_collection, data=data, kfac_approx=self.kfac_approx, policy=self.policy
        )
        out.paths = self.paths
        return out

    def _default(self, generator, name: str) -> str:
        k = generator.kernel(name)
        if k is None:
            return "diag"
        if kron_capable(generator, name):
            return "kfac"
        if isinstance(k, AffineNormKernel):
            return "dense"
        return self._fallback_kind(name)

    def _allowed(self, generator, name: str, kind: str) -> bool:
        k = generator.kernel(name)
        if kind in ("kfac", "ekfac"):
            return kron_capable(generator, name)
        if kind == "quasidiag":
            return k is not None and k.mat_layout() is not None and k.mat_layout().bias
        return True

    def _policy(self, generator) -> dict[str, str]:
        paths = generator.paths
        out = {}
        for e in self.layer_collection:
            kind = None
            for key in (e.name, e.module_type, paths[e.name], "default"):
                if key in self.policy:
                    kind = self.policy[key]
                    break
            if kind is None or not self._allowed(generator, e.name, kind):
                kind = self._default(generator, e.name)
            out[e.name] = kind
        return out
