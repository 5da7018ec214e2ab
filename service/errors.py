"""Errors of the service, and their one mapping to RFC 7807 ``application/problem+json``.

Hierarchy::

    ServiceError
    ├── InvalidInputError (ValueError)   422  a spec, blob or parameter that cannot be used
    ├── BadRequestError (ValueError)     400  a malformed request (e.g. digest mismatch)
    ├── AuthenticationError              401  missing or unknown API key
    ├── PermissionDeniedError            403  an admin-only action
    ├── NotFoundError (LookupError)      404  unknown object, or another user's
    ├── ConflictError                    409  idempotency key reused, job not in the right state
    ├── PayloadTooLargeError             413  upload past the configured cap
    ├── TooManyJobsError                 429  jobs in flight past the per-user limit
    ├── StorageFullError (OSError)       507  no space left to store an upload
    └── UnavailableError                 503  a dependency is down (with Retry-After)
        ├── QueueUnavailableError             Redis cannot be reached
        └── DatabaseUnavailableError          the database cannot be reached

Errors of the database layer are translated here too: a value the database refuses (too long,
a NUL character) is a 422, an unreachable database a 503.

Every problem carries ``type``, ``title``, ``status``, ``detail`` and, when one field is at
fault, ``field`` (a dotted path such as ``operations[1].v`` or a header name).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

PROBLEM_MEDIA_TYPE = "application/problem+json"
_log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of every error the service raises on purpose.

    Args:
        detail: Human-readable explanation of this occurrence.
        field: Dotted path of the offending field, header or path parameter, if any.
    """

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field

    def to_problem(self) -> dict[str, Any]:
        """The RFC 7807 body of this error."""
        return problem(self.status, self.slug, self.title, self.detail, self.field)


class InvalidInputError(ServiceError, ValueError):
    """A spec, blob or parameter that is well formed but cannot be used."""

    status = 422
    slug = "invalid-input"
    title = "Invalid input"


class BadRequestError(ServiceError, ValueError):
    """A malformed request, such as a body whose digest differs from its URL."""

    status = 400
    slug = "bad-request"
    title = "Bad request"


class AuthenticationError(ServiceError):
    """A missing, malformed or unknown API key."""

    status = 401
    slug = "unauthenticated"
    title = "Authentication required"


class PermissionDeniedError(ServiceError):
    """An action reserved to the admin key."""

    status = 403
    slug = "forbidden"
    title = "Forbidden"


class NotFoundError(ServiceError, LookupError):
    """An unknown object, or one owned by another user (indistinguishable on purpose)."""

    status = 404
    slug = "not-found"
    title = "Not found"


class ConflictError(ServiceError):
    """A request that conflicts with the current state (idempotency key, job state)."""

    status = 409
    slug = "conflict"
    title = "Conflict"


class PayloadTooLargeError(ServiceError):
    """An upload past the configured size cap."""

    status = 413
    slug = "payload-too-large"
    title = "Payload too large"


class TooManyJobsError(ServiceError):
    """More jobs in flight than the per-user limit allows."""

    status = 429
    slug = "too-many-jobs"
    title = "Too many jobs in flight"


class StorageFullError(ServiceError, OSError):
    """No space left on the storage for an upload."""

    status = 507
    slug = "storage-full"
    title = "Storage full"


class UnavailableError(ServiceError):
    """A dependency of the service is down; the client should retry later."""

    status = 503
    slug = "unavailable"
    title = "Service unavailable"
    #: Seconds sent in ``Retry-After``.
    retry_after_s: ClassVar[int] = 5


class QueueUnavailableError(UnavailableError):
    """The queue (Redis) cannot be reached."""

    slug = "queue-unavailable"
    title = "Queue unavailable"


class DatabaseUnavailableError(UnavailableError):
    """The database cannot be reached."""

    slug = "database-unavailable"
    title = "Database unavailable"


def problem(
    status: int, slug: str, title: str, detail: str, field: str | None = None, **extra: Any
) -> dict[str, Any]:
    """Build an RFC 7807 problem document.

    Args:
        status: HTTP status code.
        slug: Last segment of the problem ``type`` URI.
        title: Short summary of the problem type.
        detail: Explanation of this occurrence.
        field: Offending field, if any.
        **extra: Extension members.

    Returns:
        The problem as a JSON-ready dict.
    """
    body: dict[str, Any] = {
        "type": f"/problems/{slug}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if field is not None:
        body["field"] = field
    body.update(extra)
    return body


def format_loc(loc: tuple[Any, ...] | list[Any]) -> str:
    """Turn a pydantic error location into a dotted field path.

    Args:
        loc: Location such as ``("body", "operations", 1, "v")``.

    Returns:
        A path such as ``operations[1].v``; the leading ``body``/``query``/``path`` is dropped
        except for headers, kept as ``header.<name>``.
    """
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path"):
        parts = parts[1:]
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "body"


def problem_response(body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON response with the problem media type."""
    return JSONResponse(
        body, status_code=body["status"], media_type=PROBLEM_MEDIA_TYPE, headers=headers
    )


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (Starlette lists only those of
    the first route matching the path)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "__none__"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Map every error the app can raise to problem+json: the one place where this happens.

    Args:
        app: The application to equip.
    """

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if isinstance(exc, UnavailableError):
            headers = {"Retry-After": str(exc.retry_after_s)}
        return problem_response(exc.to_problem(), headers)

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError) -> JSONResponse:
        detail = str(exc.orig).strip().splitlines()[0] if exc.orig else "value refused"
        return problem_response(problem(422, "invalid-input", "Invalid input",
                                        f"the database refused a value: {detail}"))

    @app.exception_handler(OperationalError)
    async def _database_down(request: Request, exc: OperationalError) -> JSONResponse:
        _log.warning("database unavailable on %s %s: %s", request.method, request.url.path,
                     exc.orig)
        error = DatabaseUnavailableError("cannot reach the database; retry later")
        return problem_response(error.to_problem(), {"Retry-After": str(error.retry_after_s)})

    @app.exception_handler(RedisError)
    async def _queue_down(request: Request, exc: RedisError) -> JSONResponse:
        error = QueueUnavailableError(f"cannot reach the queue: {exc}")
        return problem_response(error.to_problem(), {"Retry-After": str(error.retry_after_s)})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        field = format_loc(first["loc"])
        details = [
            {"field": format_loc(e["loc"]), "message": e["msg"], "type": e["type"]} for e in errors
        ]
        body = problem(
            422, "validation-error", "Validation error", f"{field}: {first['msg']}", field,
            errors=details,
        )
        return problem_response(body)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        headers = dict(exc.headers) if exc.headers else {}
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return problem_response(problem(exc.status_code, slug, str(exc.detail), str(exc.detail)),
                                headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        _log.exception("unhandled error on %s %s", request.method, request.url.path)
        body = problem(500, "internal-error", "Internal error", "unexpected error")
        return problem_response(body)
