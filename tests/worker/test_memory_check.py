"""Memory checked before it is spent (issue 19, defect 13)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fimntk.engine.memory import estimate_memory
from fimntk.worker.errors import JobProblemError
from fimntk.worker.memory_check import (
    activation_bytes,
    available_bytes,
    check_fits,
    check_hessian_fits,
    hessian_bytes,
)
from fimntk.worker.runner import first_line, is_out_of_memory


def _mlp() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(64, 1300), nn.Tanh(), nn.Linear(1300, 10))  # d ≈ 98k


def test_a_dense_fisher_past_memory_is_refused_naming_a_cheaper_one() -> None:
    model = _mlp()
    need = estimate_memory(model, "dense", 10)
    assert need > 30e9  # 4 d² bytes
    with pytest.raises(JobProblemError) as info:
        check_fits(model, "dense", 10, 100, torch.device("cpu"), available=2**30)
    doc = info.value.problem
    assert doc["type"].endswith("out-of-memory") and doc["field"] == "representation"
    assert doc["needed_bytes"] == need and doc["available_bytes"] == 2**30
    alternative = doc["alternative"]
    assert estimate_memory(model, alternative, 10, 100) <= 0.8 * 2**30
    assert str(need) in doc["detail"] and alternative in doc["detail"]
    check_fits(model, "diag", 10, 100, torch.device("cpu"), available=2**30)


def test_a_hessian_past_memory_is_refused_naming_a_cheaper_one() -> None:
    """``torch.func.hessian`` holds the running sum and one batch's Hessian (2 · 4 d² bytes for
    float32), the blocks twice Σ d_l²; only Hessian-vector products fit in 1 GiB."""
    model = _mlp()
    d1, d2 = 64 * 1300 + 1300, 1300 * 10 + 10
    d = d1 + d2
    assert hessian_bytes(model, "dense") == 2 * 4 * d * d
    assert hessian_bytes(model, "blockdiag") == 2 * 4 * (d1 * d1 + d2 * d2)
    assert hessian_bytes(model, "diag", working_bytes=10) == 2 * 4 * (d1 * d1 + d2 * d2) + d1 * 10
    for rep in ("dense", "blockdiag", "diag"):
        with pytest.raises(JobProblemError) as info:
            check_hessian_fits(model, rep, torch.device("cpu"), available=2**30)
        doc = info.value.problem
        assert doc["type"].endswith("out-of-memory") and doc["field"] == "representation"
        assert doc["alternative"] == "implicit" and "'implicit'" in doc["detail"]
        assert doc["needed_bytes"] == hessian_bytes(model, rep)
    check_hessian_fits(model, "implicit", torch.device("cpu"), available=2**30)


def test_the_worker_knows_its_memory() -> None:
    have = available_bytes(torch.device("cpu"))
    assert 2**24 < have < 2**50


def test_out_of_memory_runtime_errors_are_recognised() -> None:
    alloc = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory"
        "\nframe #0: c10::ThrowEnforceNotMet(char const*, int) + 0x58 (0x7f /usr/lib/libc10.so)"
    )
    assert is_out_of_memory(alloc) and is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert "\n" not in first_line(alloc) and "libc10" not in first_line(alloc)


def test_activation_bytes_from_a_probe_counts_every_output_times_the_batch() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 32 * 32, 10)
    )
    inputs = torch.randn(64, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs), batch_size=64)
    per_example = 4 * (16 * 32 * 32 * 3 + 10)  # conv, relu, flatten, linear outputs (float32)
    got = activation_bytes(model, loader, torch.device("cpu"), torch.float32)
    assert got == per_example * 64 * 3


def test_activations_past_memory_are_refused_naming_the_batch_size() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(JobProblemError) as caught:
        check_fits(model, "diag", 3, 100, torch.device("cpu"), available=10**6, working_bytes=10**7)
    problem = caught.value.problem
    assert problem["needed_bytes"] > problem["available_bytes"]
    assert "batch_size" in problem["detail"]
