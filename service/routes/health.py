"""Probes and metrics: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from fimntk.core.errors import QueueUnavailableError
from fimntk.service.deps import AppState, StateDep

router = APIRouter(tags=["health"])


def _database_ok(state: AppState) -> bool:
    try:
        state.records.user_by_key_hash("0" * 64)
    except Exception:  # any database failure means unhealthy
        return False
    return True


@router.get("/healthz", responses={503: {"description": "Database or queue unreachable."}})
def healthz(state: StateDep) -> JSONResponse:
    """``{"status": "ok", "database": true, "queue": true}``; 503 when a part is down."""
    queue_ok = state.queue.ping()
    database_ok = _database_ok(state)
    healthy = queue_ok and database_ok
    return JSONResponse(
        {"status": "ok" if healthy else "degraded", "database": database_ok, "queue": queue_ok},
        status_code=200 if healthy else 503,
    )


def _readiness(state: AppState) -> dict[str, dict[str, Any]]:
    checks: dict[str, dict[str, Any]] = {}
    checks["database"] = {"ok": _database_ok(state)}
    checks["queue"] = {"ok": state.queue.ping()}
    problem = state.artifacts.check_ready(state.settings.min_free_bytes)
    if problem is None:
        problem = state.blobs.check_ready(state.settings.min_free_bytes)
    checks["storage"] = {"ok": problem is None, **({"detail": problem} if problem else {})}
    try:
        workers = len(state.queue.live_workers())
    except QueueUnavailableError:
        workers = 0
    checks["workers"] = {"ok": workers > 0, "live": workers}
    return checks


@router.get(
    "/readyz",
    responses={503: {"description": "Not ready: a check failed (see 'checks')."}},
)
async def readyz(state: StateDep) -> JSONResponse:
    """Ready to take jobs: Redis and the database answer, storage is writable with
    ``FIMNTK_MIN_FREE_BYTES`` free, and at least one worker is alive.

    ``{"status": "ready", "checks": {"database": {"ok": true}, "queue": {...},
    "storage": {...}, "workers": {"ok": true, "live": 2}}}``; 503 with ``not-ready``."""
    checks = await run_in_threadpool(_readiness, state)
    ready = all(check["ok"] for check in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not-ready", "checks": checks},
        status_code=200 if ready else 503,
        headers=None if ready else {"Retry-After": "5"},
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST: {}},
            "description": "Prometheus text exposition format.",
        }
    },
)
async def metrics(state: StateDep) -> Response:
    """Prometheus metrics: requests, queue depth, jobs by status, job durations, workers."""
    body = await run_in_threadpool(generate_latest, state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
