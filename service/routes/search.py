"""Queries across jobs for dashboards: search, CSV export, series, labels and previews.

Every query applies ownership (a user sees only their jobs; the admin sees all). Filters follow
the grammar of :mod:`fimntk.contract.filters`; a bad one is a 422 naming its position.
"""

from __future__ import annotations

import csv
import io
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from fimntk.contract.schemas import (
    MAX_SERIES_POINTS,
    LabelCount,
    LabelList,
    Problem,
    SearchPage,
    SearchRequest,
    SearchRow,
    SeriesLine,
    SeriesPublic,
)
from fimntk.contract.vocabulary import LABEL_KEY_PATTERN
from fimntk.core.errors import NotFoundError
from fimntk.core.storage import search as store
from fimntk.core.storage.search import parse_filter
from fimntk.service.deps import CurrentUser, StateDep
from fimntk.service.openapi import Responses

router = APIRouter(prefix="/v1", tags=["dashboards"])

_PROBLEMS: Responses = {
    400: {"model": Problem, "description": "Malformed page token."},
    401: {"model": Problem, "description": "Missing or unknown API key."},
    422: {"model": Problem, "description": "A bad filter (its position named) or field."},
}
#: Most rows of one CSV export.
MAX_EXPORT_ROWS = 10_000

Filter = Annotated[
    str,
    Query(max_length=4000, description="Filter, as in POST /v1/results:search."),
]


def _public(row: store.SearchRow) -> SearchRow:
    return SearchRow(**vars(row))


@router.post("/results:search", response_model=SearchPage, responses=_PROBLEMS)
def search_results(body: SearchRequest, state: StateDep, user: CurrentUser) -> SearchPage:
    """Jobs matching a filter, with their labels and scalars, a page at a time."""
    clauses = parse_filter(body.filter)
    rows, token = state.search.search(clauses, user, body.order_by, body.page_size, body.page_token)
    return SearchPage(items=[_public(r) for r in rows], next_page_token=token)


@router.get(
    "/results.csv",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}, "description": "One job a row."}, **_PROBLEMS},
)
def export_results(
    state: StateDep,
    user: CurrentUser,
    filter: Filter = "",
    limit: Annotated[int, Query(ge=1, le=MAX_EXPORT_ROWS)] = 1000,
) -> Response:
    """The jobs of a search as CSV: fields, then a ``labels.<key>`` and a ``scalars.<key>``
    column for every key present, newest first."""
    rows, _ = state.search.search(parse_filter(filter), user, [], limit, None)
    return Response(_csv(rows), media_type="text/csv")


def _csv(rows: list[store.SearchRow]) -> str:
    """CSV text of search rows; a cell that a spreadsheet would run as a formula is quoted
    with a leading apostrophe."""
    fields = ["id", "status", "owner", "metric", "rep", "variant", "model", "dataset", "n", "step"]
    fields += ["created_at", "finished_at"]
    labels = sorted({k for r in rows for k in r.labels})
    scalars = sorted({k for r in rows for k in r.scalars})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(fields + [f"labels.{k}" for k in labels] + [f"scalars.{k}" for k in scalars])
    for r in rows:
        cells: list[Any] = [getattr(r, f) for f in fields]
        cells += [r.labels.get(k) for k in labels] + [r.scalars.get(k) for k in scalars]
        writer.writerow([_cell(c) for c in cells])
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    if isinstance(value, str) and text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


@router.get("/series", response_model=None, responses=_PROBLEMS)
def get_series(
    state: StateDep,
    user: CurrentUser,
    key: Annotated[str, Query(pattern=LABEL_KEY_PATTERN, description="Scalar key.")],
    x: Literal["step", "created_at"] = "step",
    group_by: Annotated[
        str, Query(max_length=400, description="Comma-separated labels.<key> or fields.")
    ] = "",
    filter: Filter = "",
    format: Literal["series", "rows"] = "series",
    max_points: Annotated[int, Query(ge=2, le=MAX_SERIES_POINTS)] = 500,
) -> SeriesPublic | list[dict[str, Any]]:
    """A scalar against ``x``, one series per group, downsampled past ``max_points`` (bucket
    means). ``format=rows`` gives flat rows (``x``, ``y``, ``job_id`` and one column per
    group_by name) for Grafana's Infinity data source."""
    names = [n.strip() for n in group_by.split(",") if n.strip()][:8]
    lines = state.search.series(parse_filter(filter), user, key, x, names, max_points)
    if format == "rows":
        return [
            {**line.group, "x": px, "y": py, "job_id": job}
            for line in lines
            for px, py, job in line.points
        ]
    return SeriesPublic(
        key=key,
        x=x,
        series=[
            SeriesLine(
                group=line.group,
                name=" · ".join("—" if v is None else v for v in line.group.values()) or key,
                points=line.points,
            )
            for line in lines
        ],
    )


@router.get("/labels", response_model=LabelList, responses=_PROBLEMS)
def list_labels(state: StateDep, user: CurrentUser) -> LabelList:
    """Label keys on your jobs (all jobs for the admin), with how many jobs carry each."""
    return LabelList(items=[LabelCount(value=k, jobs=n) for k, n in state.search.label_keys(user)])


@router.get("/labels/{key}/values", response_model=LabelList, responses=_PROBLEMS)
def label_values(
    state: StateDep,
    user: CurrentUser,
    key: Annotated[str, Path(pattern=LABEL_KEY_PATTERN)],
    prefix: Annotated[str | None, Query(max_length=256)] = None,
) -> LabelList:
    """Values of one label on your jobs (those starting with ``prefix``), with counts."""
    values = state.search.label_values(user, key, prefix)
    return LabelList(items=[LabelCount(value=v, jobs=n) for v, n in values])


@router.get(
    "/jobs/{job_id}/previews/{kind}",
    responses={
        200: {"description": "The JSON preview.", "content": {"application/json": {}}},
        401: {"model": Problem, "description": "Missing or unknown API key."},
        404: {"model": Problem, "description": "No such job or preview, or another user's."},
        422: {"model": Problem, "description": "Unknown preview kind."},
    },
)
def get_preview(
    job_id: str,
    kind: Literal["eigenvalues", "spectral_density", "gram", "layers"],
    state: StateDep,
    user: CurrentUser,
) -> Any:
    """A bounded JSON preview of a succeeded job: ``eigenvalues`` (at most 512),
    ``spectral_density`` (grid and density), ``gram`` (an NTK Gram matrix averaged to at most
    64×64 cells, and its class-block means), ``layers`` (per-layer traces and factor spectra)."""
    state.jobs.get(job_id, user)
    data = state.records.preview(job_id, kind)
    if data is None:
        raise NotFoundError(f"job {job_id} has no {kind} preview", "kind")
    return data
