"""``/v1/jobs``: submit, read (with long polling), list and cancel jobs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from redis import asyncio as aioredis
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from fimntk.contract.schemas import IsoDatetime, JobCreate, JobPublic, JobsPublic, Problem
from fimntk.contract.vocabulary import TERMINAL_STATUSES, JobStatus, Metric
from fimntk.contract.vocabulary import Representation as RepresentationName
from fimntk.core.queue import done_channel
from fimntk.core.storage.records import JobFilter, User
from fimntk.service.deps import AppState, CurrentUser, StateDep
from fimntk.service.openapi import Responses

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_AUTH: Responses = {401: {"model": Problem, "description": "Missing or unknown API key."}}
_NOT_FOUND: Responses = {404: {"model": Problem, "description": "No such job, or another user's."}}
_POLL_INTERVAL_S = 0.25
_FIRST_POLL_S = 0.005


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    responses={
        200: {
            "model": JobPublic,
            "description": "Replay of an earlier request with the same "
            "Idempotency-Key: the original job.",
        },
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
        Header(
            alias="Idempotency-Key",
            max_length=200,
            description="Resubmitting with the same key returns the same job.",
        ),
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
    model: Annotated[str | None, Query(max_length=71, description="Weights digest.")] = None,
    dataset: Annotated[
        str | None, Query(max_length=71, description="Dataset digest or name.")
    ] = None,
    metric: Metric | None = None,
    representation: RepresentationName | None = None,
    created_after: IsoDatetime | None = None,
    created_before: IsoDatetime | None = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobsPublic:
    """Jobs, newest first, for dashboards: filters and cursor pagination. The admin sees
    everyone's jobs."""
    filters = JobFilter(
        owner_id=None if user.is_admin else user.id,
        status=status,
        model=model,
        dataset=dataset,
        metric=metric,
        representation=representation,
        created_after=created_after,
        created_before=created_before,
    )
    records, next_cursor = state.records.list_jobs(filters, cursor, limit)
    return JobsPublic(items=[state.jobs.public(r) for r in records], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic, responses={**_AUTH, **_NOT_FOUND})
async def get_job(
    job_id: str,
    state: StateDep,
    user: CurrentUser,
    wait: Annotated[
        int,
        Query(ge=0, le=60, description="Long-poll up to this many seconds for the job to finish."),
    ] = 0,
) -> JobPublic:
    """Status, progress, timings, error (problem+json) and links of a job."""
    deadline = time.monotonic() + wait
    record, view = await state.jobs.read(job_id, user)
    if record.status in TERMINAL_STATUSES or time.monotonic() >= deadline:
        return view
    return await _long_poll(state, job_id, user, deadline)


async def _long_poll(state: AppState, job_id: str, user: User, deadline: float) -> JobPublic:
    """Wait for the job to end or the deadline: woken by the worker's message on the job's
    channel (see :func:`fimntk.core.queue.done_channel`), and re-reading the record at least
    every ``_POLL_INTERVAL_S`` for what no worker announces (cancel, reaper). Without pub/sub, polls
    (quickly at first, for quick jobs)."""
    pubsub = None
    client = aioredis.Redis.from_url(state.queue.url, socket_connect_timeout=2)
    try:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(done_channel(job_id))
    except (RedisError, OSError):
        pubsub = None
    try:
        polls = 0
        while True:
            # Subscribed before reading: a message sent after this read is not missed.
            record, view = await run_in_threadpool(state.jobs.view, job_id, user)
            left = deadline - time.monotonic()
            if record.status in TERMINAL_STATUSES or left <= 0:
                return view
            if pubsub is None:
                await asyncio.sleep(min(_FIRST_POLL_S * 2**polls, _POLL_INTERVAL_S, left))
                polls += 1
                continue
            try:
                await pubsub.get_message(timeout=min(_POLL_INTERVAL_S, left))
            except (RedisError, OSError):
                pubsub = None
    finally:
        with contextlib.suppress(RedisError, OSError):
            if pubsub is not None:
                await pubsub.aclose()
            await client.aclose()


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobPublic,
    responses={
        409: {"model": Problem, "description": "Job already finished."},
        **_AUTH,
        **_NOT_FOUND,
    },
)
def cancel_job(job_id: str, state: StateDep, user: CurrentUser) -> JobPublic:
    """Cancel a job: a queued job is removed at once; a running one is stopped by its worker
    and ends ``canceled`` within seconds (poll the job)."""
    return state.jobs.public(state.jobs.cancel(job_id, user))
