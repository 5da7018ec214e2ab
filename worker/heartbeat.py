"""The worker's sign of life: a short-lived Redis key refreshed by a background thread.

RQ's own worker key lives for the whole job time limit while a ``SimpleWorker`` runs a job, so
a worker killed with SIGKILL would look alive for up to an hour. This thread instead writes
``fimntk:worker:<queue>:<name>`` (JSON: state, current job, device, host, pid, last beat) with
a TTL of ``heartbeat_ttl_s`` every third of it, and indexes the name in the set
``fimntk:workers:<queue>``. When the process dies the key expires within the TTL and the API's
reaper (:mod:`fimntk.service.reaper`) fails the job it was running.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from fimntk.core.queue import worker_index_key, worker_key

_log = logging.getLogger(__name__)


class Heartbeat:
    """Refresh a worker's liveness key until stopped.

    Args:
        connection: Redis connection.
        queue_name: Queue the worker listens on.
        name: Worker name.
        ttl_s: Lifetime of the key; it is refreshed every ``ttl_s / 3``.
        status: Returns the worker's current state and job id.
        device: Device of the worker, shown by the admin status.
    """

    def __init__(
        self,
        connection: Redis,
        queue_name: str,
        name: str,
        ttl_s: float,
        status: Callable[[], tuple[str, str | None]],
        device: str,
    ) -> None:
        self.connection = connection
        self.queue_name = queue_name
        self.name = name
        self.ttl_ms = max(int(ttl_s * 1000), 100)
        self.status = status
        self.device = device
        self.started_at = datetime.now(timezone.utc).isoformat()
        self.jobs_done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="fimntk-heartbeat")

    def payload(self) -> dict[str, Any]:
        """What the key holds."""
        state, job = self.status()
        return {
            "name": self.name,
            "state": state,
            "job_id": job,
            "device": self.device,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "last_heartbeat": datetime.now(timezone.utc).isoformat(),
            "jobs_done": self.jobs_done,
        }

    def beat(self) -> None:
        """Write the key now (errors are logged, never raised: Redis may be restarting)."""
        try:
            pipe = self.connection.pipeline(transaction=False)
            pipe.set(
                worker_key(self.queue_name, self.name), json.dumps(self.payload()), px=self.ttl_ms
            )
            pipe.sadd(worker_index_key(self.queue_name), self.name)
            pipe.execute()
        except RedisError as exc:
            _log.warning("heartbeat of %s failed: %s", self.name, exc)

    def start(self) -> None:
        """Beat now and then every third of the TTL, in a daemon thread."""
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and remove the key (a clean exit is not a lost worker)."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.connection.delete(worker_key(self.queue_name, self.name))
            self.connection.srem(worker_index_key(self.queue_name), self.name)
        except RedisError:
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            self.beat()
