"""Queries across jobs for dashboards: search, series, label names and values.

Filters arrive parsed (:mod:`fimntk.contract.filters`); each clause becomes a SQLAlchemy
expression whose literals are bound parameters, so no user text ever reaches the SQL string.
A clause on ``labels.<key>`` is an ``id IN (...)`` on the indexed ``job_labels`` rows, one on
``scalars.<key>`` an ``EXISTS`` on the indexed ``job_scalars`` rows; the rest compare columns
of ``jobs``. Ownership is one more clause, added by :class:`ResultSearch` to every query of a
user who is not the admin.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ColumnElement, exists, func, select
from sqlalchemy.engine import Engine

from fimntk.contract.filters import Clause, FilterError, check_name, parse
from fimntk.core.errors import BadRequestError, InvalidInputError
from fimntk.core.storage.records import JOBS, LabelRow, ScalarRecordRow, User, _aware

_LABELS = LabelRow.__table__
_SCALARS = ScalarRecordRow.__table__
#: Filter names of the columns of ``jobs``.
_COLUMNS = {
    "id": JOBS.c.id,
    "status": JOBS.c.status,
    "metric": JOBS.c.metric,
    "rep": JOBS.c.representation,
    "variant": JOBS.c.variant,
    "model": JOBS.c.model_digest,
    "dataset": JOBS.c.dataset,
    "step": JOBS.c.step,
    "n": JOBS.c.n,
    "created_at": JOBS.c.created_at,
    "finished_at": JOBS.c.finished_at,
}
#: Names a search may be ordered by (``-name`` for descending).
ORDER_NAMES = ("created_at", "finished_at", "step", "n", "id", "status", "metric", "rep")
#: Most jobs a series reads before downsampling.
MAX_SERIES_ROWS = 100_000
#: Most label keys and values listed.
MAX_LISTED = 1000


@dataclass
class SearchRow:
    """One job as a search returns it."""

    id: str
    status: str
    owner: str
    metric: str
    rep: str | None
    variant: str | None
    model: str
    dataset: str
    n: int | None
    step: int | None
    created_at: datetime | None
    finished_at: datetime | None
    labels: dict[str, str] = field(default_factory=dict)
    scalars: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Series:
    """One line of a chart: the group's values and its points ``(x, y, job id)``."""

    group: dict[str, str | None]
    points: list[tuple[float | str, float | None, str]]


def _compare(column: Any, op: str, values: Sequence[Any]) -> ColumnElement[bool]:
    if op == "IN":
        return column.in_(list(values))
    value = values[0]
    comparisons = {
        "=": column == value,
        "!=": column != value,
        "<": column < value,
        "<=": column <= value,
        ">": column > value,
        ">=": column >= value,
    }
    if op == "LIKE":
        return column.like(value)
    return comparisons[op]


def clause_expression(clause: Clause, sqlite: bool) -> ColumnElement[bool]:
    """The SQL condition of one clause on ``jobs`` (literals bound as parameters)."""
    values: list[Any] = list(clause.values)
    if clause.kind == "time":
        values = [_utc(v, sqlite) for v in values]
    # A label clause is selective (a run, an experiment): ``id IN (subquery)`` reads the
    # (key, value, job_id) index once. A scalar clause is often not (``trace > 0``): a lookup
    # per candidate job on (key, job_id) beats collecting every matching job first.
    if clause.kind == "label":
        return JOBS.c.id.in_(
            select(_LABELS.c.job_id).where(
                _LABELS.c.key == clause.key, _compare(_LABELS.c.value, clause.op, values)
            )
        )
    if clause.kind == "scalar":
        return exists().where(
            _SCALARS.c.key == clause.key,
            _SCALARS.c.job_id == JOBS.c.id,
            _SCALARS.c.layer.is_(None),
            _compare(_SCALARS.c.value, clause.op, values),
        )
    return _compare(_COLUMNS[clause.name], clause.op, values)


def _utc(value: Any, sqlite: bool) -> datetime:
    """A date-time in UTC: naive for SQLite (which stores naive UTC), aware otherwise."""
    assert isinstance(value, datetime)
    aware = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value
    aware = aware.astimezone(timezone.utc)
    return aware.replace(tzinfo=None) if sqlite else aware


def _encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def _decode_token(token: str) -> int:
    try:
        offset = json.loads(base64.urlsafe_b64decode(token.encode()))["offset"]
    except (ValueError, TypeError, KeyError, RecursionError):
        raise BadRequestError("malformed page_token", "page_token") from None
    if not isinstance(offset, int) or offset < 0:
        raise BadRequestError("malformed page_token", "page_token")
    return offset


def parse_filter(text: str, field_name: str = "filter") -> list[Clause]:
    """Parse a filter, as a 422 naming ``field_name`` and the position on error.

    Raises:
        InvalidInputError: A filter that does not parse.
    """
    try:
        return parse(text)
    except FilterError as exc:
        raise InvalidInputError(str(exc), field_name) from None


class ResultSearch:
    """Searches over the jobs, labels and scalars of a record database.

    Args:
        engine: The record store's SQLAlchemy engine.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"

    def _where(self, clauses: Sequence[Clause], user: User) -> list[ColumnElement[bool]]:
        conditions = [clause_expression(c, self.sqlite) for c in clauses]
        if not user.is_admin:
            conditions.append(JOBS.c.owner_id == user.id)
        return conditions

    def search(
        self,
        clauses: Sequence[Clause],
        user: User,
        order_by: Sequence[str],
        page_size: int,
        page_token: str | None,
    ) -> tuple[list[SearchRow], str | None]:
        """A page of jobs matching every clause, with their labels and scalars.

        Args:
            clauses: Parsed filter.
            user: The asking user (ownership applies unless admin).
            order_by: Names of :data:`ORDER_NAMES`, ``-`` first for descending; default
                newest first.
            page_size: Jobs per page.
            page_token: Token of the next page from an earlier answer.

        Returns:
            The rows and the next page's token (``None`` at the end).

        Raises:
            InvalidInputError: An unknown ``order_by`` name.
            BadRequestError: A malformed page token.
        """
        offset = 0 if page_token is None else _decode_token(page_token)
        query = select(*(JOBS.c[n] for n in _JOB_COLUMNS)).where(*self._where(clauses, user))
        query = query.order_by(*_ordering(order_by)).offset(offset).limit(page_size + 1)
        with self.engine.connect() as conn:
            jobs = [dict(r) for r in conn.execute(query).mappings()]
            more = len(jobs) > page_size
            jobs = jobs[:page_size]
            ids = [j["id"] for j in jobs]
            labels = conn.execute(
                select(_LABELS.c.job_id, _LABELS.c.key, _LABELS.c.value).where(
                    _LABELS.c.job_id.in_(ids)
                )
            ).all()
            scalars = conn.execute(
                select(_SCALARS.c.job_id, _SCALARS.c.key, _SCALARS.c.value).where(
                    _SCALARS.c.job_id.in_(ids), _SCALARS.c.layer.is_(None)
                )
            ).all()
        rows = {j["id"]: _row(j) for j in jobs}
        for job_id, key, value in labels:
            rows[job_id].labels[key] = value
        for job_id, key, value in scalars:
            rows[job_id].scalars[key] = value
        return list(rows.values()), (_encode_token(offset + page_size) if more else None)

    def series(
        self,
        clauses: Sequence[Clause],
        user: User,
        key: str,
        x: str,
        group_by: Sequence[str],
        max_points: int,
    ) -> list[Series]:
        """The scalar ``key`` of the matching jobs against ``x``, one series per group.

        Args:
            clauses: Parsed filter.
            user: The asking user.
            key: Scalar key (whole-model rows).
            x: ``step`` or ``created_at``; jobs without a step are left out for ``step``.
            group_by: Names (``labels.<key>`` or fields) whose values split the series.
            max_points: Most points per series; longer series are averaged in buckets.

        Raises:
            InvalidInputError: An unknown name in ``group_by`` or ``x``.
        """
        if x not in ("step", "created_at"):
            raise InvalidInputError("x must be 'step' or 'created_at'", "x")
        group_columns = []
        for i, name in enumerate(group_by):
            try:
                check_name(name)
            except FilterError:
                raise InvalidInputError(f"unknown group_by name {name!r}", "group_by") from None
            if name.startswith("scalars."):
                raise InvalidInputError("group_by takes labels and fields", "group_by")
            if name.startswith("labels."):
                label = _LABELS.alias(f"g{i}")
                group_columns.append(
                    select(label.c.value)
                    .where(label.c.job_id == JOBS.c.id, label.c.key == name.split(".", 1)[1])
                    .scalar_subquery()
                    .label(f"g{i}")
                )
            else:
                group_columns.append(_COLUMNS[name].label(f"g{i}"))
        x_column = _COLUMNS[x]
        query = (
            select(x_column.label("x"), _SCALARS.c.value, JOBS.c.id, *group_columns)
            .join(_SCALARS, _SCALARS.c.job_id == JOBS.c.id)
            .where(
                _SCALARS.c.key == key,
                _SCALARS.c.layer.is_(None),
                x_column.is_not(None),
                *self._where(clauses, user),
            )
            .order_by(x_column, JOBS.c.id)
            .limit(MAX_SERIES_ROWS)
        )
        groups: dict[tuple[Any, ...], Series] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                values = tuple(row[3:])
                series = groups.get(values)
                if series is None:
                    group = {n: _text(v) for n, v in zip(group_by, values, strict=True)}
                    series = groups[values] = Series(group, [])
                x_value = row[0]
                if isinstance(x_value, datetime):
                    x_value = _aware(x_value).isoformat()  # type: ignore[union-attr]
                series.points.append((x_value, row[1], row[2]))
        for series in groups.values():
            series.points = downsample(series.points, max_points)
        return list(groups.values())

    def label_keys(self, user: User) -> list[tuple[str, int]]:
        """Label keys on the user's jobs, with how many jobs carry each."""
        query = select(_LABELS.c.key, func.count()).group_by(_LABELS.c.key).order_by(_LABELS.c.key)
        if not user.is_admin:
            query = query.where(_owned_by(user))
        with self.engine.connect() as conn:
            return [(k, int(n)) for k, n in conn.execute(query.limit(MAX_LISTED))]

    def label_values(self, user: User, key: str, prefix: str | None) -> list[tuple[str, int]]:
        """Values of label ``key`` on the user's jobs (starting with ``prefix``), with counts."""
        query = (
            select(_LABELS.c.value, func.count())
            .where(_LABELS.c.key == key)
            .group_by(_LABELS.c.value)
            .order_by(_LABELS.c.value)
        )
        if prefix:
            escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            query = query.where(_LABELS.c.value.like(escaped + "%", escape="\\"))
        if not user.is_admin:
            query = query.where(_owned_by(user))
        with self.engine.connect() as conn:
            return [(v, int(n)) for v, n in conn.execute(query.limit(MAX_LISTED))]


def _owned_by(user: User) -> ColumnElement[bool]:
    """The label row belongs to a job of ``user``."""
    return exists().where(JOBS.c.id == _LABELS.c.job_id, JOBS.c.owner_id == user.id)


_JOB_COLUMNS = (
    "id",
    "status",
    "owner_id",
    "metric",
    "representation",
    "variant",
    "model_digest",
    "dataset",
    "n",
    "step",
    "created_at",
    "finished_at",
)


def _row(job: dict[str, Any]) -> SearchRow:
    return SearchRow(
        id=job["id"],
        status=job["status"],
        owner=job["owner_id"],
        metric=job["metric"],
        rep=job["representation"],
        variant=job["variant"],
        model=job["model_digest"],
        dataset=job["dataset"],
        n=job["n"],
        step=job["step"],
        created_at=_aware(job["created_at"]),
        finished_at=_aware(job["finished_at"]),
    )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _ordering(order_by: Sequence[str]) -> list[Any]:
    terms: list[Any] = []
    for name in order_by:
        bare = name.removeprefix("-")
        if bare not in ORDER_NAMES:
            raise InvalidInputError(
                f"cannot order by {name!r}; use {list(ORDER_NAMES)} ('-' first: descending)",
                "order_by",
            )
        column = _COLUMNS[bare]
        terms.append(column.desc() if name.startswith("-") else column.asc())
    if not terms:
        terms.append(JOBS.c.created_at.desc())
    terms.append(JOBS.c.id.desc())
    return terms


def downsample(
    points: list[tuple[Any, float | None, str]], max_points: int
) -> list[tuple[Any, float | None, str]]:
    """At most ``max_points`` points: past it, consecutive buckets of points become one point
    (the first x and job of the bucket, the mean of its finite y values).

    >>> len(downsample([(i, float(i), "j") for i in range(1000)], 100))
    100
    """
    if len(points) <= max_points:
        return points
    out = []
    for b in range(max_points):
        bucket = points[b * len(points) // max_points : (b + 1) * len(points) // max_points]
        ys = [p[1] for p in bucket if p[1] is not None]
        out.append((bucket[0][0], sum(ys) / len(ys) if ys else None, bucket[0][2]))
    return out
