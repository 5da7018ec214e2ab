"""Unknown query parameters are a 422, not silently ignored (``?op=trace`` filters nothing)."""

from __future__ import annotations

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from fimntk.core.errors import InvalidInputError


def reject_unknown_query(request: Request) -> None:
    """Refuse a query parameter the matched route does not declare.

    Raises:
        InvalidInputError: Naming the first unknown parameter (at most 40 characters of it).
    """
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    allowed = _query_names(route.dependant)
    for name in request.query_params:
        if name not in allowed:
            shown = name if len(name) <= 40 else name[:37] + "..."
            raise InvalidInputError(
                f"unknown query parameter; this route takes {sorted(allowed) or 'none'}",
                shown,
            )


def _query_names(dependant: Dependant) -> set[str]:
    """Query parameter names a route and its dependencies declare."""
    names: set[str] = set()
    todo = [dependant]
    while todo:
        current = todo.pop()
        names.update(param.alias for param in current.query_params)
        todo.extend(current.dependencies)
    return names
