"""Errors of the worker.

Hierarchy::

    WorkerError
    ├── JobInputError (ValueError)   a spec or blob that cannot be used; reported as 422
    └── JobCanceledError             the job was canceled while it ran

A :class:`JobInputError` names the spec field at fault, like the API's problems.
"""

from __future__ import annotations


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


class JobCanceledError(WorkerError):
    """The job was canceled (stop command or cancel flag) while it ran."""
