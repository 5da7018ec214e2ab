"""Sharded jobs with real Redis and real worker processes.

One stack (API in process, its own queue and data directory on the shared Redis) runs every
representation and the NTK as one job (``shards=1``) and as four shards, first with one worker,
then two, then four. The sharded results must equal the one-worker result to 1e-6 (relative)
and be bitwise identical whatever the number of workers. Jobs compute in float64 on a tiny
model (CPU, deterministic), so the comparisons are tight and the module takes about a minute.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from safetensors.torch import load as st_load

from tests.service.conftest import ADMIN_KEY, REDIS_URL, auth, st_bytes, upload
from tests.service.prod import cleanup_queue, start_worker, stop_process, wait_for
from tests.service.test_prod_faults import Stack, _settings, stack

pytestmark = pytest.mark.timeout(600)

SHARDS = 4
#: Operations per job: tensors compared bitwise, scalars to the bit.
OPS = [{"op": "trace"}, {"op": "get_diag"}, {"op": "to_torch"}]
IMPLICIT_OPS = [
    {"op": "trace"},
    {"op": "get_diag"},
    {"op": "hutchinson_trace", "n_samples": 8, "seed": 2},
]
CASES: dict[str, dict[str, Any]] = {
    **{
        rep: {"representation": rep, "operations": OPS}
        for rep in ("dense", "diag", "blockdiag", "quasidiag", "kfac", "ekfac", "mixed")
    },
    "lowrank": {"representation": "lowrank", "operations": [{"op": "trace"}, {"op": "to_torch"}]},
    "implicit": {"representation": "implicit", "operations": IMPLICIT_OPS},
    "ekfac-no-update": {"representation": "ekfac", "update_diag": False, "operations": OPS},
    "empirical-centred": {
        "metric": "empirical_fim",
        "representation": "dense",
        "centering": True,
        "operations": OPS,
    },
    "kfac-mc": {
        "metric": "fim_mc",
        "representation": "kfac",
        "trials": 2,
        "seed": 5,
        "operations": OPS,
    },
    "ntk": {"metric": "ntk", "operations": [{"op": "trace"}, {"op": "to_torch"}]},
}


class Workers:
    """Worker processes of the stack, added on demand."""

    def __init__(self, s: Stack, logs: Path) -> None:
        self.stack = s
        self.logs = logs
        self.processes: list[subprocess.Popen[bytes]] = []

    def grow_to(self, count: int) -> None:
        while len(self.processes) < count:
            log = self.logs / f"worker{len(self.processes)}.log"
            self.processes.append(start_worker(self.stack.settings, log))
        wait_for(lambda: len(self.live()) >= count, 60, 0.2, f"{count} workers")

    def live(self) -> list[dict[str, Any]]:
        status = self.stack.client.get("/v1/admin/status", headers=auth(ADMIN_KEY))
        return list(status.json()["workers"])

    def stop(self) -> None:
        for process in self.processes:
            stop_process(process)


@pytest.fixture(scope="module")
def sharded_stack(
    tmp_path_factory: pytest.TempPathFactory, redis_client: redis.Redis
) -> Iterator[tuple[Stack, Workers]]:
    root = tmp_path_factory.mktemp("shards")
    with stack(_settings(root / "data", REDIS_URL)) as s:
        workers = Workers(s, root)
        try:
            yield s, workers
        finally:
            workers.stop()
            cleanup_queue(redis_client, s.settings.queue_name, s.jobs)


def _dataset(s: Stack) -> dict[str, Any]:
    """24 examples with targets, batches of 5 (shards of 6 split batches differently)."""
    name = "shards24"
    path = s.settings.datasets_dir / f"{name}.safetensors"
    if not path.exists():
        gen = torch.Generator().manual_seed(3)
        path.write_bytes(
            st_bytes(
                {
                    "inputs": torch.randn(24, 4, generator=gen),
                    "targets": torch.randint(0, 3, (24,), generator=gen),
                }
            )
        )
    return {"name": name, "batch_size": 5}


def _run(s: Stack, case: str, shards: int) -> list[dict[str, Any]]:
    """Submit a case, wait for it and return its outputs with tensors downloaded."""
    fields = {"metric": "fim", **CASES[case], "dtype": "float64", "shards": shards}
    if fields["metric"] == "ntk":
        fields["representation"] = None
    job = s.submit(dataset=_dataset(s), **fields)
    done = s.wait(job["id"], timeout=180)
    assert done["status"] == "succeeded", done
    if shards > 1:
        assert done["progress"]["shards"] == shards
        assert done["progress"]["done"] == done["progress"]["total"]
    result = s.client.get(f"/v1/jobs/{job['id']}/result", headers=auth(s.key)).json()
    outputs = []
    for op in result["operations"]:
        values = {}
        for name, value in op["outputs"].items():
            if isinstance(value, dict):
                body = s.client.get(value["href"], headers=auth(s.key)).content
                values[name] = st_load(body)["value"]
            else:
                values[name] = torch.tensor(float(value), dtype=torch.float64)
        outputs.append(values)
    assert not (s.settings.artifacts_dir / f"{job['id']}.shards").exists()
    return outputs


def _assert_close(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    for x, y in zip(a, b, strict=True):
        for name in x:
            torch.testing.assert_close(x[name], y[name], rtol=1e-6, atol=1e-9 * y[name].abs().max())


def _assert_identical(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    for x, y in zip(a, b, strict=True):
        for name in x:
            assert torch.equal(x[name], y[name]), name


def test_sharded_results_do_not_depend_on_the_workers(
    sharded_stack: tuple[Stack, Workers],
) -> None:
    s, workers = sharded_stack
    workers.grow_to(1)
    one_job = {case: _run(s, case, 1) for case in CASES}
    by_workers: dict[int, dict[str, Any]] = {}
    for count in (1, 2, 4):
        workers.grow_to(count)
        by_workers[count] = {case: _run(s, case, SHARDS) for case in CASES}
    for case in CASES:
        if case != "kfac-mc":  # Monte Carlo: other draws per shard, same on any worker count
            _assert_close(by_workers[1][case], one_job[case])
        _assert_identical(by_workers[2][case], by_workers[1][case])
        _assert_identical(by_workers[4][case], by_workers[1][case])


def test_a_failing_shard_fails_the_job_with_its_problem(
    sharded_stack: tuple[Stack, Workers],
) -> None:
    s, workers = sharded_stack
    workers.grow_to(1)
    d = sum(p.numel() for p in s.data.model.parameters())
    bad = upload(s.client, s.key, st_bytes({"v": torch.full((d,), float("nan"))}))
    job = s.submit(
        representation="implicit",
        dataset=_dataset(s),
        shards=3,
        operations=[{"op": "mv", "v": bad}],
    )
    done = s.wait(job["id"], timeout=120)
    assert done["status"] == "failed", done
    assert done["error"]["type"] == "/problems/invalid-input"
    assert done["error"]["field"] == "operations[0].v"
    assert "NaN" in done["error"]["detail"]
    partials = s.settings.artifacts_dir / f"{job['id']}.shards"
    wait_for(lambda: not partials.exists(), 30, 0.1, "the failed job's partials removed")


def test_auto_runs_a_small_job_as_one(sharded_stack: tuple[Stack, Workers]) -> None:
    s, workers = sharded_stack
    workers.grow_to(1)
    job = s.submit(representation="kfac", dataset=_dataset(s), shards="auto")
    done = s.wait(job["id"], timeout=120)
    assert done["status"] == "succeeded", done
    assert done["progress"]["shards"] is None


def test_more_shards_than_the_server_allows_are_refused(
    sharded_stack: tuple[Stack, Workers],
) -> None:
    s, _ = sharded_stack
    response = s.post(dataset=_dataset(s), shards=s.settings.max_shards + 1)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "shards"
    response = s.post(
        representation="implicit",
        dataset=_dataset(s),
        shards=2,
        operations=[{"op": "lanczos_eigenpairs", "k": 2}],
    )
    assert response.status_code == 422, response.text
    assert "one worker" in response.text
