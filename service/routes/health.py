"""``/healthz``: liveness and the reachability of the database and the queue."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz", responses={503: {"description": "Database or queue unreachable."}})
def healthz(state: StateDep) -> JSONResponse:
    """``{"status": "ok", "database": true, "queue": true}``; 503 when a part is down."""
    queue_ok = state.queue.ping()
    try:
        state.records.user_by_key_hash("0" * 64)
        database_ok = True
    except Exception:  # any database failure means unhealthy
        database_ok = False
    healthy = queue_ok and database_ok
    return JSONResponse(
        {"status": "ok" if healthy else "degraded", "database": database_ok, "queue": queue_ok},
        status_code=200 if healthy else 503,
    )
