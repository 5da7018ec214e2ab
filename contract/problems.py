"""The catalogue of problem types: every RFC 7807 problem the API answers or a job ends with.

A problem document is ``{"type": "/problems/<slug>", "title", "status", "detail"}`` plus
``field`` when one field is at fault, and extension members. Each type is defined once here;
the server raises and builds them, the client maps them back to its exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProblemType:
    """One kind of problem: its slug (the last segment of ``type``), HTTP status and title."""

    slug: str
    status: int
    title: str

    @property
    def uri(self) -> str:
        """The ``type`` member: ``/problems/<slug>``."""
        return f"/problems/{self.slug}"


# -- refusals of a request ----------------------------------------------------------------------
BAD_REQUEST = ProblemType("bad-request", 400, "Bad request")
UNAUTHENTICATED = ProblemType("unauthenticated", 401, "Authentication required")
FORBIDDEN = ProblemType("forbidden", 403, "Forbidden")
NOT_FOUND = ProblemType("not-found", 404, "Not found")
METHOD_NOT_ALLOWED = ProblemType("method-not-allowed", 405, "Method not allowed")
CONFLICT = ProblemType("conflict", 409, "Conflict")
PAYLOAD_TOO_LARGE = ProblemType("payload-too-large", 413, "Payload too large")
INVALID_INPUT = ProblemType("invalid-input", 422, "Invalid input")
VALIDATION_ERROR = ProblemType("validation-error", 422, "Validation error")
TOO_MANY_JOBS = ProblemType("too-many-jobs", 429, "Too many jobs in flight")
INTERNAL_ERROR = ProblemType("internal-error", 500, "Internal error")
UNAVAILABLE = ProblemType("unavailable", 503, "Service unavailable")
QUEUE_UNAVAILABLE = ProblemType("queue-unavailable", 503, "Queue unavailable")
DATABASE_UNAVAILABLE = ProblemType("database-unavailable", 503, "Database unavailable")
STORAGE_FULL = ProblemType("storage-full", 507, "Storage full")
# -- how a job can fail -------------------------------------------------------------------------
UNSUPPORTED_OPERATION = ProblemType("unsupported-operation", 422, "Operation failed")
JOB_TIMEOUT = ProblemType("job-timeout", 408, "Job timed out")
OUT_OF_MEMORY = ProblemType("out-of-memory", 507, "Out of memory")
WORKER_LOST = ProblemType("worker-lost", 500, "Worker lost")
WORKER_SHUTDOWN = ProblemType("worker-shutdown", 503, "Worker shut down")
NO_WORKER = ProblemType("no-worker", 503, "No worker")
PROBE_MISMATCH = ProblemType(
    "probe-mismatch", 422, "The rebuilt model does not reproduce the probe outputs"
)

#: Every problem type, by slug.
PROBLEM_TYPES: dict[str, ProblemType] = {
    p.slug: p for p in list(globals().values()) if isinstance(p, ProblemType)
}


def problem(
    kind: ProblemType, detail: str, field: str | None = None, **extra: Any
) -> dict[str, Any]:
    """Build an RFC 7807 problem document.

    Args:
        kind: The problem type.
        detail: Explanation of this occurrence.
        field: Offending field (a dotted path such as ``operations[1].v``), if any.
        **extra: Extension members.

    Returns:
        The problem as a JSON-ready dict.
    """
    body: dict[str, Any] = {
        "type": kind.uri,
        "title": kind.title,
        "status": kind.status,
        "detail": detail,
    }
    if field is not None:
        body["field"] = field
    body.update(extra)
    return body
