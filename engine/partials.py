"""Partial statistics: a matrix computed over a range of examples, as sums that add up.

Every FIM representation stores statistics averaged over the n examples it saw,
``S = (1/n) Σ_i s_i`` (:mod:`fimntk.engine.metrics`). A *partial* holds ``n_s · S_s``, the sum
over the examples of one shard, in float64, together with ``n_s``. Partials of disjoint shards
add, in shard order, to the sum over all examples, and :func:`finalize` divides by
``N = Σ_s n_s`` and casts to the requested dtype:

.. math::

    S = \\frac{1}{N} \\sum_{s} n_s S_s .

What is additive, per representation (anything else is structure, kept from the first shard):

* dense, diagonal, block-diagonal: the whole matrix;
* KFAC, quasi-diagonal, mixed: each layer's factors ``A``, ``G`` (and ``A``'s rank bound, the
  number of vectors summed into it), quasi-diagonal ``d``, ``c``, and exact dense or diagonal
  blocks (Martens & Grosse 2015 define ``A = E[ã ãᵀ]``, ``G = E[g gᵀ]``: both are means);
* EKFAC: in a fixed eigenbasis ``U_G ⊗ U_A``, the corrected eigenvalues ``s`` and ``rest``
  (George et al. 2018); the basis itself comes from the reduced KFAC factors;
* low rank: the rows of ``J`` (stacked, rescaled from ``1/√n_s`` to ``1/√N``);
* the empirical Fisher's mean gradient (for centring), ``Σ_i g_i``.

Partials travel as safetensors files in the format of :mod:`fimntk.engine.serialization`, with
every symmetric matrix packed as its upper triangle (``d(d+1)/2`` numbers instead of ``d²``).

The NTK Gram is not a sum over examples but a set of independent tiles
``K[:, I_a, :, I_b]`` (Jacot et al. 2018): :func:`gram_factors` computes a block's per-layer
factors once, :func:`gram_tile` contracts two blocks' factors into one tile, and
:func:`gram_from_tiles` mirrors the upper-triangle tiles (``a ≤ b``) into the whole Gram.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fimntk.engine.errors import InvalidInputError, SerializationError
from fimntk.engine.estimators import _BLOCK, _as_operator, _check_int, _generator, _probes
from fimntk.engine.generator import Identity, Jacobian
from fimntk.engine.generator.jacobian import BatchJacobian, Progress
from fimntk.engine.layercollection import LayerCollection
from fimntk.engine.pspace import (
    EigenvalueCorrection,
    PMatAbstract,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatKFAC,
    PMatLayerwise,
    PMatLowRank,
)
from fimntk.engine.pspace.blocks import BLOCKS, Block, EKronBlock, KronBlock
from fimntk.engine.serialization import _decode, _encode

#: Key of the partial's own metadata in the safetensors header.
_META = "fimntk_partial"
#: Tensors of the engine format that hold symmetric matrices (packed on the wire).
_SYMMETRIC = re.compile(r"^(data|blocks\.\d+|blocks\.\d+\.(m|a|g))$")
#: Tensors of an EKFAC block that are structure (the eigenbasis), not statistics.
_BASIS = ("u_a", "u_g")


@dataclass
class Partial:
    """Statistics summed over ``count`` examples.

    Attributes:
        matrix: A representation whose additive tensors hold sums (float64), not means.
        count: Examples summed.
        extra: Other sums, by name (``"mean_gradient"``: ``Σ_i g_i``, shape ``(d,)``).
    """

    matrix: PMatAbstract
    count: int
    extra: dict[str, Tensor] = field(default_factory=dict)


def derive_seed(seed: int, round_: int, shard: int) -> int:
    """A seed for the Monte Carlo draws or probes of one shard of one round.

    Args:
        seed: The job's seed.
        round_: The round (1 or 2).
        shard: The shard index.

    Returns:
        A 63-bit seed, a hash of the three numbers: shards draw independent streams and the
        same shard draws the same stream wherever it runs.
    """
    digest = hashlib.sha256(f"{int(seed)}:{int(round_)}:{int(shard)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ----- building and adding partials ------------------------------------------------------------


def _additive(rep: PMatAbstract) -> dict[str, Tensor]:
    """The additive tensors of ``rep`` by a name that is stable across shards."""
    if isinstance(rep, PMatDense | PMatDiag):
        return {"data": rep.data}
    if isinstance(rep, PMatBlockDiag):
        return {f"block/{n}": t for n, t in rep.data.items()}
    if isinstance(rep, PMatLayerwise):
        return {
            f"{n}/{k}": t
            for n, blk in rep.data.items()
            for k, t in blk.tensors().items()
            if k not in _BASIS
        }
    raise InvalidInputError(
        f"{type(rep).__name__} is not a sum over examples: use one shard, or one of the "
        "dense, diag, blockdiag, quasidiag, kfac, ekfac, mixed or lowrank representations"
    )


def _rows(rep: PMatAbstract) -> dict[str, int | None]:
    """A's rank bound of each Kronecker layer."""
    if not isinstance(rep, PMatLayerwise):
        return {}
    return {n: b.rows for n, b in rep.data.items() if isinstance(b, KronBlock)}


def _rebuilt(rep: PMatAbstract, tensors: dict[str, Tensor], rows: dict[str, int | None]) -> Any:
    """A representation shaped like ``rep`` holding ``tensors`` (named as by :func:`_additive`)."""
    if isinstance(rep, PMatDense | PMatDiag):
        return type(rep)(rep.layer_collection, data=tensors["data"])
    if isinstance(rep, PMatBlockDiag):
        return PMatBlockDiag(
            rep.layer_collection, data={n: tensors[f"block/{n}"] for n in rep.data}
        )
    assert isinstance(rep, PMatLayerwise)
    blocks: dict[str, Block] = {}
    for name, blk in rep.data.items():
        own = {k: tensors[f"{name}/{k}"] for k in blk.tensors() if k not in _BASIS}
        own |= {k: t for k, t in blk.tensors().items() if k in _BASIS}
        new = BLOCKS[blk.kind].from_tensors(own, blk.layout)
        if isinstance(new, KronBlock):
            new.rows = rows.get(name)
        blocks[name] = new
    out = rep._new(blocks)
    if isinstance(rep, EigenvalueCorrection) and isinstance(out, EigenvalueCorrection):
        out.diag_updated = rep.diag_updated
    return out


def partial_of(rep: PMatAbstract, count: int, extra: dict[str, Tensor] | None = None) -> Partial:
    """The partial of a representation computed over ``count`` examples.

    Args:
        rep: A representation computed over one shard (means over its examples).
        count: Examples of the shard (``n_s ≥ 1``).
        extra: Other means over the shard (e.g. ``"mean_gradient"``), multiplied alike.

    Returns:
        ``n_s · S_s`` for every additive statistic, in float64.
    """
    if count < 1:
        raise InvalidInputError(f"a shard holds at least one example, got count={count}")
    sums = {k: v.detach().to(torch.float64) * count for k, v in (extra or {}).items()}
    if isinstance(rep, PMatLowRank):
        rows = rep.data.detach().to(torch.float64) * math.sqrt(count)
        return Partial(PMatLowRank(rep.layer_collection, data=rows), count, sums)
    scaled = {k: t.detach().to(torch.float64) * count for k, t in _additive(rep).items()}
    return Partial(_rebuilt(rep, scaled, _rows(rep)), count, sums)


def add_partials(parts: Sequence[Partial]) -> Partial:
    """Add partials in the order given (shard order), in float64.

    Args:
        parts: Partials of disjoint shards, all of the same representation and layers.

    Returns:
        Their sum; A's rank bounds add, low-rank rows are stacked.

    Raises:
        InvalidInputError: No partial, or partials of different shapes.
    """
    if not parts:
        raise InvalidInputError("no partial to add: every shard must deliver one")
    first = parts[0]
    count = sum(p.count for p in parts)
    extra = {k: _sum([p.extra[k] for p in parts]) for k in first.extra}
    if isinstance(first.matrix, PMatLowRank):
        stacked = torch.cat([p.matrix.data for p in parts])
        return Partial(PMatLowRank(first.matrix.layer_collection, data=stacked), count, extra)
    each = [_additive(p.matrix) for p in parts]
    if any(set(e) != set(each[0]) for e in each):
        raise InvalidInputError("partials hold different statistics: shards of different jobs?")
    summed = {k: _sum([e[k] for e in each]) for k in each[0]}
    rows: dict[str, int | None] = {}
    for name in _rows(first.matrix):
        bounds = [_rows(p.matrix).get(name) for p in parts]
        rows[name] = None if any(b is None for b in bounds) else sum(b for b in bounds if b)
    return Partial(_rebuilt(first.matrix, summed, rows), count, extra)


def _sum(tensors: list[Tensor]) -> Tensor:
    if any(t.shape != tensors[0].shape for t in tensors):
        raise InvalidInputError(
            f"partials of shapes {[list(t.shape) for t in tensors]} cannot be added"
        )
    total = tensors[0].to(torch.float64).clone()
    for t in tensors[1:]:
        total += t.to(torch.float64)
    return total


def finalize(part: Partial, dtype: torch.dtype) -> PMatAbstract:
    """The representation over all examples: sums divided by ``N``, cast to ``dtype``.

    With a ``"mean_gradient"`` sum the result is centred (``M − ḡ ḡᵀ``), as
    :func:`~fimntk.engine.metrics.EmpiricalFIM` does with ``centering=True``.
    """
    n = part.count
    if isinstance(part.matrix, PMatLowRank):
        rows = (part.matrix.data / math.sqrt(n)).to(dtype)
        rep: PMatAbstract = PMatLowRank(part.matrix.layer_collection, data=rows)
    else:
        means = {k: (t / n).to(dtype) for k, t in _additive(part.matrix).items()}
        rep = _rebuilt(part.matrix, means, _rows(part.matrix))
        for name, blk in rep.data.items() if isinstance(rep, PMatLayerwise) else ():
            if isinstance(blk, EKronBlock):
                rep.data[name] = EKronBlock(
                    blk.u_a.to(dtype), blk.u_g.to(dtype), blk.s, blk.layout, blk.rest
                )
    if "mean_gradient" in part.extra:
        rep = rep.centered((part.extra["mean_gradient"] / n).to(dtype))
    rep.paths = part.matrix.paths
    return rep


# ----- EKFAC -----------------------------------------------------------------------------------


def eigen_costs(kfac: PMatKFAC) -> dict[str, float]:
    """Cost of each Kronecker layer's eigendecompositions, ``groups · (c_A³ + c_G³)`` flops (up
    to a constant), by layer; other layers cost nothing."""
    out = {}
    for name, blk in kfac.data.items():
        if isinstance(blk, KronBlock):
            groups, c = blk.a.shape[0], blk.a.shape[-1]
            out[name] = float(groups * (c**3 + blk.g.shape[-1] ** 3))
    return out


def spread_by_cost(costs: dict[str, float], bins: int) -> list[list[str]]:
    """Layers into at most ``bins`` groups of about equal cost (longest first onto the least
    loaded group: Graham's LPT rule, within 4/3 of the best spread); empty groups dropped."""
    loads = [0.0] * max(1, bins)
    groups: list[list[str]] = [[] for _ in loads]
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        i = min(range(len(loads)), key=lambda j: (loads[j], j))
        loads[i] += costs[name]
        groups[i].append(name)
    return [sorted(g) for g in groups if g]


def eigenbases(kfac: PMatKFAC, layers: Iterable[str]) -> dict[str, EKronBlock]:
    """The EKFAC eigenbasis (with KFAC's eigenvalues) of the given Kronecker layers."""
    out = {}
    for name in layers:
        blk = kfac.data[name]
        if not isinstance(blk, KronBlock):
            raise InvalidInputError(f"layer {name!r} has no Kronecker factors")
        out[name] = EKronBlock.from_kron(blk)
    return out


def bases_to_tensors(bases: dict[str, EKronBlock]) -> dict[str, Tensor]:
    """Eigenbases as flat tensors named ``<layer>/<u_a|u_g|s|rest>`` (for a file)."""
    return {f"{n}/{k}": t for n, blk in bases.items() for k, t in blk.tensors().items()}


def bases_from_tensors(kfac: PMatKFAC, tensors: dict[str, Tensor]) -> dict[str, EKronBlock]:
    """Inverse of :func:`bases_to_tensors`, with each layer's layout from ``kfac``."""
    own: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        layer, name = key.rsplit("/", 1)
        own.setdefault(layer, {})[name] = t
    return {n: EKronBlock.from_tensors(t, kfac.data[n].layout) for n, t in own.items()}


def ekfac_from(kfac: PMatKFAC, bases: dict[str, EKronBlock]) -> PMatEKFAC:
    """The EKFAC of reduced KFAC factors: the given eigenbases for the Kronecker layers, the
    exact blocks of the others as they are."""
    data: dict[str, Block] = {n: bases.get(n, b) for n, b in kfac.data.items()}
    missing = [n for n, b in data.items() if isinstance(b, KronBlock)]
    if missing:
        raise InvalidInputError(f"no eigenbasis for layer(s) {missing}")
    out = PMatEKFAC(kfac.layer_collection, data=data, kfac_approx=kfac.kfac_approx)
    out.paths = kfac.paths
    return out


# ----- implicit products -----------------------------------------------------------------------


def probe_samples(rep: Any, op: str, n_samples: int, seed: int) -> Tensor:
    """Per-probe values of a Hutchinson estimate on ``rep``: ``z_jᵀ M z_j`` or ``z_j ⊙ M z_j``.

    Hutchinson's probes (Hutchinson 1989; Bekas et al. 2007 for the diagonal) depend only on the
    seed, so every shard draws the same probes ``z_j`` as
    :func:`~fimntk.engine.estimators.hutchinson_trace` would, and the shards' values add like
    the statistics. Kept per probe (not as a mean) so that the standard error of the sum over
    shards can be computed: :func:`probe_estimate`.

    Args:
        rep: The matrix (any representation; implicit products on one shard).
        op: ``"hutchinson_trace"`` or ``"hutchinson_diag"``.
        n_samples: Probes (≥ 2).
        seed: Seed of the probes (the operation's).

    Returns:
        ``(n_samples,)`` for the trace, ``(n_samples, d)`` for the diagonal, float64.
    """
    operator = _as_operator(rep)
    n_samples = _check_int("n_samples", n_samples, 2)
    g = _generator(seed)
    values = []
    for start in range(0, n_samples, _BLOCK):
        Z = _probes(g, operator, min(_BLOCK, n_samples - start), "rademacher")
        X = Z * operator.matmat(Z)  # (d, r)
        values.append(X.sum(dim=0) if op == "hutchinson_trace" else X.t())
    return torch.cat(values)


def probe_estimate(samples: Tensor) -> tuple[Tensor, Tensor]:
    """The mean over probes (dim 0) and its standard error ``s/√n``, as the estimators give."""
    return samples.mean(dim=0), samples.std(dim=0) / math.sqrt(samples.shape[0])


# ----- the NTK ---------------------------------------------------------------------------------


def tile_groups(shards: int) -> list[list[tuple[int, int]]]:
    """The upper-triangle tiles in groups of equal work: each off-diagonal tile alone, the
    diagonal tiles (symmetric: half the products of an off-diagonal one) two by two. Workers
    then finish together whatever order the queue hands the groups out in."""
    cross = [[(a, b)] for a, b in tile_pairs(shards) if a != b]
    diagonal = [(a, a) for a in range(shards)]
    return cross + [diagonal[i : i + 2] for i in range(0, shards, 2)]


def tile_pairs(shards: int) -> list[tuple[int, int]]:
    """The upper-triangle tiles ``(a, b)``, ``a ≤ b``, of a Gram over ``shards`` blocks, row
    by row."""
    return [(a, b) for a in range(shards) for b in range(a, shards)]


def _gram_generator(
    model: nn.Module, device: str | torch.device | None, progress: Progress | None
) -> Jacobian:
    lc = LayerCollection.from_model(model)
    return Jacobian(model, lc, pseudo_outputs=Identity(), device=device, progress=progress)


def gram_factors(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> dict[str, Tensor]:
    """The per-layer factors of a block of examples, from which any Gram tile is contracted.

    For each batch and layer: the layer's inputs and the output gradients of all c outputs
    (hooked layers, ``(x, ∂f/∂y)``; the Gram takes ``(x₁·x₂)(g₁·g₂)`` from them, Novak et al.
    2022), or its per-example gradients (layers on the ``torch.func`` path). Computing them is
    the forward and c backward passes; contracting two blocks' factors is the rest of the NTK.

    Args:
        model: The network.
        loader: The block's examples.
        device: Where batches go.
        progress: ``progress(done, total, stage)`` callback.

    Returns:
        Flat tensors: ``b<i>.n`` and ``b<i>.k`` (sizes), ``b<i>.x.<layer>``,
        ``b<i>.g.<layer>`` and ``b<i>.j.<layer>`` (per-example gradients).
    """
    gen = _gram_generator(model, device, progress)
    out: dict[str, Tensor] = {}
    for i, b in enumerate(gen.batches(loader, "gram factors", split=False)):
        out[f"b{i}.n"] = torch.tensor(b.n)
        out[f"b{i}.k"] = torch.tensor(b.k)
        for name, (x, g) in b.captured.items():
            out[f"b{i}.x.{name}"], out[f"b{i}.g.{name}"] = x.detach(), g.detach()
        for name, j in b.fallback.items():
            out[f"b{i}.j.{name}"] = j.detach()
    if not out:
        raise InvalidInputError("a Gram block needs examples: the loader yielded none")
    return out


def _batches(gen: Jacobian, factors: dict[str, Tensor]) -> list[BatchJacobian]:
    """The batches of :func:`gram_factors`, ready for :meth:`BatchJacobian.add_layer_gram`."""
    count = sum(1 for key in factors if key.endswith(".n") and key.count(".") == 1)
    out = []
    for i in range(count):
        captured, fallback = {}, {}
        for e in gen.layer_collection:
            x = factors.get(f"b{i}.x.{e.name}")
            if x is not None:
                captured[e.name] = (x.to(gen.device), factors[f"b{i}.g.{e.name}"].to(gen.device))
            j = factors.get(f"b{i}.j.{e.name}")
            if j is not None:
                fallback[e.name] = j.to(gen.device)
        kernels = {n: k for n in captured if (k := gen.kernel(n)) is not None}
        some = next(iter(factors.values()))
        dtype = next((t.dtype for t in factors.values() if t.is_floating_point()), some.dtype)
        out.append(
            BatchJacobian(
                int(factors[f"b{i}.n"]),
                int(factors[f"b{i}.k"]),
                kernels,
                captured,
                fallback,
                gen.layer_collection,
                dtype,
                gen.device,
            )
        )
    return out


def gram_tile(
    model: nn.Module,
    rows: dict[str, Tensor],
    cols: dict[str, Tensor] | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """The tile ``K[:, I_a, :, I_b]`` of the NTK Gram from two blocks' :func:`gram_factors`.

    Args:
        model: The network (its layer kernels contract the factors).
        rows: Factors of block a.
        cols: Factors of block b; ``None`` for the diagonal tile (a = b), whose lower batch
            pairs are mirrored.
        device: Where to contract.

    Returns:
        ``(c, n_a, c, n_b)``.
    """
    gen = _gram_generator(model, device, None)
    left = _batches(gen, rows)
    right = left if cols is None else _batches(gen, cols)
    k = left[0].k
    n_a, n_b = sum(b.n for b in left), sum(b.n for b in right)
    gram = torch.zeros(k, n_a, k, n_b, dtype=left[0].dtype, device=gen.device)
    starts_a = [0, *itertools.accumulate(b.n for b in left)]
    starts_b = [0, *itertools.accumulate(b.n for b in right)]
    for bi, b1 in enumerate(left):
        for bj, b2 in enumerate(right):
            if cols is None and bj > bi:
                break
            s1 = slice(starts_a[bi], starts_a[bi + 1])
            s2 = slice(starts_b[bj], starts_b[bj + 1])
            block = gram[:, s1, :, s2]
            for e in gen.layer_collection:
                b1.add_layer_gram(e.name, b2, block)
            if cols is None and bi != bj:
                gram[:, s2, :, s1] = block.permute(2, 3, 0, 1)
    return gram


def gram_from_tiles(tiles: dict[tuple[int, int], Tensor], bounds: Sequence[int]) -> Tensor:
    """The full ``(c, N, c, N)`` Gram from its upper-triangle tiles, mirrored
    (``K[:, I_b, :, I_a] = K[:, I_a, :, I_b]ᵀ``).

    Raises:
        InvalidInputError: A tile is missing or has the wrong shape.
    """
    shards = len(bounds) - 1
    missing = [p for p in tile_pairs(shards) if p not in tiles]
    if missing:
        raise InvalidInputError(f"tiles {missing} are missing: no Gram from a partial set")
    c = tiles[(0, 0)].shape[0]
    n = bounds[-1]
    first = tiles[(0, 0)]
    out = first.new_empty((c, n, c, n))
    for (a, b), tile in tiles.items():
        ia = slice(bounds[a], bounds[a + 1])
        ib = slice(bounds[b], bounds[b + 1])
        expected = (c, ia.stop - ia.start, c, ib.stop - ib.start)
        if tuple(tile.shape) != expected:
            raise InvalidInputError(f"tile {(a, b)} has shape {list(tile.shape)}, not {expected}")
        out[:, ia, :, ib] = tile
        if a != b:
            out[:, ib, :, ia] = tile.permute(2, 3, 0, 1)
    return out


# ----- files -----------------------------------------------------------------------------------


def pack_symmetric(m: Tensor) -> Tensor:
    """The upper triangles of the last two (equal) dimensions, row by row:
    ``(..., c, c) → (..., c(c+1)/2)``."""
    c = m.shape[-1]
    return torch.cat([m[..., i, i:] for i in range(c)], dim=-1).contiguous()


def unpack_symmetric(packed: Tensor, c: int) -> Tensor:
    """Inverse of :func:`pack_symmetric`: the symmetric ``(..., c, c)`` matrix (the lower
    triangle mirrors the upper one exactly)."""
    if packed.shape[-1] != c * (c + 1) // 2:
        raise SerializationError(f"{packed.shape[-1]} numbers do not pack a {c}×{c} triangle")
    out = packed.new_empty((*packed.shape[:-1], c, c))
    start = 0
    for i in range(c):
        row = packed[..., start : start + c - i]
        out[..., i, i:] = row
        out[..., i:, i] = row
        start += c - i
    return out


def save_partial(part: Partial, path: str | Path) -> None:
    """Write a partial: the engine's file format, symmetric matrices as packed triangles.

    Raises:
        SerializationError: The matrix cannot be saved.
    """
    tensors, meta = _encode(part.matrix)
    sizes: dict[str, int] = {}
    out: dict[str, Tensor] = {}
    for k, t in tensors.items():
        t = t.detach().cpu()
        if _SYMMETRIC.match(k) and t.dim() >= 2 and t.shape[-1] == t.shape[-2]:
            sizes[k] = t.shape[-1]
            t = pack_symmetric(t)
        out[f"m.{k}"] = t.contiguous()
    for k, t in part.extra.items():
        out[f"x.{k}"] = t.detach().cpu().contiguous()
    rows = {n: r for n, r in _rows(part.matrix).items() if r is not None}
    doc = {
        "object": type(part.matrix).__name__,
        "count": part.count,
        "packed": sizes,
        "rows": rows,
        "diag_updated": bool(getattr(part.matrix, "diag_updated", False)),
        **meta,
    }
    save_file(out, str(path), metadata={_META: json.dumps(doc)})


def load_partial(path: str | Path) -> Partial:
    """Read a partial written by :func:`save_partial`.

    Raises:
        SerializationError: Not a partial, or its tensors and metadata disagree.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise SerializationError(f"{path} is not a valid safetensors file: {err}") from err
    if raw is None:
        raise SerializationError(f"{path} is not a partial (no {_META!r} metadata)")
    doc = json.loads(raw)
    matrix_t = {}
    for k, t in tensors.items():
        if k.startswith("m."):
            name = k[2:]
            size = doc["packed"].get(name)
            matrix_t[name] = unpack_symmetric(t, int(size)) if size is not None else t
    try:
        matrix = _decode(path, doc, matrix_t)
    except (KeyError, AttributeError, TypeError, ValueError, IndexError) as err:
        raise SerializationError(f"{path}: metadata and tensors disagree: {err!r}") from err
    for name, bound in doc.get("rows", {}).items():
        blk = matrix.data.get(name)
        if isinstance(blk, KronBlock):
            blk.rows = int(bound)
    if isinstance(matrix, EigenvalueCorrection):
        matrix.diag_updated = bool(doc.get("diag_updated"))
    extra = {k[2:]: t for k, t in tensors.items() if k.startswith("x.")}
    return Partial(matrix, int(doc["count"]), extra)
