"""Partial eigensolver (issue 19, defect 10): the top k of a dense matrix by Lanczos, checked
against a full eigendecomposition, with progress and a way to stop."""

from __future__ import annotations

import pytest
import torch

from fimntk.engine.partial_eigen import top_eigenpairs
from fimntk.engine.pspace.dense import PMatDense


def _fisher_like(d: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    jac = torch.randn(rank, d, generator=g, dtype=torch.float64)
    jac = jac * torch.logspace(0, -3, rank, dtype=torch.float64)[:, None]  # decaying spectrum
    return (jac.t() @ jac / rank).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_top_k_equal_the_full_solver(dtype: torch.dtype) -> None:
    matrix = _fisher_like(600, 300, dtype)
    stages: list[str] = []
    evals, evecs = top_eigenpairs(matrix, 5, lambda done, total, stage: stages.append(stage))
    full, full_vecs = torch.linalg.eigh(matrix.double())
    top = full.flip(0)[:5]
    assert torch.allclose(evals.double(), top, rtol=1e-4, atol=0)
    # Same invariant subspace: |<u_i, v_i>| = 1 for well separated eigenvalues.
    overlap = (evecs.double().t() @ full_vecs.flip(1)[:, :5]).diagonal().abs()
    assert torch.all(overlap > 1 - 1e-3)
    assert any("lanczos" in s for s in stages) and any("residuals" in s for s in stages)
    assert not any("full" in s for s in stages)


def test_dense_eigenpairs_uses_it_for_small_k_and_can_be_stopped() -> None:
    matrix = _fisher_like(400, 200, torch.float64)
    dense = PMatDense(None, data=matrix)  # type: ignore[arg-type]
    evals, _ = dense.eigenpairs(3)
    assert torch.allclose(evals, torch.linalg.eigvalsh(matrix).flip(0)[:3], rtol=1e-4)

    class StopRequestedError(Exception):
        pass

    calls = []

    def stop_at_ten(done: int, total: int | None, stage: str) -> None:
        calls.append(done)
        if len(calls) == 10:
            raise StopRequestedError

    with pytest.raises(StopRequestedError):
        dense.eigenpairs(3, progress=stop_at_ten)
    assert len(calls) == 10


def test_k_out_of_range() -> None:
    with pytest.raises(ValueError, match="k must be within"):
        top_eigenpairs(torch.eye(4, dtype=torch.float64), 5)
