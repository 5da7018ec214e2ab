"""Scalars and previews a job leaves for dashboards: bounded sizes and the values they hold."""

from __future__ import annotations

import math

import pytest
import torch

from fimntk.worker.outputs import (
    MAX_GRAM_PREVIEW,
    MAX_PREVIEW_VALUES,
    OutputCollector,
    effective_rank,
    gram_preview,
)


def test_effective_rank_of_flat_and_peaked_spectra() -> None:
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    p = torch.tensor([0.5, 0.25, 0.25])
    assert effective_rank(p * 8) == pytest.approx(math.exp(-(p * p.log()).sum().item()))


def test_gram_preview_is_bounded_and_averages_blocks() -> None:
    c, n = 3, 50
    gram = torch.randn(c * n, c * n, dtype=torch.float64)
    gram = (gram @ gram.T).reshape(c, n, c, n)
    preview = gram_preview(gram)
    assert preview["size"] == c * n and preview["classes"] == c
    assert len(preview["cells"]) == MAX_GRAM_PREVIEW
    assert all(len(row) == MAX_GRAM_PREVIEW for row in preview["cells"])
    means = torch.tensor(preview["class_block_means"], dtype=torch.float64)
    assert torch.allclose(means, gram.mean(dim=(1, 3)))


def test_gram_cells_are_block_means() -> None:
    gram = torch.randn(2, 64, 2, 64, dtype=torch.float64)
    cells = torch.tensor(gram_preview(gram)["cells"], dtype=torch.float64)
    blocks = gram.reshape(128, 128).reshape(64, 2, 64, 2).mean(dim=(1, 3))
    assert torch.allclose(cells, blocks)


def test_small_gram_is_kept_whole() -> None:
    gram = torch.arange(16.0).reshape(2, 2, 2, 2)
    assert gram_preview(gram)["cells"] == gram.reshape(4, 4).tolist()


def test_collector_scalars_and_bounded_previews() -> None:
    out = OutputCollector()
    out.operation("hutchinson_trace", {"estimate": 2.0, "stderr": "inf", "x": {"artifact": "a"}})
    out.operation("trace", {"value": 3.5})
    out.tensor("lanczos_eigenpairs", "eigenvalues", torch.linspace(10, 1, 1000))
    out.density(torch.linspace(0, 1, 2000), torch.ones(2000))
    got = {(r.key, r.layer): r.value for r in out.scalars}
    assert got[("hutchinson_trace.estimate", None)] == 2.0
    assert got[("hutchinson_trace.stderr", None)] is None  # not finite
    assert got[("trace", None)] == 3.5
    assert got[("lambda_max", None)] == 10.0 and got[("lambda_min", None)] == 1.0
    assert len(out.previews["eigenvalues"]["values"]) == MAX_PREVIEW_VALUES
    density = out.previews["spectral_density"]
    assert len(density["grid"]) == len(density["density"]) <= MAX_PREVIEW_VALUES
    assert "gram" not in out.previews
    out.tensor("to_torch", "value", torch.eye(4), gram=True)
    assert out.previews["gram"]["size"] == 4


def test_layers_only_of_layerwise_representations() -> None:
    out = OutputCollector()
    out.layers(object())
    assert out.scalars == [] and "layers" not in out.previews
