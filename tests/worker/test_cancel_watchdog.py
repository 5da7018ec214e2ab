"""The cancel watchdog (issue 19): a job that stops by itself keeps its worker; one that does
not within the grace is recorded canceled and the process ends with the agreed code."""

from __future__ import annotations

import threading
import time

from fimntk.core.queue import WORKER_EXIT_AFTER_CANCEL
from fimntk.worker.cancel_watchdog import CancelWatchdog


class FakeRunner:
    def __init__(self) -> None:
        self.stop_requested = threading.Event()
        self.current_record_id: str | None = None
        self.flagged: set[str] = set()
        self.ended: list[str] = []

    def cancel_requested(self, record_id: str) -> bool:
        return record_id in self.flagged

    def end_canceled(self, record_id: str) -> None:
        self.ended.append(record_id)


def _until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_job_that_stops_within_the_grace_keeps_its_worker() -> None:
    runner, exits = FakeRunner(), []
    watchdog = CancelWatchdog(runner, None, grace_s=1.0, exit_process=exits.append)
    watchdog.start()
    try:
        runner.current_record_id = "j1"
        runner.stop_requested.set()
        time.sleep(0.5)
        runner.current_record_id = None  # the job saw the flag at its next check
        runner.stop_requested.clear()
        time.sleep(1.5)
        assert exits == [] and runner.ended == []
    finally:
        watchdog.stop()


def test_a_job_stuck_past_the_grace_is_ended_with_its_worker() -> None:
    runner, exits = FakeRunner(), []
    watchdog = CancelWatchdog(runner, None, grace_s=1.0, exit_process=exits.append)
    watchdog.start()
    try:
        runner.current_record_id = "j2"
        time.sleep(0.5)
        assert exits == []  # no cancel: a long job runs on
        clock = time.monotonic()
        runner.flagged.add("j2")  # cancel seen through the record, not the stop command
        _until(lambda: exits != [])
        assert 1.0 <= time.monotonic() - clock <= 3.0
        assert exits == [WORKER_EXIT_AFTER_CANCEL] and runner.ended == ["j2"]
    finally:
        watchdog.stop()
