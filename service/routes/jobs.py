"""``/v1/jobs``: submit, read (with long polling), list and cancel jobs."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from starlette.concurrency import run_in_threadpool

from service.deps import CurrentUser, StateDep
from service.schemas import (
    IsoDatetime,
    JobCreate,
    JobPublic,
    JobsPublic,
    JobStatus,
    Metric,
    Problem,
)
from service.schemas import Representation as RepresentationName
from service.storage.records import TERMINAL, JobFilter

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_AUTH = {401: {"model": Problem, "description": "Missing or unknown API key."}}
_NOT_FOUND = {404: {"model": Problem, "description": "No such job, or another user's."}}
_POLL_INTERVAL_S = 0.25
_FIRST_POLL_S = 0.005


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    responses={
        200: {"model": JobPublic, "description": "Replay of an earlier request with the same "
                                                 "Idempotency-Key: the original job."},
        409: {"model": Problem, "description": "Idempotency-Key reused for another request."},
        422: {"model": Problem, "description": "A field at fault, named in 'field'."},
        429: {"model": Problem, "description": "Too many jobs in flight."},
        503: {"model": Problem, "description": "Queue unreachable."},
        **_AUTH,
    },
)
async def create_job(
    spec: JobCreate,
    response: Response,
    state: StateDep,
    user: CurrentUser,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", max_length=200,
               description="Resubmitting with the same key returns the same job."),
    ] = None,
) -> JobPublic:
    """Queue a job. Answers 202 with ``Location`` of the job to poll."""
    record, created = await run_in_threadpool(state.jobs.submit, spec, user, idempotency_key)
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/jobs/{record.id}"
    return state.jobs.public(record)


@router.get("", response_model=JobsPublic, responses=_AUTH)
def list_jobs(
    state: StateDep,
    user: CurrentUser,
    status: JobStatus | None = None,
    model: Annotated[str | None, Query(description="Weights digest.")] = None,
    dataset: Annotated[str | None, Query(description="Dataset digest or name.")] = None,
    metric: Metric | None = None,
    representation: RepresentationName | None = None,
    created_after: IsoDatetime | None = None,
    created_before: IsoDatetime | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobsPublic:
    """Jobs, newest first, for dashboards: filters and cursor pagination. The admin sees
    everyone's jobs."""
    filters = JobFilter(
        owner_id=None if user.is_admin else user.id, status=status, model=model,
        dataset=dataset, metric=metric, representation=representation,
        created_after=created_after, created_before=created_before,
    )
    records, next_cursor = state.records.list_jobs(filters, cursor, limit)
    return JobsPublic(items=[state.jobs.public(r) for r in records], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic, responses={**_AUTH, **_NOT_FOUND})
async def get_job(
    job_id: str,
    state: StateDep,
    user: CurrentUser,
    wait: Annotated[int, Query(ge=0, le=60, description="Long-poll up to this many seconds "
                                                          "for the job to finish.")] = 0,
) -> JobPublic:
    """Status, progress, timings, error (problem+json) and links of a job."""
    deadline = time.monotonic() + wait
    record = await run_in_threadpool(state.jobs.get, job_id, user)
    polls = 0
    while record.status not in TERMINAL and time.monotonic() < deadline:
        await asyncio.sleep(min(_FIRST_POLL_S * 2**polls, _POLL_INTERVAL_S))  # quick jobs
        polls += 1
        record = await run_in_threadpool(state.jobs.get, job_id, user)
    return await run_in_threadpool(state.jobs.public, record)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobPublic,
    responses={409: {"model": Problem, "description": "Job already finished."},
               **_AUTH, **_NOT_FOUND},
)
def cancel_job(job_id: str, state: StateDep, user: CurrentUser) -> JobPublic:
    """Cancel a job: a queued job is removed at once; a running one is stopped by its worker
    and ends ``canceled`` within seconds (poll the job)."""
    return state.jobs.public(state.jobs.cancel(job_id, user))
