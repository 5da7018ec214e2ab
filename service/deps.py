"""FastAPI dependencies, named as ``Annotated`` aliases so that routes read as prose."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from fimntk.core.config import Settings
from fimntk.core.errors import AuthenticationError, PermissionDeniedError
from fimntk.core.queue import JobQueue
from fimntk.core.storage.artifacts import ArtifactStore
from fimntk.core.storage.blobs import BlobStore
from fimntk.core.storage.records import RecordStore, User
from fimntk.core.storage.search import ResultSearch
from fimntk.service.auth import hash_key
from fimntk.service.jobs import JobService
from fimntk.service.prometheus import ServiceMetrics
from fimntk.service.reaper import Reaper

_bearer = HTTPBearer(auto_error=False, description="API key: 'Authorization: Bearer <key>'.")


@dataclass
class AppState:
    """Everything the routes use, built once by :func:`fimntk.service.main.create_app`.

    Attributes:
        settings: Settings.
        records: Record store.
        blobs: Blob store.
        artifacts: Artifact store.
        queue: Job queue.
        jobs: Job logic.
        reaper: Fails jobs of dead workers, requeues jobs Redis lost.
        metrics: Prometheus metrics of the app.
        search: Queries across jobs (search, series, labels).
    """

    settings: Settings
    records: RecordStore
    blobs: BlobStore
    artifacts: ArtifactStore
    queue: JobQueue
    jobs: JobService
    reaper: Reaper
    metrics: ServiceMetrics
    search: ResultSearch


def get_state(request: Request) -> AppState:
    """The application state."""
    return request.app.state.fimntk


async def get_user(
    state: Annotated[AppState, Depends(get_state)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User:
    """The user whose bearer key authenticates the request.

    A key verified moments ago is answered from the store's cache on the event loop; only
    a miss goes to the database, in the threadpool.

    Raises:
        AuthenticationError: Missing or unknown key.
    """
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise AuthenticationError("missing bearer API key", "Authorization")
    key_hash = hash_key(credentials.credentials)
    cached = getattr(state.records, "cached_user", None)
    user = cached(key_hash) if cached is not None else None
    if user is None:
        user = await run_in_threadpool(state.records.user_by_key_hash, key_hash)
    if user is None:
        raise AuthenticationError("unknown API key", "Authorization")
    return user


async def get_admin(user: Annotated[User, Depends(get_user)]) -> User:
    """The user, who must be the admin.

    Raises:
        PermissionDeniedError: Not the admin.
    """
    if not user.is_admin:
        raise PermissionDeniedError("admin key required", "Authorization")
    return user


StateDep = Annotated[AppState, Depends(get_state)]
CurrentUser = Annotated[User, Depends(get_user)]
AdminUser = Annotated[User, Depends(get_admin)]
