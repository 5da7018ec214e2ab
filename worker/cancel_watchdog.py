"""Cancel means stop: the hard stop behind the cooperative one.

A job stops **cooperatively** at its next check: the engine calls the job's progress callback
after every batch of every pass (accumulation, each implicit product, each CG iteration), every
Gram block of an NTK, every product of the estimators and of the partial eigensolver, and the
callback raises :class:`~fimntk.worker.errors.JobCanceledError` once the stop command's flag is up
or the job record says ``cancel_requested`` (read at most once a second). That takes well under a
second, and the worker keeps its CUDA context, its models and its kept representations.

Some steps cannot be interrupted from Python: one LAPACK or cuSOLVER call (a full
eigendecomposition of a dense Fisher or an NTK Gram, a Cholesky factorisation), one long CUDA
kernel. A thread cannot be killed, and a job runs in the worker's main thread (a
``SimpleWorker``, to keep the CUDA context and the caches). So :class:`CancelWatchdog`, a thread
of the worker, watches the job in flight: once its cancel is seen, the job has
``Settings.cancel_grace_s`` (5 s) to stop by itself; past that the watchdog records the job
``canceled``, announces it, and ends the worker process with
:data:`~fimntk.core.queue.WORKER_EXIT_AFTER_CANCEL`. The supervisor (``fimntk serve``'s, a
compose ``restart:`` policy, systemd's ``Restart=always``) starts a fresh worker, which takes
the next job. Ending the process is the only stop that is always safe on a GPU: a CUDA context
cannot be reset from another thread, and its memory is returned only when the process ends. The
price, the model cache, is paid only on this path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

from redis import Redis
from redis.exceptions import RedisError

from fimntk.contract.vocabulary import JobStatus
from fimntk.core.queue import WORKER_EXIT_AFTER_CANCEL, done_channel

_log = logging.getLogger(__name__)

#: Period of the watchdog's look at the job in flight.
_POLL_S = 0.25
#: Period of its reads of the job record (the stop command's flag is read every poll).
_RECORD_EVERY_S = 1.0


class WatchedRunner(Protocol):
    """What the watchdog reads of the runner."""

    stop_requested: threading.Event

    @property
    def current_record_id(self) -> str | None:
        """Id of the job record the work in flight belongs to."""

    def cancel_requested(self, record_id: str) -> bool:
        """Whether the job record asks for a cancel."""

    def end_canceled(self, record_id: str) -> None:
        """Record the job in flight ``canceled`` (its other tasks too, for a sharded job)."""


class CancelWatchdog:
    """Ends the worker process when a canceled job does not stop within ``grace_s``.

    Args:
        runner: The worker's job runner.
        connection: Redis, to announce the job's end to long polls.
        grace_s: Seconds between the cancel being seen and the hard stop.
        exit_process: Ends the process (``os._exit``; tests pass a recorder).
    """

    def __init__(
        self,
        runner: WatchedRunner,
        connection: Redis | None,
        grace_s: float,
        exit_process: Callable[[int], None] = os._exit,
    ) -> None:
        self.runner = runner
        self.connection = connection
        self.grace_s = grace_s
        self.exit_process = exit_process
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="cancel-watchdog")

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (the worker is shutting down)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        watched: str | None = None
        seen_at: float | None = None
        last_read = 0.0
        while not self._stop.wait(_POLL_S):
            record_id = self.runner.current_record_id
            if record_id != watched:
                watched, seen_at, last_read = record_id, None, 0.0
            if record_id is None:
                continue
            now = time.monotonic()
            if seen_at is None:
                canceled = self.runner.stop_requested.is_set()
                if not canceled and now - last_read >= _RECORD_EVERY_S:
                    last_read = now
                    canceled = self._record_says_cancel(record_id)
                if canceled:
                    seen_at = now
                    _log.info("cancel of %s seen; %.1f s to stop", record_id, self.grace_s)
                continue
            if now - seen_at >= self.grace_s and self.runner.current_record_id == record_id:
                self._hard_stop(record_id)
                return

    def _record_says_cancel(self, record_id: str) -> bool:
        try:
            return self.runner.cancel_requested(record_id)
        except Exception as exc:  # the database may blip; the next read decides
            _log.warning("could not read the cancel flag of %s: %s", record_id, exc)
            return False

    def _hard_stop(self, record_id: str) -> None:
        _log.warning(
            "job %s did not stop within %.1f s of its cancel (a step that cannot be "
            "interrupted); recording it canceled and ending this worker for a fresh one",
            record_id,
            self.grace_s,
        )
        try:
            self.runner.end_canceled(record_id)
        except Exception as exc:  # the process ends anyway; the reaper fails the job then
            _log.error("could not record %s canceled: %s", record_id, exc)
        if self.connection is not None:
            try:
                self.connection.publish(done_channel(record_id), JobStatus.CANCELED.value)
            except RedisError as exc:
                _log.warning("could not announce the end of %s: %s", record_id, exc)
        for handler in logging.getLogger().handlers:
            handler.flush()
        self.exit_process(WORKER_EXIT_AFTER_CANCEL)
