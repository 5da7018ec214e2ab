"""Errors of the server (API, storage, queue), each tied to one problem type of the catalogue
(:mod:`fimntk.contract.problems`).

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
fault, ``field`` (a dotted path such as ``operations[1].v`` or a header name)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from fimntk.contract import problems
from fimntk.contract.problems import ProblemType, problem


class ServiceError(Exception):
    """Base of every error the server raises on purpose.

    Args:
        detail: Human-readable explanation of this occurrence.
        field: Dotted path of the offending field, header or path parameter, if any.
    """

    kind: ClassVar[ProblemType] = problems.INTERNAL_ERROR

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field

    @property
    def status(self) -> int:
        """The HTTP status of this error's problem type."""
        return self.kind.status

    def to_problem(self) -> dict[str, Any]:
        """The RFC 7807 body of this error."""
        return problem(self.kind, self.detail, self.field)


class InvalidInputError(ServiceError, ValueError):
    """A spec, blob or parameter that is well formed but cannot be used."""

    kind = problems.INVALID_INPUT


class BadRequestError(ServiceError, ValueError):
    """A malformed request, such as a body whose digest differs from its URL."""

    kind = problems.BAD_REQUEST


class AuthenticationError(ServiceError):
    """A missing, malformed or unknown API key."""

    kind = problems.UNAUTHENTICATED


class PermissionDeniedError(ServiceError):
    """An action reserved to the admin key."""

    kind = problems.FORBIDDEN


class NotFoundError(ServiceError, LookupError):
    """An unknown object, or one owned by another user (indistinguishable on purpose)."""

    kind = problems.NOT_FOUND


class ConflictError(ServiceError):
    """A request that conflicts with the current state (idempotency key, job state)."""

    kind = problems.CONFLICT


class PayloadTooLargeError(ServiceError):
    """An upload past the configured size cap."""

    kind = problems.PAYLOAD_TOO_LARGE


class TooManyJobsError(ServiceError):
    """More jobs in flight than the per-user limit allows."""

    kind = problems.TOO_MANY_JOBS


class StorageFullError(ServiceError, OSError):
    """No space left on the storage for an upload."""

    kind = problems.STORAGE_FULL


class UnavailableError(ServiceError):
    """A dependency of the service is down; the client should retry later."""

    kind = problems.UNAVAILABLE
    #: Seconds sent in ``Retry-After``.
    retry_after_s: ClassVar[int] = 5


class QueueUnavailableError(UnavailableError):
    """The queue (Redis) cannot be reached."""

    kind = problems.QUEUE_UNAVAILABLE


class DatabaseUnavailableError(UnavailableError):
    """The database cannot be reached."""

    kind = problems.DATABASE_UNAVAILABLE


def format_loc(loc: Sequence[Any]) -> str:
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
