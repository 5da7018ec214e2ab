"""``/v1/admin``: what an admin watches (``fimntk status``): queue, workers, failures."""

from __future__ import annotations

from fastapi import APIRouter

from fimntk.contract.schemas import (
    AdminStatus,
    FailureSummary,
    Problem,
    QueueStatus,
    ReaperStatus,
    WorkerStatus,
)
from fimntk.contract.vocabulary import IN_FLIGHT_STATUSES, TERMINAL_STATUSES, JobStatus
from fimntk.core.errors import QueueUnavailableError
from fimntk.core.shards import shards_in_flight
from fimntk.core.storage.records import JobFilter
from fimntk.service.deps import AdminUser, AppState, StateDep
from fimntk.service.reaper import max_detection_s

router = APIRouter(prefix="/v1/admin", tags=["admin"])

_RECENT_FAILURES = 10


@router.get(
    "/status",
    response_model=AdminStatus,
    responses={401: {"model": Problem}, 403: {"model": Problem, "description": "Not admin."}},
)
def admin_status(state: StateDep, admin: AdminUser) -> AdminStatus:
    """Queue depth, live workers (state, current job, last heartbeat), jobs by status and the
    most recent failures. Answers even while Redis is down (``queue.reachable`` false)."""
    return build_status(state)


def build_status(state: AppState) -> AdminStatus:
    """The admin status of a deployment."""
    try:
        depth: int | None = state.queue.depth()
        beats = state.queue.live_workers()
        reachable = True
    except QueueUnavailableError:
        depth, beats, reachable = None, {}, False
    counts = state.records.count_by_status()
    failed, _ = state.records.list_jobs(JobFilter(status=JobStatus.FAILED), None, _RECENT_FAILURES)
    failures = []
    for record in failed:
        failures.append(
            FailureSummary(
                id=record.id,
                owner=record.owner_id,
                metric=record.metric,
                representation=record.representation,
                worker=record.worker,
                finished_at=record.finished_at,
                error=Problem.model_validate(record.error) if record.error else None,
            )
        )
    settings = state.settings
    return AdminStatus(
        queue=QueueStatus(
            name=settings.queue_name,
            reachable=reachable,
            depth=depth,
            shards_in_flight=shards_in_flight(beats) if reachable else None,
        ),
        workers=[WorkerStatus.model_validate(beat) for beat in beats.values()],
        jobs={
            status: counts.get(status, 0)
            for status in (*IN_FLIGHT_STATUSES, *sorted(TERMINAL_STATUSES))
        },
        recent_failures=failures,
        reaper=ReaperStatus(
            heartbeat_ttl_s=settings.heartbeat_ttl_s,
            interval_s=settings.reaper_interval_s,
            max_detection_s=max_detection_s(settings),
        ),
    )
