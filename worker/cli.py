"""``fimntk worker``: one RQ worker per GPU, running jobs in its own process.

Choice of worker class, with CUDA in mind:

* RQ's default ``Worker`` forks a work horse per job. A forked child cannot use a CUDA context
  its parent initialised, and a fresh child per job would reload every model.
* ``SpawnWorker`` avoids the fork problem but starts a new interpreter (and imports torch) for
  every job, again with nothing cached.
* :class:`ComputeWorker` (a ``SimpleWorker``) runs jobs in the worker process itself: the CUDA
  context, recently used models and kept representations survive from job to job. RQ's time
  limit still applies (SIGALRM in the main thread). RQ's stop-job command, which would kill a
  work horse, instead raises a flag that the job's progress callback turns into a clean stop
  within one batch. A crash of the process takes the worker down with the job; run it under a
  supervisor (systemd, compose) that restarts it.

Faults: SIGTERM is RQ's warm shutdown (the running job finishes, then the worker exits; a second
SIGTERM stops at once and the job ends ``failed``, "worker shut down"). A worker killed outright
stops refreshing its heartbeat (:mod:`worker.heartbeat`) and the API's reaper fails its job
("worker lost") within a bounded time. When Redis goes away, RQ retries with back-off and the
worker carries on once it is back.

Start one worker per GPU with ``--device cuda:N`` (or ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Sequence

from redis import Redis
from redis.exceptions import RedisError
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from service.config import Settings
from service.logs import configure_logging
from worker.heartbeat import Heartbeat
from worker.runner import JobRunner
from worker.tasks import get_runner, install_runner

_log = logging.getLogger(__name__)


class ComputeWorker(SimpleWorker):
    """A ``SimpleWorker`` whose stop-job command stops the running job cooperatively."""

    def _set_ip_address(self, connection: Redis) -> None:
        """RQ's lookup, tolerating servers whose CLIENT INFO redis-py cannot parse (the
        embedded fakeredis server of ``fimntk serve``)."""
        try:
            super()._set_ip_address(connection)
        except (ValueError, RedisError):
            self.ip_address = "unknown"

    def kill_horse(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Called by RQ's stop-job command handler (pub/sub thread): flag the job to stop."""
        job_id = self._stopped_job_id or self.get_current_job_id()
        _log.info("stop requested for job %s", job_id)
        get_runner().request_stop(job_id)


def run_worker(redis_url: str, queues: Sequence[str], settings: Settings,
               device: str | None = None, name: str | None = None, burst: bool = False,
               max_jobs: int | None = None) -> bool:
    """Run a worker until it is stopped (or, with ``burst``, until the queues are empty).

    Args:
        redis_url: URL of the Redis holding the queue.
        queues: Queue names to listen on.
        settings: Settings (database, data directory, limits).
        device: Device of this worker, e.g. ``cuda:1``; ``settings.device`` when omitted.
        name: Worker name (unique per Redis); RQ picks one when omitted.
        burst: Stop when the queues are empty.
        max_jobs: Stop after this many jobs.

    Returns:
        Whether any job was processed.
    """
    configure_logging(settings.log_format, settings.log_level)
    _warm_up()
    runner = JobRunner(settings, device)
    install_runner(runner)
    connection = Redis.from_url(redis_url, health_check_interval=30)
    worker = ComputeWorker(list(queues), connection=connection, serializer=JSONSerializer,
                           name=name)
    runner.worker_name = worker.name

    def status() -> tuple[str, str | None]:
        job = runner.current_job_id
        return ("busy" if job else "idle"), job

    heartbeats = [Heartbeat(connection, queue, worker.name, settings.heartbeat_ttl_s, status,
                            str(runner.device)) for queue in queues]
    runner.on_job_done = lambda: _count_job(heartbeats)
    _log.info("worker %s on %s listening on %s", worker.name, runner.device, list(queues))
    for heartbeat in heartbeats:
        heartbeat.start()
    try:
        return worker.work(burst=burst, max_jobs=max_jobs, logging_level=settings.log_level,
                           with_scheduler=False)
    finally:
        for heartbeat in heartbeats:
            heartbeat.stop()
        _log.info("worker %s stopped", worker.name)


def _warm_up() -> None:
    """Import before the first job what torch imports lazily on the first backward pass with
    ``grad_outputs`` (sympy, through symbolic shapes: seconds), so the first job that takes the
    ``torch.func`` or double-backward path of the engine is not slow."""
    with contextlib.suppress(ImportError):  # another torch version: nothing to warm
        import torch.fx.experimental.symbolic_shapes  # noqa: F401  (a fixed module, no user input)


def _count_job(heartbeats: list[Heartbeat]) -> None:
    for heartbeat in heartbeats:
        heartbeat.jobs_done += 1
        heartbeat.beat()
