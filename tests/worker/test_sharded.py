"""The plan of sharded jobs and the reduce's refusal of a partial set (no processes)."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fimntk import engine
from fimntk.contract.vocabulary import JobStatus
from fimntk.core.config import Settings
from fimntk.core.shards import (
    bounds,
    namespace,
    output_name,
    parse_task_id,
    resolve_shards,
    task_id,
)
from fimntk.core.storage.artifacts import LocalArtifactStore
from fimntk.engine import partials
from fimntk.worker import shard_store


def test_bounds_are_fixed_ranges_without_padding() -> None:
    for n in (1, 7, 24, 1001):
        for s in range(1, min(n, 9) + 1):
            b = bounds(n, s)
            sizes = [hi - lo for lo, hi in itertools.pairwise(b)]
            assert b[0] == 0 and b[-1] == n and min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_auto_runs_one_shard_below_the_work_that_pays(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, shard_min_work=1e6, max_shards=8)
    assert resolve_shards("auto", 100, 9_000, settings) == 1
    assert resolve_shards("auto", 100, 10_000, settings) == 2
    assert resolve_shards("auto", 1000, 10_000, settings) == 8  # capped by max_shards
    assert resolve_shards(4, 3, 10, settings) == 3  # never more shards than examples
    assert resolve_shards(5, 100, 10, settings) == 5  # explicit: whatever the work


def test_task_ids_name_job_stage_and_index() -> None:
    assert parse_task_id(task_id("j_ab12", 3, 7)) == ("j_ab12", 3, 7)
    assert parse_task_id("j_ab12") is None


class _Records:
    """The one job record the shard store reads: running until ``status`` is changed."""

    def __init__(self) -> None:
        self.status = JobStatus.RUNNING

    def get_job(self, job_id: str) -> Any:
        return SimpleNamespace(id=job_id, status=self.status)


def _runner(tmp_path: Path) -> Any:
    return SimpleNamespace(artifacts=LocalArtifactStore(tmp_path / "artifacts"), records=_Records())


def _write_partials(runner: Any, plan: dict[str, Any], skip: int | None, wrong: int | None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    data = TensorDataset(torch.randn(plan["bounds"][-1], 3, dtype=torch.float64))
    for i, (lo, hi) in enumerate(zip(plan["bounds"][:-1], plan["bounds"][1:], strict=True)):
        if i == skip:
            continue
        loader = DataLoader(torch.utils.data.Subset(data, range(lo, hi)), batch_size=4)
        count = hi - lo + (1 if i == wrong else 0)
        part = partials.partial_of(engine.FIM(model, loader, "diag"), count)
        shard_store.save_partial(runner, "j_x", 0, i, part)


def test_the_reduce_refuses_a_missing_partial(tmp_path: Path) -> None:
    runner = _runner(tmp_path)
    plan = {"bounds": bounds(10, 3), "stages": [3, 1]}
    _write_partials(runner, plan, skip=1, wrong=None)
    with pytest.raises(shard_store.IncompleteShardsError, match="partial set"):
        shard_store.all_partials(runner, "j_x", 0, plan)


def test_the_reduce_refuses_a_partial_of_the_wrong_count(tmp_path: Path) -> None:
    runner = _runner(tmp_path)
    plan = {"bounds": bounds(10, 3), "stages": [3, 1]}
    _write_partials(runner, plan, skip=None, wrong=2)
    with pytest.raises(shard_store.IncompleteShardsError, match="shard 2"):
        shard_store.all_partials(runner, "j_x", 0, plan)


def test_a_complete_set_reduces(tmp_path: Path) -> None:
    runner = _runner(tmp_path)
    plan = {"bounds": bounds(10, 3), "stages": [3, 1]}
    _write_partials(runner, plan, skip=None, wrong=None)
    assert shard_store.all_partials(runner, "j_x", 0, plan).count == 10
    assert (tmp_path / "artifacts" / namespace("j_x") / f"{output_name(0, 2)}.safetensors").exists()


@pytest.mark.parametrize("status", [JobStatus.FAILED, JobStatus.CANCELED])
def test_a_partial_published_after_the_job_ended_is_removed(tmp_path: Path, status: str) -> None:
    """A sibling task that finishes after another failed (or after a cancel) publishes into a
    namespace the end's cleanup already removed: the publish removes it again."""
    runner = _runner(tmp_path)
    plan = {"bounds": bounds(10, 3), "stages": [3, 1]}
    _write_partials(runner, plan, skip=2, wrong=None)
    space = tmp_path / "artifacts" / namespace("j_x")
    assert (space / f"{output_name(0, 1)}.safetensors").exists()
    runner.records.status = status
    _write_partials(runner, plan, skip=None, wrong=None)
    assert not space.exists()
