"""Fault drills of sharded jobs against real processes: a shard worker killed with SIGKILL, a
cancel during round 2 of EKFAC, Redis restarted (without persistence) between rounds. Each runs
its own stack with short heartbeats (``heartbeat_ttl_s`` 1.5 s, reaper every 0.25 s).

In every drill, a job either succeeds with the result of the same job on one worker, or ends
without a result and without partial artifacts: never a result from a partial set of shards.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from safetensors.torch import load as st_load

from tests.service.conftest import ADMIN_KEY, REDIS_URL, auth, st_bytes
from tests.service.prod import (
    RedisServer,
    cleanup_queue,
    start_worker,
    stop_process,
    wait_for,
)
from tests.service.test_prod_faults import Stack, _settings, stack

pytestmark = pytest.mark.timeout(300)


def _slow_dataset(s: Stack, examples: int) -> dict[str, Any]:
    """A dataset read one example per batch (about 0.4 ms each for a diagonal FIM)."""
    name = f"slow{examples}"
    path = s.settings.datasets_dir / f"{name}.safetensors"
    if not path.exists():
        gen = torch.Generator().manual_seed(4)
        path.write_bytes(st_bytes({"inputs": torch.randn(examples, 4, generator=gen)}))
    return {"name": name, "batch_size": 1}


def _running_task(s: Stack, stage: int) -> dict[str, Any] | None:
    """The heartbeat of a worker running a task of ``stage``, if any."""
    status = s.client.get("/v1/admin/status", headers=auth(ADMIN_KEY)).json()
    for beat in status["workers"]:
        if f"-s{stage}-t" in str(beat.get("job_id") or ""):
            return dict(beat)
    return None


def _trace(s: Stack, job_id: str) -> float:
    result = s.client.get(f"/v1/jobs/{job_id}/result", headers=auth(s.key)).json()
    return float(result["operations"][0]["outputs"]["value"])


def _diag(s: Stack, job_id: str) -> torch.Tensor:
    result = s.client.get(f"/v1/jobs/{job_id}/result", headers=auth(s.key)).json()
    href = result["operations"][1]["outputs"]["value"]["href"]
    return st_load(s.client.get(href, headers=auth(s.key)).content)["value"]


def _no_partials_left(s: Stack, job_id: str) -> bool:
    return not (s.settings.artifacts_dir / f"{job_id}.shards").exists()


@pytest.fixture
def shared(tmp_path: Path, redis_client: redis.Redis) -> Iterator[Stack]:
    with stack(_settings(tmp_path / "data", REDIS_URL)) as s:
        yield s
        cleanup_queue(redis_client, s.settings.queue_name, s.jobs)


def test_a_killed_shard_worker_is_replaced_once(
    shared: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fimntk.core.shards")
    spec = {
        "representation": "diag",
        "dtype": "float64",
        "dataset": _slow_dataset(shared, 9000),
        "operations": [{"op": "trace"}, {"op": "get_diag"}],
    }
    workers = [start_worker(shared.settings, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        job = shared.submit(shards=3, **spec)
        wait_for(lambda: _running_task(shared, 0) is not None, 90, 0.05, "a shard running")
        victim = _running_task(shared, 0)
        assert victim is not None
        os.kill(int(victim["pid"]), signal.SIGKILL)
        done = shared.wait(job["id"], timeout=120)
        assert done["status"] == "succeeded", done
        assert any(victim["job_id"] in r.getMessage() for r in caplog.records), caplog.text
        one = shared.submit(shards=1, **spec)
        assert shared.wait(one["id"], timeout=120)["status"] == "succeeded"
    finally:
        for worker in workers:
            stop_process(worker)
    assert _trace(shared, job["id"]) == pytest.approx(_trace(shared, one["id"]), rel=1e-6)
    torch.testing.assert_close(
        _diag(shared, job["id"]), _diag(shared, one["id"]), rtol=1e-6, atol=0
    )
    assert _no_partials_left(shared, job["id"])


def test_cancel_during_ekfac_round_two(shared: Stack, tmp_path: Path) -> None:
    worker = start_worker(shared.settings, tmp_path / "w.log")
    try:
        job = shared.submit(
            representation="ekfac",
            shards=2,
            dataset=_slow_dataset(shared, 8000),
            operations=[{"op": "trace"}],
        )
        wait_for(lambda: _running_task(shared, 3) is not None, 120, 0.05, "round 2 running")
        canceled = shared.client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(shared.key))
        assert canceled.status_code in (200, 202), canceled.text
        done = shared.wait(job["id"], timeout=60)
        assert done["status"] == "canceled", done
        result = shared.client.get(f"/v1/jobs/{job['id']}/result", headers=auth(shared.key))
        assert result.status_code == 409
        wait_for(lambda: _running_task(shared, 3) is None, 30, 0.1, "round 2 stopped")
        wait_for(
            lambda: (
                shared.client.get("/v1/admin/status", headers=auth(ADMIN_KEY)).json()["queue"][
                    "depth"
                ]
                == 0
            ),
            30,
            0.1,
            "no task left on the queue",
        )
    finally:
        stop_process(worker)
    assert _no_partials_left(shared, job["id"])
    assert not (shared.settings.artifacts_dir / job["id"]).exists()


def test_redis_restarted_between_rounds(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=False)
    server.start()
    try:
        with stack(_settings(tmp_path / "data", server.url)) as s:
            worker = start_worker(s.settings, tmp_path / "w.log")
            try:
                _restart_between_rounds(s, server, worker.pid)
            finally:
                os.kill(worker.pid, signal.SIGCONT)
                stop_process(worker)
    finally:
        server.stop()


def _restart_between_rounds(s: Stack, server: RedisServer, worker_pid: int) -> None:
    spec = {
        "representation": "ekfac",
        "dtype": "float64",
        "dataset": _slow_dataset(s, 3000),
        "operations": [{"op": "trace"}, {"op": "get_diag"}],
    }
    job = s.submit(shards=3, **spec)
    reduced = s.settings.artifacts_dir / f"{job['id']}.shards" / "s1-t0.safetensors"
    wait_for(reduced.exists, 120, 0.02, "round 1 reduced")
    os.kill(worker_pid, signal.SIGSTOP)
    server.stop()
    server.start()  # no persistence: every task of the job is gone from Redis
    assert not redis.Redis.from_url(server.url).exists(f"rq:job:{job['id']}-s3-t0")
    os.kill(worker_pid, signal.SIGCONT)
    done = s.wait(job["id"], timeout=180)
    assert done["status"] == "succeeded", done
    one = s.submit(shards=1, **spec)
    assert s.wait(one["id"], timeout=120)["status"] == "succeeded"
    assert _trace(s, job["id"]) == pytest.approx(_trace(s, one["id"]), rel=1e-6)
    torch.testing.assert_close(_diag(s, job["id"]), _diag(s, one["id"]), rtol=1e-6, atol=1e-12)
    assert _no_partials_left(s, job["id"])
