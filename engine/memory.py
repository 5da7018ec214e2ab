"""Memory planning: how many bytes a representation will hold, before building it.

The estimate counts the stored tensors (what stays in memory after the computation):

=============  ==================================================================
dense          ``d²``
blockdiag      ``Σ_l d_l²``
diag           ``d``
quasidiag      ``d + Σ_l groups·Q·P`` (bias-row interactions)
kfac           ``Σ_l groups·((P+1)² + Q²)`` for Kronecker layers, else a dense block
               (``d_l ≤ 4096``) or the diagonal
ekfac          kfac plus the eigenvalues ``groups·Q·(P+1)`` (an upper bound: an input
               factor summed from fewer than (P+1)/2 vectors keeps a thin basis)
mixed          per layer, its default block
lowrank        ``K·n·d`` (K = pseudo-outputs per example, n examples)
implicit       a few vectors of d (the matrix is never stored)
ntk            ``(c·n)²`` for the Gram matrix
=============  ==================================================================

times the element size of ``dtype``. The working memory of one batch comes on top (per-example
gradients of one layer for ``K·batch_size`` rows at most).
"""

from __future__ import annotations

import torch
from torch import nn

from fimntk.engine.errors import InvalidInputError, MemoryBudgetError
from fimntk.engine.layercollection import LayerCollection
from fimntk.engine.layers import kernel_for
from fimntk.engine.layers.norm import AffineNormKernel
from fimntk.engine.pspace.layerwise import DENSE_BLOCK_LIMIT

#: Representations from the most to the least faithful, used to suggest a cheaper one.
CHEAPER = (
    "dense",
    "lowrank",
    "blockdiag",
    "ekfac",
    "kfac",
    "mixed",
    "quasidiag",
    "diag",
    "implicit",
)


def _layer_sizes(model: nn.Module, lc: LayerCollection) -> dict[str, dict[str, int]]:
    modules = lc.modules(model)
    out = {}
    for e in lc:
        k = kernel_for(modules[e.name])
        layout = k.mat_layout() if k is not None else None
        kron = layout is not None and hasattr(k, "outer")
        d = e.numel
        small = d * d if d <= DENSE_BLOCK_LIMIT else d
        info = {"d": d, "block": d * d, "fallback": small, "quasi": d}
        if layout is not None and layout.bias:
            info["quasi"] = d + layout.groups * layout.q * layout.p
        if kron and layout is not None:
            g, q, c = layout.groups, layout.q, layout.cols
            info["kfac"] = g * (c * c + q * q)
            info["ekfac"] = info["kfac"] + g * q * c
        else:
            info["kfac"] = info["ekfac"] = small
        if k is None:
            info["mixed"] = d
        elif kron:
            info["mixed"] = info["kfac"]
        elif isinstance(k, AffineNormKernel):
            info["mixed"] = d * d
        else:
            info["mixed"] = small
        out[e.name] = info
    return out


def estimate_elements(
    model: nn.Module,
    representation: str,
    n_output: int,
    n_examples: int | None = None,
    n_pseudo: int | None = None,
    layer_collection: LayerCollection | None = None,
) -> int:
    """Number of stored elements; see :func:`estimate_memory`."""
    lc = LayerCollection.resolve(model, layer_collection)
    rep = (
        representation.lower().removeprefix("pmat")
        if isinstance(representation, str)
        else getattr(representation, "name", "")
    )
    sizes = _layer_sizes(model, lc)
    d = lc.numel()
    k = n_output if n_pseudo is None else n_pseudo
    if rep == "dense":
        return d * d
    if rep == "diag":
        return d
    if rep == "implicit":
        return 4 * d
    if rep == "blockdiag":
        return sum(s["block"] for s in sizes.values())
    if rep in ("kfac", "ekfac", "mixed"):
        return sum(s[rep] for s in sizes.values())
    if rep == "quasidiag":
        return sum(s["quasi"] for s in sizes.values())
    if rep in ("lowrank", "ntk", "gram"):
        if n_examples is None:
            raise InvalidInputError(f"estimating '{rep}' needs n_examples")
        return k * n_examples * d if rep == "lowrank" else (n_output * n_examples) ** 2
    raise InvalidInputError(f"unknown representation {representation!r}")


def estimate_memory(
    model: nn.Module,
    representation: str,
    n_output: int,
    n_examples: int | None = None,
    dtype: torch.dtype | None = None,
    n_pseudo: int | None = None,
    layer_collection: LayerCollection | None = None,
) -> int:
    """Bytes a representation of ``model``'s Fisher (or its NTK, ``"ntk"``) will store.

    Args:
        model: the network (only its structure is read; a model on the meta device works).
        representation: ``"dense"``, ``"kfac"``, ... or ``"ntk"``.
        n_output: outputs per example c.
        n_examples: examples (needed for ``lowrank`` and ``ntk``).
        dtype: element type (default: the model's).
        n_pseudo: pseudo-outputs per example K (default c; 1 for the empirical Fisher,
            ``trials`` for Monte Carlo).
        layer_collection: restrict to some layers.

    Example::

        estimate_memory(model, "dense", n_output=10)  # 4·d² bytes for a float32 model
    """
    if dtype is None:
        dtype = next(model.parameters()).dtype
    size = torch.empty((), dtype=dtype).element_size()
    return size * estimate_elements(
        model, representation, n_output, n_examples, n_pseudo, layer_collection
    )


def check_budget(
    model: nn.Module,
    representation: str,
    budget: int,
    n_output: int,
    n_examples: int | None = None,
    n_pseudo: int | None = None,
    layer_collection: LayerCollection | None = None,
) -> int:
    """Raise :class:`MemoryBudgetError` naming the need and a cheaper representation that fits."""
    need = estimate_memory(
        model, representation, n_output, n_examples, None, n_pseudo, layer_collection
    )
    if need <= budget:
        return need
    rep = representation.lower().removeprefix("pmat")
    start = CHEAPER.index(rep) + 1 if rep in CHEAPER else 0
    fits = None
    for alt in CHEAPER[start:]:
        try:
            alt_need = estimate_memory(
                model, alt, n_output, n_examples, None, n_pseudo, layer_collection
            )
        except InvalidInputError:
            continue
        if alt_need <= budget:
            fits = (alt, alt_need)
            break
    hint = (
        f"; '{fits[0]}' needs {_fmt(fits[1])} and fits"
        if fits
        else "; no representation fits: raise the budget or use fewer layers"
    )
    raise MemoryBudgetError(
        f"representation '{rep}' needs {_fmt(need)}, over the budget of {_fmt(budget)}{hint}"
    )


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def cheaper_representation(representation: str) -> str:
    """The representation to suggest, without sizing the model, when ``representation`` does
    not fit: KFAC for those that store d² entries or dense blocks (and EKFAC), the diagonal for
    KFAC and everything below it in :data:`CHEAPER`.

    Args:
        representation: A representation name.

    Returns:
        ``"kfac"`` or ``"diag"``.
    """
    rep = representation.lower().removeprefix("pmat")
    below_kfac = rep in CHEAPER and CHEAPER.index(rep) >= CHEAPER.index("kfac")
    return "diag" if below_kfac else "kfac"
