"""The queue: the only module of the service that talks to RQ.

Jobs are enqueued by dotted path (``fimntk.worker.tasks.run_job``) with the job id as their only
argument and RQ's JSON serializer, so the API never imports the worker and nothing is pickled.
Redis holds only the queue; job records live in the database.
"""

from __future__ import annotations

import json
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from fimntk.core.errors import QueueUnavailableError

TASK = "fimntk.worker.tasks.run_job"


def worker_key(queue_name: str, worker_name: str) -> str:
    """Redis key of a worker's heartbeat (see :mod:`fimntk.worker.heartbeat`)."""
    return f"fimntk:worker:{queue_name}:{worker_name}"


#: Exit status of a worker that ended itself to stop a canceled job its code could not interrupt
#: (:mod:`fimntk.worker.cancel_watchdog`): its supervisor starts a fresh one at once and does not
#: count the exit as a crash.
WORKER_EXIT_AFTER_CANCEL = 75


def done_channel(job_id: str) -> str:
    """Redis pub/sub channel on which the worker announces that a job reached a terminal
    status (the message is the status); long polls wait on it."""
    return f"fimntk:job-done:{job_id}"


def worker_index_key(queue_name: str) -> str:
    """Redis set of the names of the workers that beat on a queue."""
    return f"fimntk:workers:{queue_name}"


def _text(value: bytes | str) -> str:
    """A Redis reply as text (replies are bytes unless the client decodes them)."""
    return value.decode() if isinstance(value, bytes) else value


class JobQueue:
    """Enqueue, inspect and stop jobs on an RQ queue.

    Args:
        redis_url: URL of the Redis server.
        queue_name: Name of the RQ queue.
    """

    def __init__(self, redis_url: str, queue_name: str) -> None:
        self.redis = Redis.from_url(
            redis_url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30
        )
        self.queue = Queue(queue_name, connection=self.redis, serializer=JSONSerializer)
        self.name = queue_name
        self.url = redis_url

    def depth(self) -> int:
        """Jobs waiting on the queue.

        Raises:
            QueueUnavailableError: Redis cannot be reached.
        """
        try:
            return int(self.queue.count)
        except RedisError as exc:
            raise QueueUnavailableError(f"cannot reach the queue: {exc}") from exc

    def live_workers(self) -> dict[str, dict[str, Any]]:
        """Heartbeats of the workers alive on this queue, by worker name.

        Names whose heartbeat expired are dropped from the index (a live worker adds itself
        back at its next beat).

        Raises:
            QueueUnavailableError: Redis cannot be reached.
        """
        index = worker_index_key(self.name)
        try:
            names = sorted(_text(n) for n in self.redis.smembers(index))
            values = self.redis.mget([worker_key(self.name, n) for n in names]) if names else []
            dead = [n for n, v in zip(names, values) if v is None]
            if dead:
                self.redis.srem(index, *dead)
        except RedisError as exc:
            raise QueueUnavailableError(f"cannot reach the queue: {exc}") from exc
        return {n: json.loads(v) for n, v in zip(names, values) if v is not None}

    def knows(self, job_id: str) -> bool:
        """Whether RQ holds the job (its hash exists).

        Raises:
            QueueUnavailableError: Redis cannot be reached.
        """
        try:
            return bool(self.redis.exists(Job.key_for(job_id)))
        except RedisError as exc:
            raise QueueUnavailableError(f"cannot reach the queue: {exc}") from exc

    def ping(self) -> bool:
        """Whether Redis answers."""
        try:
            return bool(self.redis.ping())
        except RedisError:
            return False

    def enqueue(self, job_id: str, timeout_s: int, ttl_s: int) -> None:
        """Put a job on the queue.

        Args:
            job_id: Job id, also the RQ job id.
            timeout_s: Time limit of the job (RQ's default of 180 s is never used).
            ttl_s: How long RQ keeps its job hash once done.

        Raises:
            QueueUnavailableError: Redis cannot be reached.
        """
        try:
            self.queue.enqueue_call(
                TASK,
                args=(job_id,),
                job_id=job_id,
                timeout=timeout_s,
                result_ttl=ttl_s,
                failure_ttl=ttl_s,
                description=f"fimntk job {job_id}",
            )
        except RedisError as exc:
            raise QueueUnavailableError(f"cannot reach the queue: {exc}") from exc

    def peek(self, job_id: str) -> tuple[str | None, dict[str, Any]]:
        """RQ's status and meta of a job in one round trip, without loading the job.

        Returns:
            RQ status (``None`` when RQ does not know the job) and its meta.

        Raises:
            QueueUnavailableError: Redis cannot be reached.
        """
        try:
            status, meta = self.redis.hmget(Job.key_for(job_id), "status", "meta")
        except RedisError as exc:
            raise QueueUnavailableError(f"cannot reach the queue: {exc}") from exc
        try:
            parsed = JSONSerializer.loads(meta) if meta else {}
        except ValueError:
            parsed = {}
        return (_text(status) if status else None), (parsed if isinstance(parsed, dict) else {})

    def state(self, job_id: str) -> tuple[str | None, dict[str, Any], str | None]:
        """RQ's view of a job.

        Returns:
            RQ status (``None`` when RQ does not know the job), its meta, and the last line of
            its exception, if any.

        Raises:
            QueueUnavailableError: Redis cannot be reached.
        """
        try:
            job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
            status = job.get_status(refresh=False)
            exc_info = job.exc_info if status == "failed" else None
        except NoSuchJobError:
            return None, {}, None
        except RedisError as exc:
            raise QueueUnavailableError(f"cannot reach the queue: {exc}") from exc
        last = exc_info.strip().splitlines()[-1] if exc_info else None
        return (status.value if status is not None else None), dict(job.meta or {}), last

    def cancel_queued(self, job_id: str) -> None:
        """Remove a job that no worker has started from the queue (RQ's ``job.cancel()``)."""
        try:
            job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
            job.cancel()
        except (NoSuchJobError, InvalidJobOperation):
            return
        except RedisError as exc:
            raise QueueUnavailableError(f"cannot reach the queue: {exc}") from exc

    def stop_running(self, job_id: str) -> None:
        """Ask the worker running a job to stop it (RQ's stop-job command).

        ``job.cancel()`` does not stop a running job; the worker receives this command on its
        pub/sub channel and interrupts the job within one progress step.
        """
        try:
            send_stop_job_command(self.redis, job_id, serializer=JSONSerializer)
        except (NoSuchJobError, InvalidJobOperation):
            return
        except RedisError as exc:
            raise QueueUnavailableError(f"cannot reach the queue: {exc}") from exc

    def close(self) -> None:
        """Close the Redis connections."""
        self.redis.close()
