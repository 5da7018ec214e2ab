"""The reaper: no job stays ``running`` after its worker died, none ``queued`` after Redis
lost it.

RQ alone leaves the job of a worker killed with SIGKILL ``started`` until a registry cleanup
runs, which for a ``SimpleWorker`` is only once the job's whole time limit has passed. Workers
instead refresh a short-lived heartbeat key (:mod:`fimntk.worker.heartbeat`); the reaper, a thread
of the API, runs every ``reaper_interval_s`` and:

* fails a ``running`` job ("worker lost") once its worker has shown, for ``heartbeat_ttl_s``
  in a row, no heartbeat naming that job. The job fails at most
  ``2 * (heartbeat_ttl_s + reaper_interval_s)`` after the worker died (50 s by default); the
  second ``heartbeat_ttl_s`` spares workers whose key vanished with a Redis restart. Failing
  rather than requeueing is deliberate: a job that kills its worker (say, the kernel's OOM
  killer) would otherwise take down every worker in turn. Partial artifacts are deleted.
* enqueues again a ``queued`` job that Redis does not hold (restarted without append-only
  persistence) once it is ``requeue_after_s`` old: the database, not Redis, is the record of
  what was submitted, so queued jobs are never silently lost.
* fails a ``queued`` job ("no worker") once no live worker has listened on the queue for
  ``max_queued_without_worker_s`` while it waited (a worker that cannot start, or none
  started), so that clients waiting on it get an answer.
* watches sharded jobs (:class:`~fimntk.core.shards.ShardSupervisor`): a shard task whose
  worker died is enqueued once more, then fails the job; a job whose tasks Redis lost resumes.

While Redis is unreachable the reaper judges nothing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import timedelta

from fimntk.contract import problems
from fimntk.contract.problems import problem
from fimntk.contract.vocabulary import JobStatus
from fimntk.core.config import Settings
from fimntk.core.errors import QueueUnavailableError
from fimntk.core.queue import JobQueue
from fimntk.core.shards import ShardSupervisor, is_sharded
from fimntk.core.storage.artifacts import ArtifactStore
from fimntk.core.storage.records import RecordStore, utcnow

_log = logging.getLogger(__name__)


def max_detection_s(settings: Settings) -> float:
    """Longest time between a worker's death and its job's failure."""
    return 2 * (settings.heartbeat_ttl_s + settings.reaper_interval_s)


class Reaper:
    """Fails the jobs of dead workers and requeues jobs Redis lost.

    Args:
        settings: Settings (``heartbeat_ttl_s``, ``reaper_interval_s``, ``requeue_after_s``).
        records: Record store.
        queue: Job queue.
        artifacts: Artifact store (partial artifacts of reaped jobs are deleted).
    """

    def __init__(
        self, settings: Settings, records: RecordStore, queue: JobQueue, artifacts: ArtifactStore
    ) -> None:
        self.settings = settings
        self.records = records
        self.queue = queue
        self.artifacts = artifacts
        self._orphan_since: dict[str, float] = {}
        self._no_worker_since: float | None = None
        self.shards = ShardSupervisor(settings, records, queue, artifacts)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reap_once(self) -> dict[str, list[str]]:
        """One pass.

        Returns:
            Ids of the jobs failed (``lost``) and enqueued again (``requeued``), and what the
            shard supervisor did (``retried`` tasks, ``resumed`` and ``canceled`` jobs; the
            sharded jobs it failed join ``lost``).
        """
        done: dict[str, list[str]] = {"lost": [], "requeued": []}
        try:
            live = self.queue.live_workers()
        except QueueUnavailableError:
            return done
        now = time.monotonic()
        orphans = set()
        for job in self.records.jobs_with_status(JobStatus.RUNNING):
            if is_sharded(job):  # its tasks are watched by the shard supervisor
                continue
            beat = live.get(job.worker or "")
            if beat is not None and beat.get("job_id") == job.id:
                continue
            orphans.add(job.id)
            since = self._orphan_since.setdefault(job.id, now)
            if now - since >= self.settings.heartbeat_ttl_s and self._fail_lost(job.id, job.worker):
                done["lost"].append(job.id)
        self._orphan_since = {k: v for k, v in self._orphan_since.items() if k in orphans}
        for key, ids in self.shards.supervise_once(live).items():
            done.setdefault(key, []).extend(ids)
        done["no_worker"] = self._fail_without_worker(live, now)
        horizon = utcnow() - timedelta(seconds=self.settings.requeue_after_s)
        try:
            for job in self.records.jobs_with_status(JobStatus.QUEUED):
                if job.created_at > horizon or self.queue.knows(job.id):
                    continue
                _log.warning(
                    "job %s is queued but unknown to Redis: enqueueing it again",
                    job.id,
                    extra={"job_id": job.id},
                )
                self.queue.enqueue(job.id, int(job.spec["timeout_s"]), self.settings.result_ttl_s)
                done["requeued"].append(job.id)
        except QueueUnavailableError:
            pass
        return done

    def _fail_without_worker(self, live: dict[str, dict[str, object]], now: float) -> list[str]:
        """Fail the queued jobs that waited ``max_queued_without_worker_s`` with no live worker."""
        if live:
            self._no_worker_since = None
            return []
        if self._no_worker_since is None:
            self._no_worker_since = now
        limit = self.settings.max_queued_without_worker_s
        waited = now - self._no_worker_since
        if waited < limit:
            return []
        horizon = utcnow() - timedelta(seconds=limit)
        failed = []
        detail = (
            f"no worker has listened on queue {self.settings.queue_name!r} for {waited:.0f} s "
            "(none started, or each failed at start: see the worker logs); submit the job "
            "again once /readyz answers 200"
        )
        for job in self.records.jobs_with_status(JobStatus.QUEUED):
            if job.created_at > horizon:
                continue
            if self.records.update_job(
                job.id,
                only_if_status=(JobStatus.QUEUED,),
                status=JobStatus.FAILED,
                finished_at=utcnow(),
                error=problem(problems.NO_WORKER, detail),
            ):
                _log.warning("job %s failed: no worker", job.id, extra={"job_id": job.id})
                with contextlib.suppress(QueueUnavailableError):
                    self.queue.cancel_queued(job.id)
                failed.append(job.id)
        return failed

    def _fail_lost(self, job_id: str, worker: str | None) -> bool:
        detail = (
            f"the worker {worker} stopped sending heartbeats while running the job "
            f"(killed or crashed); submit the job again"
        )
        failed = self.records.update_job(
            job_id,
            only_if_status=(JobStatus.RUNNING,),
            status=JobStatus.FAILED,
            finished_at=utcnow(),
            error=problem(problems.WORKER_LOST, detail),
        )
        if failed:
            _log.warning(
                "job %s failed: worker %s lost",
                job_id,
                worker,
                extra={"job_id": job_id, "worker": worker},
            )
            self.artifacts.delete_job(job_id)
        self._orphan_since.pop(job_id, None)
        return failed

    # -- thread -----------------------------------------------------------------------------

    def start(self) -> None:
        """Run :meth:`reap_once` every ``reaper_interval_s`` in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, daemon=True, name="fimntk-reaper")
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.reaper_interval_s):
            try:
                self.reap_once()
            except Exception:  # the database may be down: try again next period
                _log.exception("reaper pass failed")
