"""Entry points that RQ calls by dotted path; each takes only a job id.

``fimntk.worker.tasks.run_job`` is what the API enqueues; a sharded job enqueues its own
tasks (``run_shard_task``, ``resume_shards``: :mod:`fimntk.worker.sharded`). The runner is
created once per worker process (by :mod:`fimntk.worker.compute_worker`, or lazily from the
environment) and reused by every job.
"""

from __future__ import annotations

from typing import Any

from fimntk.core.config import Settings
from fimntk.worker import sharded
from fimntk.worker.runner import JobRunner

_runner: JobRunner | None = None


def install_runner(runner: JobRunner) -> None:
    """Use ``runner`` for the jobs of this process."""
    global _runner
    _runner = runner


def get_runner() -> JobRunner:
    """The runner of this process, created from the environment on first use."""
    global _runner
    if _runner is None:
        _runner = JobRunner(Settings())
    return _runner


def run_job(job_id: str) -> dict[str, Any]:
    """Run the job ``job_id`` (its spec is read from the database).

    Returns:
        A JSON summary, e.g. ``{"status": "succeeded"}``.
    """
    runner = get_runner()
    return sharded.start(runner, job_id) or runner.run(job_id)


def run_shard_task(job_id: str, stage: int, index: int) -> dict[str, Any]:
    """Run task ``index`` of stage ``stage`` of the sharded job ``job_id``
    (:mod:`fimntk.worker.sharded`)."""
    return sharded.run_task(get_runner(), job_id, stage, index)


def resume_shards(job_id: str) -> dict[str, Any]:
    """Enqueue the missing tasks of a sharded job whose tasks Redis lost."""
    return sharded.resume(get_runner(), job_id)
