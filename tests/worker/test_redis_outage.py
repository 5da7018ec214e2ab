"""A worker survives Redis going away while RQ does its bookkeeping around a job.

RQ retries on its own only while it waits for a job; an error in the bookkeeping around one
(marking the job finished, setting the worker idle) makes RQ quit its work loop. The drill here
stops a private redis-server at exactly that moment, from inside the job, and restarts it a
second later without persistence: the worker must wait, start its loop again and run the next
job, leaving no thread of the first loop behind. Without the restart in
:func:`fimntk.worker.compute_worker.run_worker` it returns after the first job.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.client import PubSubWorkerThread
from rq import Queue
from rq.serializers import JSONSerializer

from fimntk.core.config import Settings
from fimntk.core.queue import TASK
from fimntk.worker import compute_worker as worker_cli
from fimntk.worker import tasks as worker_tasks
from tests.service.prod import RedisServer

pytestmark = pytest.mark.timeout(120)


class _NoRecords:
    """No job has a record: every job takes the one-worker path (no shard plan)."""

    def get_job(self, job_id: str) -> None:
        return None


class _OutageRunner:
    """Stands in for the job runner: the first job takes Redis down and schedules its
    restart (and the next job); every job is recorded."""

    def __init__(self, server: RedisServer, queue_name: str) -> None:
        self.server = server
        self.queue_name = queue_name
        self.device = "cpu"
        self.worker_name: str | None = None
        self.current_job_id: str | None = None
        self.current_record_id: str | None = None
        self.stop_requested = threading.Event()
        self.on_job_done: Any = None
        self.ran: list[str] = []
        self.restarted = threading.Event()
        self.records = _NoRecords()

    def request_stop(self, job_id: str | None) -> None:
        """Nothing runs long enough to be stopped."""

    def cancel_requested(self, record_id: str) -> bool:
        """No job here is ever canceled."""
        return False

    def end_canceled(self, record_id: str) -> None:
        """Nothing to end: no job is canceled."""

    def run(self, job_id: str) -> dict[str, Any]:
        self.ran.append(job_id)
        if len(self.ran) == 1:
            self.server.stop()
            threading.Thread(target=self._restart, daemon=True).start()
        return {"status": "succeeded"}

    def _restart(self) -> None:
        time.sleep(1.0)
        self.server.start()
        _enqueue(self.server.url, self.queue_name, "second")
        self.restarted.set()


def _enqueue(url: str, queue_name: str, job_id: str) -> None:
    connection = redis.Redis.from_url(url)
    Queue(queue_name, connection=connection, serializer=JSONSerializer).enqueue_call(
        TASK, args=(job_id,), job_id=job_id, timeout=60
    )
    connection.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    redis_server = RedisServer(tmp_path / "redis", appendonly=False)
    redis_server.start()
    yield redis_server
    redis_server.stop()


def test_worker_runs_on_after_redis_restarts_during_bookkeeping(
    server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue_name = f"fimntk-outage-{uuid.uuid4().hex[:12]}"
    settings = Settings(
        data_dir=tmp_path / "data", redis_url=server.url, queue_name=queue_name, heartbeat_ttl_s=1.5
    )
    runner = _OutageRunner(server, queue_name)
    monkeypatch.setattr(worker_cli, "JobRunner", lambda *_: runner)
    monkeypatch.setattr(worker_cli, "configure_logging", lambda *_: None)
    monkeypatch.setattr(worker_tasks, "_runner", None)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    _enqueue(server.url, queue_name, "first")
    try:
        worked = worker_cli.run_worker(server.url, [queue_name], settings, max_jobs=1)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert runner.restarted.is_set()
    assert runner.ran == ["first", "second"]
    assert worked
    pubsub = [t for t in threading.enumerate() if isinstance(t, PubSubWorkerThread)]
    assert pubsub == [], "a work loop's command channel outlived it"
