"""Errors of the worker.

Hierarchy::

    WorkerError
    ├── JobInputError (ValueError)   a spec or blob that cannot be used; reported as 422
    ├── JobProblemError              a job that cannot run here, with its problem document
    └── JobCanceledError             the job was canceled while it ran

A :class:`JobInputError` names the spec field at fault, like the API's problems.
"""

from __future__ import annotations

from typing import Any

from fimntk.contract.problems import ProblemType, problem


class WorkerError(Exception):
    """Base of every error the worker raises on purpose."""


class JobInputError(WorkerError, ValueError):
    """A spec or blob that cannot be used, found only once the model or data is loaded.

    Args:
        detail: What is wrong.
        field: Spec field at fault.
    """

    def __init__(self, detail: str, field: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


class JobProblemError(WorkerError):
    """A job that cannot run on this worker (e.g. its representation does not fit in memory).

    Args:
        kind: Problem type.
        detail: What is wrong and what to do.
        field: Spec field at fault.
        **extensions: Extra members of the problem (bytes needed and available, ...).
    """

    def __init__(self, kind: ProblemType, detail: str, field: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.problem = problem(kind, detail, field, **extensions)


class JobCanceledError(WorkerError):
    """The job was canceled (stop command or cancel flag) while it ran."""
