"""The FastAPI application: builds the stores and joins the routers, nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from fimntk.core.config import Settings
from fimntk.core.queue import JobQueue
from fimntk.core.storage.blobs import LocalBlobStore
from fimntk.core.storage.records import SqlRecordStore
from fimntk.core.storage.search import ResultSearch
from fimntk.core.storage.stores import open_artifact_store
from fimntk.service.auth import hash_key
from fimntk.service.body_limit import BodyLimitMiddleware
from fimntk.service.deps import AppState
from fimntk.service.jobs import JobService
from fimntk.service.openapi import install_openapi
from fimntk.service.problem_handlers import install_error_handlers
from fimntk.service.prometheus import RequestMiddleware, ServiceMetrics
from fimntk.service.query_check import reject_unknown_query
from fimntk.service.reaper import Reaper
from fimntk.service.routes import admin, blobs, health, jobs, results, search, ui, users
from fimntk.version import __version__

DESCRIPTION = """
Fisher information matrices and neural tangent kernels as a shared GPU service.

1. Upload weights, data and vectors as safetensors: `PUT /v1/blobs/sha256:<hex>` (raw body).
2. Submit a job: `POST /v1/jobs` (model = weights + JSON architecture, dataset, metric,
   representation, operations). The answer is 202 with `Location`.
3. Poll `GET /v1/jobs/{id}?wait=30`, then read `GET /v1/jobs/{id}/result`.

Every request carries `Authorization: Bearer <API key>`. Errors are RFC 7807
`application/problem+json` with a `field` member naming the field at fault.
"""


def build_state(settings: Settings) -> AppState:
    """Open the stores and the queue described by ``settings``.

    Raises:
        ValueError: No Redis URL configured.
    """
    if not settings.redis_url:
        raise ValueError("FIMNTK_REDIS_URL is required (or run 'fimntk serve' for embedded mode)")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    records = SqlRecordStore(settings.resolved_database_url)
    if settings.admin_key:
        records.set_admin_key(hash_key(settings.admin_key))
    blob_store = LocalBlobStore(settings.blobs_dir)
    artifact_store = open_artifact_store(settings)
    queue = JobQueue(settings.redis_url, settings.queue_name)
    service = JobService(settings, records, blob_store, artifact_store, queue)
    reaper = Reaper(settings, records, queue, artifact_store)
    metrics = ServiceMetrics(records, queue)
    search = ResultSearch(records.engine)
    return AppState(
        settings, records, blob_store, artifact_store, queue, service, reaper, metrics, search
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application.

    Args:
        settings: Settings; read from the environment when omitted.

    Returns:
        The FastAPI app, its state in ``app.state.fimntk``.
    """
    state = build_state(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.reaper.start()
        yield
        state.reaper.stop()
        state.queue.close()
        state.records.close()  # type: ignore[attr-defined]

    app = FastAPI(
        title="fimntk",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(reject_unknown_query)],
    )
    app.state.fimntk = state
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(RequestMiddleware, metrics=state.metrics)
    # Added last, so it runs first: before metrics, parsing and authentication.
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.settings.max_body_bytes)
    for module in (blobs, jobs, results, search, users, admin, health, ui):
        app.include_router(module.router)
    return app
