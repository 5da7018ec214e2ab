"""Errors of the client. Every HTTP or transport failure is translated here, in one place
(:func:`error_from_response`, :func:`unreachable`), so callers never see a bare ``httpx`` error.

Hierarchy::

    ClientError
    ├── ConfigurationError (ValueError)          no server URL or API key
    ├── ModelNotSupportedError (TypeError)       a model the client cannot describe; says how
    │                                            to register it
    ├── DataError (ValueError)                   a loader or tensors that cannot be shipped
    ├── ServerUnreachableError (ConnectionError) no answer after the retries
    ├── JobTimeoutError (TimeoutError)           a job still running past the client's timeout
    └── APIError                                 the server answered with a problem document
        ├── InvalidInputError (ValueError)       400, 422: a field at fault
        ├── AuthenticationError                  401
        ├── PermissionDeniedError                403
        ├── NotFoundError (LookupError)          404
        ├── ConflictError                        409
        ├── PayloadTooLargeError                 413
        ├── TooManyJobsError                     429
        ├── ServiceUnavailableError              503 (after the retries)
        ├── JobFailedError                       a job ended ``failed``: the worker's problem
        └── JobCanceledError                     a job ended ``canceled``

An :class:`APIError` carries the RFC 7807 problem: ``status``, ``title``, ``detail``, ``field``
(the dotted path of the field at fault, e.g. ``operations[0].v``) and the whole ``problem``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import httpx


class ClientError(Exception):
    """Base of every error this package raises."""


class ConfigurationError(ClientError, ValueError):
    """The server URL or the API key is missing or malformed."""


class ModelNotSupportedError(ClientError, TypeError):
    """A model whose architecture the client cannot describe to the server."""


class DataError(ClientError, ValueError):
    """A loader, tensors or vector that cannot be shipped."""


class ServerUnreachableError(ClientError, ConnectionError):
    """The server did not answer (connection refused, timeout...) after the retries."""


class JobTimeoutError(ClientError, TimeoutError):
    """A job did not finish within the client's timeout.

    Attributes:
        job_id: The job.
    """

    def __init__(self, message: str, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class APIError(ClientError):
    """The server refused a request or a job failed; carries the problem document.

    Attributes:
        status: HTTP status (or the job problem's status).
        title: Short summary of the problem type.
        detail: Explanation of this occurrence.
        field: Dotted path of the field at fault, if any.
        problem: The whole problem document.
    """

    status_code: ClassVar[int | None] = None

    def __init__(self, problem: dict[str, Any]) -> None:
        self.problem = problem
        self.status = int(problem.get("status") or 0)
        self.title = str(problem.get("title") or "Error")
        self.detail = str(problem.get("detail") or self.title)
        self.field: str | None = problem.get("field")
        super().__init__(self._message())

    def _message(self) -> str:
        where = f" [field: {self.field}]" if self.field else ""
        return f"{self.title} ({self.status}): {self.detail}{where}"


class InvalidInputError(APIError, ValueError):
    """400 or 422: a request or spec the server cannot use; ``field`` names the culprit."""


class AuthenticationError(APIError):
    """401: missing or unknown API key."""


class PermissionDeniedError(APIError):
    """403: an admin-only action."""


class NotFoundError(APIError, LookupError):
    """404: unknown object, or another user's."""


class ConflictError(APIError):
    """409: the object is not in a state that allows the request."""


class PayloadTooLargeError(APIError):
    """413: an upload past the server's cap."""


class TooManyJobsError(APIError):
    """429: too many of your jobs are queued or running."""


class ServiceUnavailableError(APIError):
    """503: the server's queue or database stayed unavailable through the retries."""


class JobFailedError(APIError):
    """A job ended ``failed``; the problem is the worker's (e.g. 422 weights mismatch, 507 out
    of memory).

    Attributes:
        job_id: The job.
    """

    def __init__(self, problem: dict[str, Any], job_id: str) -> None:
        self.job_id = job_id
        super().__init__(problem)

    def _message(self) -> str:
        return f"job {self.job_id} failed: {super()._message()}"


class JobCanceledError(APIError):
    """A job ended ``canceled`` (by you, another client, or an admin).

    Attributes:
        job_id: The job.
    """

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(
            {"status": 409, "title": "Job canceled", "detail": f"job {job_id} was canceled"}
        )


_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidInputError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: InvalidInputError,
    429: TooManyJobsError,
    503: ServiceUnavailableError,
}


def error_from_response(response: httpx.Response) -> APIError:
    """The exception for an error response (problem+json when the server sent one).

    Args:
        response: A response with status >= 400, already read.
    """
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or "detail" not in body:
        text = response.text.strip()[:500] or response.reason_phrase
        body = {
            "status": response.status_code,
            "title": response.reason_phrase or "Error",
            "detail": text,
        }
    elif not isinstance(body["detail"], str):  # a framework error, not a problem document
        body = {
            "status": response.status_code,
            "title": response.reason_phrase or "Error",
            "detail": str(body["detail"]),
        }
    body.setdefault("status", response.status_code)
    cls = _BY_STATUS.get(response.status_code, APIError)
    return cls(body)


def unreachable(url: str, attempts: int, exc: httpx.TransportError) -> ServerUnreachableError:
    """The error for a server that did not answer ``attempts`` times."""
    reason = str(exc) or type(exc).__name__
    return ServerUnreachableError(
        f"cannot reach the fimntk server at {url} after {attempts} attempt"
        f"{'s' if attempts != 1 else ''} ({type(exc).__name__}: {reason}). Is it running "
        f"('fimntk serve'), and are the URL (--url, FIMNTK_URL) and network right?"
    )
