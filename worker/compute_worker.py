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
  at its next check; a step that cannot be interrupted is stopped by ending the process
  (:mod:`fimntk.worker.cancel_watchdog`). A crash of the process takes the worker down with
  the job; run it under a supervisor (systemd, compose) that restarts it.

Faults: SIGTERM is RQ's warm shutdown (the running job finishes, then the worker exits; a second
SIGTERM stops at once and the job ends ``failed``, "worker shut down"). A worker killed outright
stops refreshing its heartbeat (:mod:`fimntk.worker.heartbeat`) and the API's reaper fails its job
("worker lost") within a bounded time. When Redis goes away, RQ retries with back-off while it
waits for a job; an outage that hits RQ's bookkeeping around a job (which RQ itself answers by
quitting) makes :func:`run_worker` wait for Redis and start the work loop again under the same
name, so the worker carries on once Redis is back either way.

Start one worker per GPU with ``--device cuda:N`` (or ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from fimntk.core.config import Settings
from fimntk.core.logs import configure_logging
from fimntk.worker.cancel_watchdog import CancelWatchdog
from fimntk.worker.heartbeat import Heartbeat
from fimntk.worker.runner import JobRunner
from fimntk.worker.tasks import get_runner, install_runner

_log = logging.getLogger(__name__)

#: Errors that mean Redis is (for now) out of reach, as opposed to a bug.
_REDIS_LOST = (RedisConnectionError, RedisTimeoutError)
#: Longest wait between two attempts to reach Redis again, in seconds.
_MAX_RECONNECT_WAIT_S = 30.0
#: Longest wait for a command channel's thread to end (its read error handler sleeps 2 s).
_COMMAND_CHANNEL_JOIN_S = 10.0

_T = TypeVar("_T")


class ComputeWorker(SimpleWorker):
    """A ``SimpleWorker`` whose stop-job command stops the running job cooperatively, and which
    remembers whether its work loop ended because Redis went away (``redis_lost``)."""

    redis_lost = False

    def _noting_loss(self, call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        try:
            return call(*args, **kwargs)
        except _REDIS_LOST:
            self.redis_lost = True
            raise

    def execute_job(self, job: Any, queue: Any) -> None:
        """RQ's, noting a lost Redis (RQ quits its loop on it)."""
        self._noting_loss(super().execute_job, job, queue)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's, noting a lost Redis."""
        self._noting_loss(super().heartbeat, timeout, pipeline)

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's, noting a lost Redis."""
        self._noting_loss(super().check_for_suspension, burst)

    def run_maintenance_tasks(self) -> None:
        """RQ's, noting a lost Redis."""
        self._noting_loss(super().run_maintenance_tasks)

    def _set_ip_address(self, connection: Redis) -> None:
        """RQ's lookup, tolerating servers whose CLIENT INFO redis-py cannot parse (the
        embedded fakeredis server of ``fimntk serve``)."""
        try:
            super()._set_ip_address(connection)
        except (ValueError, RedisError):
            self.ip_address = "unknown"

    def unsubscribe(self) -> None:
        """Close the command channel and wait for its thread to end.

        RQ unsubscribes first and stops the thread after; the thread can then read the
        unsubscribe reply while still running, and wait a whole minute for a subscription that
        never comes. Stopping it first makes the reply (or, with Redis gone, the read error)
        the thread's last step.
        """
        thread = self.pubsub_thread
        if thread is None:
            return
        thread.stop()
        with contextlib.suppress(RedisError):  # Redis gone: the thread's read fails instead
            self.pubsub.unsubscribe()
        thread.join(timeout=_COMMAND_CHANNEL_JOIN_S)
        with contextlib.suppress(RedisError):
            self.pubsub.close()
        self.pubsub_thread = None

    def kill_horse(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Called by RQ's stop-job command handler (pub/sub thread): flag the job to stop."""
        job_id = self._stopped_job_id or self.get_current_job_id()
        _log.info("stop requested for job %s", job_id)
        get_runner().request_stop(job_id)


class WorkerConfigurationError(SystemExit):
    """The worker's settings cannot work; raised at start, before it listens on a queue."""


def run_worker(
    redis_url: str,
    queues: Sequence[str],
    settings: Settings,
    device: str | None = None,
    name: str | None = None,
    burst: bool = False,
    max_jobs: int | None = None,
) -> bool:
    """Run a worker until it is stopped (or, with ``burst``, until the queues are empty).

    When RQ's work loop ends because Redis went away, the worker waits for Redis (back-off up
    to ``_MAX_RECONNECT_WAIT_S``; SIGTERM or SIGINT ends the wait) and starts a new loop under
    the same name; ``max_jobs`` then counts from the new loop.

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
    try:
        runner = JobRunner(settings, device)
    except (ImportError, ValueError, RuntimeError) as exc:
        # A bad configuration (a builder module that cannot be imported or takes a name
        # already in use, an unknown device) stops the worker at start, saying why.
        raise WorkerConfigurationError(f"fimntk worker: bad configuration: {exc}") from exc
    install_runner(runner)
    connection = Redis.from_url(redis_url, health_check_interval=30)

    def new_worker() -> ComputeWorker:
        return ComputeWorker(
            list(queues), connection=connection, serializer=JSONSerializer, name=name
        )

    worker = new_worker()
    name = worker.name
    runner.worker_name = name

    def status() -> tuple[str, str | None]:
        job = runner.current_job_id
        return ("busy" if job else "idle"), job

    heartbeats = [
        Heartbeat(connection, queue, name, settings.heartbeat_ttl_s, status, str(runner.device))
        for queue in queues
    ]
    runner.on_job_done = lambda: _count_job(heartbeats)
    watchdog = CancelWatchdog(runner, connection, settings.cancel_grace_s)
    _log.info("worker %s on %s listening on %s", name, runner.device, list(queues))
    for heartbeat in heartbeats:
        heartbeat.start()
    watchdog.start()
    worked = False
    try:
        while True:
            try:
                worked = (
                    worker.work(
                        burst=burst,
                        max_jobs=max_jobs,
                        logging_level=settings.log_level,
                        with_scheduler=False,
                    )
                    or worked
                )
            except _REDIS_LOST:  # Redis went away while the loop was starting
                worker.redis_lost = True
            if not worker.redis_lost or worker._stop_requested:
                return worked
            _log.warning("worker %s lost Redis; starting again once it answers", name)
            if not _wait_for_redis(connection):
                return worked
            with contextlib.suppress(RedisError):  # free the name for the new loop
                worker.register_death()
            with contextlib.suppress(RedisError):  # RQ's teardown stopped before this
                worker.unsubscribe()
            worker = new_worker()
    finally:
        watchdog.stop()
        for heartbeat in heartbeats:
            heartbeat.stop()
        _log.info("worker %s stopped", name)


def _wait_for_redis(connection: Redis) -> bool:
    """Wait, with back-off, until Redis answers; ``False`` if SIGTERM or SIGINT came first."""
    stop = threading.Event()
    handlers = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        wait_s = 0.5
        while not stop.is_set():
            with contextlib.suppress(RedisError):
                if connection.ping():
                    return True
            stop.wait(wait_s)
            wait_s = min(2 * wait_s, _MAX_RECONNECT_WAIT_S)
        return False
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


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
