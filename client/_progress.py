"""Showing a job's progress while the client waits: a tqdm bar on a terminal, nothing
otherwise, or a callback of yours."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

ProgressOption = bool | Callable[[dict[str, Any]], None] | None


class ProgressDisplay:
    """Follows a job's ``progress`` (``done``, ``total``, ``stage``) as it is polled.

    Args:
        option: ``None``: a bar when stderr is a terminal; ``True``/``False``: always/never;
            a callable: called with each polled job (a dict), no bar.
        job_id: The job, for the bar's label.
    """

    def __init__(self, option: ProgressOption, job_id: str) -> None:
        self.callback = option if callable(option) else None
        self.enabled = (
            bool(option)
            if option is not None and not callable(option)
            else (option is None and sys.stderr.isatty())
        )
        self.job_id = job_id
        self._bar: Any = None
        self._stage: str | None = None

    @property
    def interactive(self) -> bool:
        """Whether a bar is shown (then the client polls more often)."""
        return self.enabled

    def update(self, job: dict[str, Any]) -> None:
        """Show the job's current progress."""
        if self.callback is not None:
            self.callback(job)
        if not self.enabled:
            return
        progress = job.get("progress") or {}
        stage = f"{job.get('status')}: {progress.get('stage', '')}"
        if self._bar is None or stage != self._stage:
            self._close_bar()
            from tqdm import tqdm

            self._bar = tqdm(
                total=progress.get("total"),
                desc=f"{self.job_id[:12]} {stage}",
                unit="ex",
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
            )
            self._stage = stage
        total = progress.get("total")
        if total is not None and self._bar.total != total:
            self._bar.total = total
        self._bar.n = int(progress.get("done") or 0)
        self._bar.refresh()

    def message(self, text: str) -> None:
        """A line for the person at the terminal (nothing when silent)."""
        if self.enabled:
            self._close_bar()
            print(text, file=sys.stderr)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        """Remove the bar."""
        self._close_bar()
