"""The one mapping of errors to RFC 7807 ``application/problem+json`` responses.

Service errors (:mod:`fimntk.core.errors`) carry their status; errors of the database
layer are translated here too: a value the database refuses (too long, a NUL character) is a
422, an unreachable database or queue a 503 with ``Retry-After``; request validation errors name
the field; anything unexpected is a 500 without internals.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from fimntk.contract import problems
from fimntk.contract.problems import ProblemType, problem
from fimntk.core.errors import (
    DatabaseUnavailableError,
    QueueUnavailableError,
    ServiceError,
    UnavailableError,
    format_loc,
)

PROBLEM_MEDIA_TYPE = "application/problem+json"
#: Status recorded for a request whose client disconnected before the end of its body.
CLIENT_CLOSED_REQUEST = 499
_log = logging.getLogger(__name__)


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
        return problem_response(
            problem(problems.INVALID_INPUT, f"the database refused a value: {detail}")
        )

    @app.exception_handler(OperationalError)
    async def _database_down(request: Request, exc: OperationalError) -> JSONResponse:
        _log.warning(
            "database unavailable on %s %s: %s", request.method, request.url.path, exc.orig
        )
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
        body = problem(problems.VALIDATION_ERROR, f"{field}: {first['msg']}", field, errors=details)
        return problem_response(body)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: problems.NOT_FOUND.slug, 405: problems.METHOD_NOT_ALLOWED.slug}.get(
            exc.status_code, "http-error"
        )
        headers = dict(exc.headers) if exc.headers else {}
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        kind = ProblemType(slug, exc.status_code, str(exc.detail))
        return problem_response(problem(kind, str(exc.detail)), headers or None)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client went away mid-request (a cancelled upload): not a server error. Nobody
        # reads the answer; 499 ("client closed request") keeps it out of the 5xx counts.
        _log.info("client went away during %s %s", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        _log.exception("unhandled error on %s %s", request.method, request.url.path)
        body = problem(problems.INTERNAL_ERROR, "unexpected error")
        return problem_response(body)
