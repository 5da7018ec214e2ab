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

This module imports no web framework: the worker and the storage layer raise and build these
too. :mod:`fimntk.service.problem_handlers` maps them (and the errors of the database, the
queue and request validation) to HTTP responses, in one place.

Every problem carries ``type``, ``title``, ``status``, ``detail`` and, when one field is at
fault, ``field`` (a dotted path such as ``operations[1].v`` or a header name).
"""

from __future__ import annotations

from typing import Any, ClassVar


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
