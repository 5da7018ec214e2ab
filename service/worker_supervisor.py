"""``fimntk serve``'s worker: a child process started again whenever it dies.

A worker killed by the kernel's out-of-memory killer, or crashed, is replaced at once, so the
single-machine service never sits with jobs queued and nobody to run them. A worker that dies
within ``_QUICK_EXIT_S`` of its start, ``_QUICK_EXITS`` times in a row, has a bad
configuration (a builder module that cannot be imported, an unknown device): it is not started
again, and its last words are logged as an error (``/readyz`` then answers 503 and the reaper
fails queued jobs with ``no-worker``). A worker that ended itself to stop a canceled job (exit
code :data:`~fimntk.core.queue.WORKER_EXIT_AFTER_CANCEL`) is started again and not counted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fimntk.core.config import Settings
from fimntk.core.queue import WORKER_EXIT_AFTER_CANCEL

_log = logging.getLogger(__name__)
_QUICK_EXIT_S = 20.0
_QUICK_EXITS = 3
_POLL_S = 0.5


class SupervisedWorker:
    """A ``fimntk worker`` child process, restarted when it dies.

    Args:
        settings: Settings the worker shares (data directory, database, queue).
        redis_url: URL of the queue's Redis.
        log: File the worker's output is appended to; this process's stderr when ``None``.
    """

    def __init__(self, settings: Settings, redis_url: str, log: Path | None = None) -> None:
        self.env = {
            **os.environ,
            "FIMNTK_DATA_DIR": str(settings.data_dir.resolve()),
            "FIMNTK_DATABASE_URL": settings.resolved_database_url,
            "FIMNTK_REDIS_URL": redis_url,
            "FIMNTK_QUEUE_NAME": settings.queue_name,
        }
        self.log = log
        self.restarts = 0
        self.gave_up = False
        self.process: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        """Start the worker and the thread watching it."""
        self.process = self._spawn()
        self._thread.start()

    def stop(self) -> None:
        """Stop watching, then stop the worker (SIGTERM, SIGKILL after 10 s)."""
        self._stop.set()
        self._thread.join()
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _spawn(self) -> subprocess.Popen[bytes]:
        with contextlib.ExitStack() as files:
            out = files.enter_context(self.log.open("ab")) if self.log is not None else None
            return subprocess.Popen(
                [sys.executable, "-m", "fimntk", "worker"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
            )

    def _watch(self) -> None:
        quick_exits = 0
        started = time.monotonic()
        while not self._stop.wait(_POLL_S):
            assert self.process is not None
            code = self.process.poll()
            if code is None:
                continue
            if code == WORKER_EXIT_AFTER_CANCEL:  # it ended itself to stop a canceled job
                quick_exits = 0
                _log.info("the worker ended itself to stop a canceled job; starting a new one")
                self.restarts += 1
                started = time.monotonic()
                self.process = self._spawn()
                continue
            quick_exits = quick_exits + 1 if time.monotonic() - started < _QUICK_EXIT_S else 1
            if quick_exits >= _QUICK_EXITS:
                self.gave_up = True
                _log.error(
                    "the worker exited %d times within %.0f s of starting (last code %s): "
                    "its configuration is wrong; see %s",
                    quick_exits,
                    _QUICK_EXIT_S,
                    code,
                    self.log or "its output",
                )
                return
            _log.warning("the worker exited with code %s; starting a new one", code)
            self.restarts += 1
            started = time.monotonic()
            self.process = self._spawn()


@contextlib.contextmanager
def supervised_worker(
    settings: Settings, redis_url: str, log: Path | None = None
) -> Iterator[SupervisedWorker]:
    """Run a :class:`SupervisedWorker` for the duration of the block."""
    worker = SupervisedWorker(settings, redis_url, log)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
