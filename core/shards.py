"""Sharded jobs on the queue: names, the task graph on RQ, cancel fan-out and supervision.

A sharded job is a graph of RQ jobs ("tasks") in stages; every task of a stage depends (RQ's
``depends_on``) on every task of the stage before, so RQ itself starts a reduce once all shards
of its round are done. Task ids are ``<job>-s<stage>-t<index>``; each writes one artifact in the
shared store under the job's shard namespace (``<job>.shards``), named ``s<stage>-t<index>``, so
a retried task overwrites the same key. The worker side (:mod:`fimntk.worker.sharded`) plans
the graph and runs the tasks; this module, shared with the API, holds what needs no torch:

* :class:`ShardTasks`: enqueue a graph, cancel all its tasks, list them;
* :class:`ShardSupervisor` (run by the API's reaper): a task whose worker died is enqueued
  once more (on whichever worker takes it) and fails the job the second time; a job whose
  tasks Redis lost (restarted without persistence) is resumed from the artifacts that exist;
  a cancelled job with nothing running ends ``canceled``.

The queue carries only ids; Redis holds the set of a job's task ids (``fimntk:shard-tasks:<job>``)
and the retries made (``fimntk:shard-retries:<job>``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from fimntk.contract import problems
from fimntk.contract.problems import problem
from fimntk.contract.vocabulary import JobStatus
from fimntk.core.config import Settings
from fimntk.core.errors import InvalidInputError, NotFoundError, QueueUnavailableError
from fimntk.core.queue import JobQueue, done_channel
from fimntk.core.storage.artifacts import ArtifactStore
from fimntk.core.storage.records import JobRecord, RecordStore, utcnow

_log = logging.getLogger(__name__)

#: What a shard task runs, by dotted path: ``run_task(job_id, stage, index)``.
TASK = "fimntk.worker.tasks.run_shard_task"
#: What resumes a job whose tasks Redis lost: ``resume(job_id)``.
RESUME = "fimntk.worker.tasks.resume_shards"
#: Name of the plan artifact in a job's shard namespace.
PLAN = "plan"
#: Times a task whose worker was lost is enqueued again before the job fails.
RETRIES = 1
_TASK_ID = re.compile(r"^(?P<job>.+)-s(?P<stage>\d+)-t(?P<index>\d+)$")


def namespace(job_id: str) -> str:
    """The artifact namespace of a job's partial results (deleted when the job ends)."""
    return f"{job_id}.shards"


def task_id(job_id: str, stage: int, index: int) -> str:
    """RQ id of a task."""
    return f"{job_id}-s{stage}-t{index}"


def output_name(stage: int, index: int) -> str:
    """Artifact name of a task's output in :func:`namespace`."""
    return f"s{stage}-t{index}"


def parse_task_id(rq_id: str) -> tuple[str, int, int] | None:
    """``(job, stage, index)`` of a task id, or ``None`` for any other RQ id."""
    match = _TASK_ID.match(rq_id)
    if match is None:
        return None
    return match["job"], int(match["stage"]), int(match["index"])


def is_sharded(record: JobRecord) -> bool:
    """Whether a running job runs as shards (its progress says how many)."""
    return bool((record.progress or {}).get("shards"))


def check_shards(shards: int | str, max_shards: int) -> None:
    """Refuse more shards than the server allows (before anything is queued).

    Raises:
        InvalidInputError: ``shards`` above ``max_shards``.
    """
    if isinstance(shards, int) and shards > max_shards:
        raise InvalidInputError(
            f"shards={shards} exceeds this server's limit of {max_shards}: ask for fewer or 'auto'",
            "shards",
        )


def resolve_shards(shards: int | str, examples: int, parameters: int, settings: Settings) -> int:
    """The number of shards a job runs as: never more than its examples or ``max_shards``;
    ``"auto"`` gives one shard per ``shard_min_work`` examples × parameters, and one below it.

    Args:
        shards: The spec's ``shards``.
        examples: Examples of the job's dataset.
        parameters: Parameters of the model.
        settings: Settings (``max_shards``, ``shard_min_work``).
    """
    if shards == "auto":
        work = float(examples) * float(parameters)
        per_shard = settings.shard_min_work
        wanted = 1 if work < per_shard else max(2, int(work // per_shard))
    else:
        wanted = int(shards)
    return max(1, min(wanted, examples, settings.max_shards))


def bounds(examples: int, shards: int) -> list[int]:
    """Example boundaries of ``shards`` fixed ranges, ``floor(k·n/S)``: sizes differ by at most
    one, none is empty, none overlaps, none is padded."""
    return [(k * examples) // shards for k in range(shards + 1)]


def shards_in_flight(live: dict[str, dict[str, Any]]) -> int:
    """Shard tasks running now, from the workers' heartbeats (each names the task it runs)."""
    return sum(1 for beat in live.values() if parse_task_id(str(beat.get("job_id") or "")))


def _tasks_key(job_id: str) -> str:
    return f"fimntk:shard-tasks:{job_id}"


def _retries_key(job_id: str) -> str:
    return f"fimntk:shard-retries:{job_id}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ShardTasks:
    """The tasks of sharded jobs on one queue.

    Args:
        queue: The job queue (its Redis connection and RQ queue are used).
    """

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self.redis = queue.redis

    def enqueue(
        self, job_id: str, stages: Sequence[Sequence[int]], timeout_s: int, ttl_s: int
    ) -> list[str]:
        """Enqueue the tasks of a graph, each stage depending on the one before.

        Args:
            job_id: The job.
            stages: For each stage (by its number), the task indexes still to run; a stage
                with none left is skipped (its outputs exist), and the next depends on the last
                stage that has tasks.
            timeout_s: Time limit of each task.
            ttl_s: How long RQ keeps finished task hashes.

        Returns:
            The ids enqueued.

        Raises:
            QueueUnavailableError: Redis cannot be reached.
        """
        enqueued: list[str] = []
        previous: list[str] = []
        try:
            for stage, indexes in enumerate(stages):
                ids = [task_id(job_id, stage, i) for i in indexes]
                if not ids:
                    continue
                self.redis.sadd(_tasks_key(job_id), *ids)
                self.redis.expire(_tasks_key(job_id), ttl_s)
                for rq_id, index in zip(ids, indexes):
                    self.queue.queue.enqueue_call(
                        TASK,
                        args=(job_id, stage, index),
                        job_id=rq_id,
                        timeout=timeout_s,
                        result_ttl=ttl_s,
                        failure_ttl=ttl_s,
                        depends_on=list(previous) or None,
                        description=f"fimntk job {job_id} stage {stage} task {index}",
                    )
                enqueued += ids
                previous = ids
        except RedisError as exc:
            raise QueueUnavailableError(f"cannot reach the queue: {exc}") from exc
        return enqueued

    def ids(self, job_id: str) -> list[str]:
        """The task ids of a job that Redis holds (empty once Redis lost them).

        Raises:
            QueueUnavailableError: Redis cannot be reached.
        """
        try:
            return sorted(_text(t) for t in self.redis.smembers(_tasks_key(job_id)))
        except RedisError as exc:
            raise QueueUnavailableError(f"cannot reach the queue: {exc}") from exc

    def statuses(self, job_id: str) -> dict[str, str | None]:
        """RQ's status of each task of a job (``None``: unknown to RQ).

        Raises:
            QueueUnavailableError: Redis cannot be reached.
        """
        ids = self.ids(job_id)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for rq_id in ids:
                pipe.hget(Job.key_for(rq_id), "status")
            values = pipe.execute()
        except RedisError as exc:
            raise QueueUnavailableError(f"cannot reach the queue: {exc}") from exc
        return {i: (_text(v) if v else None) for i, v in zip(ids, values)}

    def cancel_all(self, job_id: str) -> int:
        """Cancel every task of a job: queued and deferred ones are removed, started ones told
        to stop (they stop within one progress step).

        Returns:
            Tasks that were running.

        Raises:
            QueueUnavailableError: Redis cannot be reached.
        """
        running = 0
        for rq_id, status in self.statuses(job_id).items():
            try:
                if status == "started":
                    running += 1
                    send_stop_job_command(self.redis, rq_id, serializer=JSONSerializer)
                elif status in ("queued", "deferred", "scheduled"):
                    Job.fetch(rq_id, connection=self.redis, serializer=JSONSerializer).cancel()
            except (NoSuchJobError, InvalidJobOperation):
                continue
            except RedisError as exc:
                raise QueueUnavailableError(f"cannot reach the queue: {exc}") from exc
        return running

    def retry(self, job_id: str, rq_id: str) -> bool:
        """Enqueue a task whose worker was lost once more, at the front of the queue.

        Returns:
            ``False`` when its retry was already spent (or RQ no longer holds it).
        """
        try:
            if int(self.redis.hincrby(_retries_key(job_id), rq_id, 1)) > RETRIES:
                return False
            job = Job.fetch(rq_id, connection=self.redis, serializer=JSONSerializer)
            StartedJobRegistry(queue=self.queue.queue).remove_executions(job)
            self.queue.queue.enqueue_job(job, at_front=True)
        except NoSuchJobError:
            return False
        except RedisError as exc:
            raise QueueUnavailableError(f"cannot reach the queue: {exc}") from exc
        return True

    def resume(self, job_id: str, timeout_s: int, ttl_s: int) -> None:
        """Enqueue :data:`RESUME` for a job whose tasks Redis lost.

        Raises:
            QueueUnavailableError: Redis cannot be reached.
        """
        try:
            self.queue.queue.enqueue_call(
                RESUME,
                args=(job_id,),
                job_id=f"{job_id}-resume-{int(time.time())}",
                timeout=timeout_s,
                result_ttl=ttl_s,
                failure_ttl=ttl_s,
                at_front=True,
                description=f"fimntk job {job_id}: resume its shards",
            )
        except RedisError as exc:
            raise QueueUnavailableError(f"cannot reach the queue: {exc}") from exc

    def forget(self, job_id: str) -> None:
        """Drop the job's task set and retry counts (after it ended)."""
        with contextlib.suppress(RedisError):
            self.redis.delete(_tasks_key(job_id), _retries_key(job_id))


class ShardSupervisor:
    """Watches running sharded jobs (called by the API's reaper, every ``reaper_interval_s``).

    Args:
        settings: Settings (``heartbeat_ttl_s``, ``requeue_after_s``, ``result_ttl_s``).
        records: Record store.
        queue: Job queue.
        artifacts: Artifact store (the plan and partial results).
    """

    def __init__(
        self, settings: Settings, records: RecordStore, queue: JobQueue, artifacts: ArtifactStore
    ) -> None:
        self.settings = settings
        self.records = records
        self.tasks = ShardTasks(queue)
        self.artifacts = artifacts
        self._lost_since: dict[str, float] = {}
        self._empty_since: dict[str, float] = {}

    def supervise_once(self, live: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
        """One pass over the running sharded jobs.

        Args:
            live: Heartbeats of the live workers, by name.

        Returns:
            Task ids enqueued again (``retried``), jobs failed (``lost``), jobs resumed
            (``resumed``) and jobs cancelled (``canceled``).
        """
        done: dict[str, list[str]] = {"retried": [], "lost": [], "resumed": [], "canceled": []}
        running = {str(b.get("job_id")) for b in live.values() if b.get("job_id")}
        now = time.monotonic()
        seen: set[str] = set()
        for record in self.records.jobs_with_status(JobStatus.RUNNING):
            if not is_sharded(record):
                continue
            try:
                statuses = self.tasks.statuses(record.id)
            except QueueUnavailableError:
                return done
            if record.cancel_requested and not any(s == "started" for s in statuses.values()):
                self._end(record.id, JobStatus.CANCELED, None)
                done["canceled"].append(record.id)
                continue
            if not statuses and not any(r.startswith(f"{record.id}-") for r in running):
                if self._overdue(self._empty_since, record.id, now, self.settings.requeue_after_s):
                    self._resume(record)
                    done["resumed"].append(record.id)
                seen.add(record.id)
                continue
            for rq_id, status in statuses.items():
                if status != "started" or rq_id in running:
                    continue
                seen.add(rq_id)
                if not self._overdue(self._lost_since, rq_id, now, self.settings.heartbeat_ttl_s):
                    continue
                self._lost_since.pop(rq_id, None)
                if self.tasks.retry(record.id, rq_id):
                    _log.warning("shard task %s lost its worker: enqueued again", rq_id)
                    done["retried"].append(rq_id)
                else:
                    self._fail_lost(record.id, rq_id)
                    done["lost"].append(record.id)
                    break
        self._lost_since = {k: v for k, v in self._lost_since.items() if k in seen}
        self._empty_since = {k: v for k, v in self._empty_since.items() if k in seen}
        return done

    @staticmethod
    def _overdue(since: dict[str, float], key: str, now: float, after: float) -> bool:
        first = since.setdefault(key, now)
        return now - first >= after

    def _resume(self, record: JobRecord) -> None:
        self._empty_since.pop(record.id, None)
        try:
            self.artifacts.path(namespace(record.id), PLAN)
        except NotFoundError:
            self._fail(record.id, "the plan of the job's shards is gone; submit it again")
            return
        _log.warning("the tasks of sharded job %s are gone from Redis: resuming", record.id)
        timeout = int(record.spec.get("timeout_s") or self.settings.default_job_timeout_s)
        self.tasks.resume(record.id, timeout, self.settings.result_ttl_s)

    def _fail_lost(self, job_id: str, rq_id: str) -> None:
        detail = (
            f"the worker running shard task {rq_id} was lost twice (killed or crashed; it was "
            "retried once on another worker); submit the job again"
        )
        self._end(job_id, JobStatus.FAILED, problem(problems.WORKER_LOST, detail))

    def _fail(self, job_id: str, detail: str) -> None:
        self._end(job_id, JobStatus.FAILED, problem(problems.WORKER_LOST, detail))

    def _end(self, job_id: str, status: str, error: dict[str, Any] | None) -> None:
        ended = self.records.update_job(
            job_id,
            only_if_status=(JobStatus.RUNNING,),
            status=status,
            finished_at=utcnow(),
            error=error,
            progress={"done": 0, "total": None, "stage": status},
        )
        if not ended:
            return
        try:
            self.tasks.cancel_all(job_id)
            self.tasks.queue.redis.publish(done_channel(job_id), status)
        except (QueueUnavailableError, RedisError):
            pass
        self.tasks.forget(job_id)
        self.artifacts.delete_job(namespace(job_id))
        self.artifacts.delete_job(job_id)
