"""What a succeeded job leaves for dashboards: its scalars as rows, and small JSON previews.

Scalars are every number of the result document (``trace``, ``vTMv``, ``norm``,
``hutchinson_trace.estimate``...), what the worker derives from computed spectra
(``lambda_max``, ``lambda_min``, ``effective_rank``), and per layer
the trace of each block of a layer-wise representation (``trace`` with the layer's name).
Previews are bounded, so that a page never downloads a safetensors file: at most
:data:`MAX_PREVIEW_VALUES` eigenvalues or density points, a Gram matrix averaged down to at
most :data:`MAX_GRAM_PREVIEW` squared cells, and at most :data:`MAX_FACTOR_VALUES` eigenvalues
of each Kronecker factor.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fimntk.core.storage.records import ScalarRow
from fimntk.engine.pspace import PMatLayerwise

#: Most values of a 1-d preview (eigenvalues, density grid).
MAX_PREVIEW_VALUES = 512
#: Largest side of the Gram preview.
MAX_GRAM_PREVIEW = 64
#: Most eigenvalues kept per Kronecker factor, and most layers previewed.
MAX_FACTOR_VALUES = 64
MAX_LAYERS = 256
#: Largest factor whose spectrum is computed for the preview (side).
MAX_FACTOR_SIDE = 4096


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _values(tensor: torch.Tensor, limit: int = MAX_PREVIEW_VALUES) -> list[float | None]:
    flat = tensor.detach().to("cpu", torch.float64).reshape(-1)[:limit]
    return [_finite(float(v)) for v in flat]


def effective_rank(eigenvalues: torch.Tensor) -> float:
    """Roy and Vetterli's effective rank :math:`\\exp(-\\sum_i p_i \\log p_i)` with
    :math:`p_i = |\\lambda_i| / \\sum_j |\\lambda_j|`, of the eigenvalues given (for a top-k
    spectrum, a lower bound of the full one's).

    >>> round(effective_rank(torch.tensor([1.0, 1.0, 1.0, 0.0])), 6)
    3.0
    """
    p = eigenvalues.detach().to("cpu", torch.float64).abs()
    total = float(p.sum())
    if total == 0.0 or not math.isfinite(total):
        return 0.0
    p = p[p > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def gram_preview(gram: torch.Tensor) -> dict[str, Any]:
    """A Gram matrix ``(c, n, c, n)`` (or ``(N, N)``) as at most
    :data:`MAX_GRAM_PREVIEW` squared cells, each the mean of a block of entries, and the
    ``(c, c)`` means of its class blocks."""
    g = gram.detach().to("cpu", torch.float64)
    classes = g.shape[0] if g.dim() == 4 else 1
    g = g.reshape(math.isqrt(g.numel()), -1)
    side = g.shape[0]
    cells = min(side, MAX_GRAM_PREVIEW)
    pooled = torch.nn.functional.adaptive_avg_pool2d(g[None, None], cells)[0, 0]
    per = side // classes
    blocks = g.reshape(classes, per, classes, per).mean(dim=(1, 3))
    return {
        "size": side,
        "classes": classes,
        "cells": [_values(row, cells) for row in pooled],
        "class_block_means": [_values(row, classes) for row in blocks],
    }


class OutputCollector:
    """Scalars and previews of one job, gathered while its operations run."""

    def __init__(self) -> None:
        self.scalars: list[ScalarRow] = []
        self.previews: dict[str, Any] = {}

    def scalar(self, key: str, value: float | str, layer: str | None = None) -> None:
        """A scalar of the result (non-finite ones, written as text, are stored as null)."""
        self.scalars.append(ScalarRow(key, layer, _finite(float(value))))

    def operation(self, op: str, outputs: dict[str, Any]) -> None:
        """The scalars of one operation's outputs: ``op`` for ``value``, else ``op.field``."""
        for field, value in outputs.items():
            if not isinstance(value, dict):
                self.scalar(op if field == "value" else f"{op}.{field}", value)

    def tensor(self, op: str, field: str, value: torch.Tensor, *, gram: bool = False) -> None:
        """Previews and derived scalars of a tensor output (``gram``: an NTK's ``to_torch``)."""
        if field == "eigenvalues":
            values = value.detach().to("cpu", torch.float64).reshape(-1)
            self.previews["eigenvalues"] = {"op": op, "values": _values(values)}
            if values.numel():
                self.scalar("lambda_max", float(values.max()))
                self.scalar("lambda_min", float(values.min()))
                self.scalar("effective_rank", effective_rank(values))
        elif gram:
            self.previews["gram"] = gram_preview(value)

    def density(self, grid: torch.Tensor, density: torch.Tensor) -> None:
        """The spectral density preview (every ``stride``-th point past the bound)."""
        stride = max(1, math.ceil(grid.numel() / MAX_PREVIEW_VALUES))
        self.previews["spectral_density"] = {
            "grid": _values(grid.reshape(-1)[::stride]),
            "density": _values(density.reshape(-1)[::stride]),
        }

    def layers(self, representation: Any) -> None:
        """Per-layer traces and Kronecker factor spectra of a layer-wise representation."""
        if not isinstance(representation, PMatLayerwise):
            return
        rows = []
        for name, block in list(representation.data.items())[:MAX_LAYERS]:
            trace = float(block.trace())
            self.scalar("trace", trace, layer=name)
            rows.append(
                {"layer": name, "kind": block.kind, "trace": _finite(trace), **_spectra(block)}
            )
        self.previews["layers"] = {"layers": rows}


def _spectra(block: Any) -> dict[str, list[float | None]]:
    """Top eigenvalues of a KFAC block's factors, or of an EKFAC block's eigenbasis scaling."""
    tensors = block.tensors()
    out = {}
    if block.kind == "kfac":
        for name in ("a", "g"):
            factor = tensors[name]  # (side, side), or a stack of them for shared weights
            if factor.dim() >= 2 and factor.shape[-1] <= MAX_FACTOR_SIDE:
                square = factor.detach().to("cpu", torch.float64)
                values = torch.linalg.eigvalsh(square.reshape(-1, *square.shape[-2:]))
                top = values.reshape(-1).sort(descending=True).values
                out[name] = _values(top, MAX_FACTOR_VALUES)
    elif block.kind == "ekfac":
        values = tensors["s"].detach().to("cpu", torch.float64).reshape(-1)
        out["s"] = _values(values.sort(descending=True).values, MAX_FACTOR_VALUES)
    return out
