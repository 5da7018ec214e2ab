"""The OpenAPI document, with errors as they are sent: ``application/problem+json``.

FastAPI documents every error response as ``application/json`` (and 422 as its own
``HTTPValidationError``); the service answers every error with a :class:`Problem`. This module
rewrites the generated document once so that clients and contract tests see the truth, and
adds the errors any operation can meet (422 for a malformed request, 503 with ``Retry-After``
while Redis or the database is down).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from fimntk.contract.schemas import Problem

#: The ``responses=`` argument of a route: documented answers by status code.
Responses = dict[int | str, dict[str, Any]]

_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_COMMON = {
    "400": "Malformed request (unparsable body, cursor, or a digest that does not match).",
    "401": "Missing or unknown API key.",
    "422": "Invalid request: the 'field' member names the part at fault.",
    "503": "The queue or the database is unreachable; retry after 'Retry-After' seconds.",
}


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` return the rewritten document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problem_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def problem_openapi(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document with problem+json errors."""
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = document.setdefault("components", {}).setdefault("schemas", {})
    components.setdefault(
        "Problem", Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    )
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in document.get("paths", {}).items():
        if not path.startswith("/v1/"):  # probes and metrics answer in their own formats
            continue
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for code, description in _COMMON.items():
                responses.setdefault(code, {"description": description})
            if "503" in responses:
                responses["503"]["headers"] = {
                    "Retry-After": {
                        "description": "Seconds to wait before retrying.",
                        "schema": {"type": "integer"},
                    }
                }
            for code, response in responses.items():
                if code[:1] in ("4", "5"):
                    response["content"] = {"application/problem+json": {"schema": _PROBLEM_REF}}
    return document
