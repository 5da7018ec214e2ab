"""``/ui``: the built-in dashboard, signed in with an API key.

The login form sets an HttpOnly, SameSite=Strict cookie holding the key (hashed and checked
like a bearer key on every page); an ``Authorization: Bearer`` header works too. Pages are
rendered here from the same queries as the API (:mod:`fimntk.core.storage.search`), with
charts as inline SVG; a Content-Security-Policy allows only this server's script and styles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from fimntk.core.errors import BadRequestError, InvalidInputError
from fimntk.core.storage.records import JobFilter, User
from fimntk.core.storage.search import SearchRow, parse_filter
from fimntk.service.auth import hash_key
from fimntk.service.deps import AppState, StateDep
from fimntk.service.routes.admin import build_status
from fimntk.service.ui import charts
from fimntk.service.ui.pages import (
    Html,
    error_box,
    esc,
    filter_form,
    layout,
    link,
    login_page,
    progress_bar,
    table,
)

router = APIRouter(prefix="/ui", include_in_schema=False)

#: The session cookie (the API key), and how long it lasts.
COOKIE = "fimntk_session"
COOKIE_MAX_AGE_S = 12 * 3600
_STATIC = Path(__file__).resolve().parent.parent / "ui" / "static"
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: Scalars shown as columns of the runs explorer, when present.
KEY_SCALARS = ("trace", "lambda_max", "lambda_min", "effective_rank", "norm", "vTMv")
#: Most jobs overlaid on the spectrum page or compared.
MAX_OVERLAID = 8

Filter = Annotated[str, Query(max_length=4000)]
JobIds = Annotated[list[str] | None, Query(max_length=MAX_OVERLAID)]


def _user(request: Request, state: AppState) -> User | None:
    """The user of the bearer header or of the session cookie; ``None`` when neither holds a
    known key."""
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else None
    key = key or request.cookies.get(COOKIE)
    if not key or len(key) > 512:
        return None
    return state.records.user_by_key_hash(hash_key(key))


def _page(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers={"Content-Security-Policy": _CSP})


def _to_login() -> RedirectResponse:
    return RedirectResponse("/ui/login", status_code=303)


def _render(state: AppState, user: User, title: str, path: str, body: Html) -> HTMLResponse:
    keys = [k for k, _ in state.search.label_keys(user)]
    return _page(layout(title, path, body, user.name, keys))


def _search(
    state: AppState, user: User, text: str, size: int = 100, token: str | None = None
) -> tuple[list[SearchRow], str | None, str | None]:
    """Rows of a search, the next page's token, and the problem of a bad filter or token."""
    try:
        rows, next_token = state.search.search(parse_filter(text), user, [], size, token)
    except (InvalidInputError, BadRequestError) as exc:
        return [], None, str(exc)
    return rows, next_token, None


# -- signing in -------------------------------------------------------------------------------


@router.get("/login")
def login_form() -> HTMLResponse:
    """The sign-in form."""
    return _page(login_page())


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the API key of the form and set the session cookie."""
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    key = (form.get("api_key") or [""])[0].strip()
    state: AppState = request.app.state.fimntk
    user = None
    if 0 < len(key) <= 512:
        user = await run_in_threadpool(state.records.user_by_key_hash, hash_key(key))
    if user is None:
        return _page(login_page("Unknown API key."), status=401)
    response = RedirectResponse("/ui", status_code=303)
    response.set_cookie(
        COOKIE,
        key,
        max_age=COOKIE_MAX_AGE_S,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
def logout() -> Response:
    """Forget the session cookie."""
    response = _to_login()
    response.delete_cookie(COOKIE, path="/ui")
    return response


@router.get("/static/{name}")
def static(name: Literal["ui.js", "ui.css"]) -> Response:
    """The dashboard's own script and style sheet."""
    media = "text/javascript" if name.endswith(".js") else "text/css"
    return Response((_STATIC / name).read_text(), media_type=media)


# -- pages ------------------------------------------------------------------------------------


@router.get("")
def queue_page(request: Request, state: StateDep) -> Response:
    """Queue and workers: jobs running (with progress), queued, recent failures."""
    user = _user(request, state)
    if user is None:
        return _to_login()
    owner = None if user.is_admin else user.id
    running, _ = state.records.list_jobs(JobFilter(owner_id=owner, status="running"), None, 50)
    queued, _ = state.records.list_jobs(JobFilter(owner_id=owner, status="queued"), None, 50)
    failed, _ = state.records.list_jobs(JobFilter(owner_id=owner, status="failed"), None, 10)
    status = build_status(state)
    live = [state.jobs.public(r) for r in running]
    parts = [
        Html('<section class="cards">'),
        _card("Queue depth", status.queue.depth if status.queue.reachable else "unreachable"),
        _card("Workers", len(status.workers)),
        _card("Running", len(running)),
        _card("Queued", len(queued)),
        Html("</section><h2>Running</h2>"),
        table(
            ["job", "owner", "metric", "rep", "stage", "progress", "labels"],
            [
                (
                    j.id,
                    j.owner,
                    j.metric,
                    j.representation,
                    j.progress.stage,
                    progress_bar(j.progress.done, j.progress.total),
                    _labels_text(j.labels),
                )
                for j in live
            ],
            "running",
        ),
        Html("<h2>Workers</h2>"),
        table(
            ["worker", "state", "job", "device", "jobs done", "last heartbeat"],
            [
                (w.name, w.state, w.job_id, w.device, w.jobs_done, w.last_heartbeat)
                for w in status.workers
            ],
            "workers",
        ),
        Html("<h2>Recent failures</h2>"),
        table(
            ["job", "metric", "rep", "finished", "error"],
            [
                (r.id, r.metric, r.representation, r.finished_at, (r.error or {}).get("detail"))
                for r in failed
            ],
            "failures",
        ),
    ]
    return _render(state, user, "Queue and workers", "/ui", Html("".join(parts)))


def _card(title: str, value: Any) -> Html:
    return Html(f'<div class="card"><div class="value">{esc(value)}</div>{esc(title)}</div>')


def _labels_text(labels: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


@router.get("/runs")
def runs_page(
    request: Request,
    state: StateDep,
    filter: Filter = "",
    page_token: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    """The runs explorer: a filter box, label columns, key scalars, a compare button."""
    user = _user(request, state)
    if user is None:
        return _to_login()
    rows, token, problem = _search(state, user, filter, 100, page_token)
    label_keys = sorted({k for r in rows for k in r.labels})
    scalar_keys = [k for k in KEY_SCALARS if any(k in r.scalars for r in rows)]
    headers: list[Any] = ["", "job", "status", "metric", "rep", "step"]
    headers += [f"labels.{k}" for k in label_keys] + scalar_keys
    body_rows = []
    for r in rows:
        check = Html(f'<input type="checkbox" name="ids" value="{esc(r.id)}" class="pick">')
        cells: list[Any] = [check, link("/ui/layers", r.id, id=r.id), r.status, r.metric]
        cells += [r.rep, r.step]
        cells += [r.labels.get(k) for k in label_keys] + [r.scalars.get(k) for k in scalar_keys]
        body_rows.append(cells)
    more = link("/ui/runs", "next page", filter=filter, page_token=token) if token else ""
    body = Html(
        f"{filter_form('/ui/runs', filter)}{error_box(problem)}"
        '<form method="get" action="/ui/compare" id="compare">'
        f'<p><button type="submit">Compare selected</button> {len(rows)} jobs</p>'
        f"{table(headers, body_rows, 'runs')}</form>{esc(more)}"
    )
    return _render(state, user, "Runs", "/ui/runs", body)


@router.get("/compare")
def compare_page(request: Request, state: StateDep, ids: JobIds = None) -> Response:
    """Several jobs side by side: labels, scalars, and their spectra overlaid."""
    user = _user(request, state)
    if user is None:
        return _to_login()
    rows = _rows_by_id(state, user, ids or [])
    keys = sorted({k for r in rows for k in r.scalars})
    labels = sorted({k for r in rows for k in r.labels})
    headers = ["", *(r.id[:10] for r in rows)]
    lines: list[list[Any]] = [["rep", *(r.rep for r in rows)], ["step", *(r.step for r in rows)]]
    lines += [[f"labels.{k}", *(r.labels.get(k) for r in rows)] for k in labels]
    lines += [[k, *(r.scalars.get(k) for r in rows)] for k in keys]
    body = Html(
        f"{table(headers, lines, 'compare')}<h2>Eigenvalues</h2>{_eigen_chart(state, rows)}"
    )
    return _render(state, user, "Compare", "/ui/runs", body)


def _rows_by_id(state: AppState, user: User, ids: list[str]) -> list[SearchRow]:
    """The visible jobs among ``ids`` (quoted as literals: never spliced unescaped)."""
    if not ids:
        return []
    quoted = ", ".join("'" + i.replace("'", "''") + "'" for i in ids[:MAX_OVERLAID])
    rows, _, _ = _search(state, user, f"id IN ({quoted})", MAX_OVERLAID)
    return rows


def _toggle(linear: str, log: str) -> Html:
    """A chart in linear and log scale, and the checkbox that switches them (ui.js)."""
    return Html(
        '<div class="scaled"><label><input type="checkbox" class="log-toggle"> log scale'
        f'</label><div class="linear">{linear}</div><div class="log" hidden>{log}</div></div>'
    )


@router.get("/dynamics")
def dynamics_page(
    request: Request,
    state: StateDep,
    key: Annotated[str, Query(max_length=64)] = "trace",
    group_by: Annotated[str, Query(max_length=400)] = "labels.run,rep",
    filter: Filter = "",
) -> Response:
    """A scalar against step, one line per group (run), with a log-scale toggle."""
    user = _user(request, state)
    if user is None:
        return _to_login()
    names = [n.strip() for n in group_by.split(",") if n.strip()][:8]
    problem = None
    lines: list[tuple[str, list[tuple[float, float | None]]]] = []
    try:
        series = state.search.series(parse_filter(filter), user, key, "step", names, 500)
        for s in series:
            name = " · ".join("—" if v is None else v for v in s.group.values()) or key
            lines.append((name, [(float(p[0]), p[1]) for p in s.points]))
    except InvalidInputError as exc:
        problem = str(exc)
    chart = _toggle(
        charts.line_chart(lines, x_label="step", y_label=key),
        charts.line_chart(lines, x_label="step", y_label=key, log_y=True),
    )
    form = Html(
        '<form class="filter" method="get" action="/ui/dynamics">'
        f'<label>scalar <input name="key" value="{esc(key)}" size="16"></label>'
        f'<label>group by <input name="group_by" value="{esc(group_by)}" size="20"></label>'
        f'<input type="text" name="filter" id="filter" value="{esc(filter)}" '
        'list="filter-names" placeholder="filter"><button type="submit">Show</button></form>'
    )
    body = Html(f"{form}{error_box(problem)}{chart}")
    return _render(state, user, f"{key} over training", "/ui/dynamics", body)


def _with_preview(
    state: AppState, user: User, ids: list[str], filter: str, kind: str, limit: int
) -> tuple[list[tuple[SearchRow, Any]], str | None]:
    """Jobs (by id, else the newest matching ``filter``) that have a ``kind`` preview."""
    if ids:
        rows, problem = _rows_by_id(state, user, ids), None
    else:
        text = " AND ".join(t for t in (filter, "status = 'succeeded'") if t)
        rows, _, problem = _search(state, user, text, 50)
    found = []
    for row in rows:
        data = state.records.preview(row.id, kind)
        if data is not None:
            found.append((row, data))
        if len(found) == limit:
            break
    return found, problem


def _name(row: SearchRow) -> str:
    run = row.labels.get("run") or row.id[:10]
    step = "" if row.step is None else f" @{row.step}"
    return f"{run} {row.rep or row.metric}{step}"


def _eigen_chart(state: AppState, rows: list[SearchRow]) -> Html:
    lines = []
    for row in rows:
        data = state.records.preview(row.id, "eigenvalues")
        if data is not None:
            lines.append((_name(row), [(float(i + 1), v) for i, v in enumerate(data["values"])]))
    return _toggle(
        charts.line_chart(lines, x_label="index", y_label="eigenvalue"),
        charts.line_chart(lines, x_label="index", y_label="eigenvalue", log_y=True),
    )


@router.get("/spectrum")
def spectrum_page(
    request: Request,
    state: StateDep,
    ids: JobIds = None,
    filter: Filter = "",
) -> Response:
    """Top-k eigenvalues and SLQ densities of several jobs overlaid."""
    user = _user(request, state)
    if user is None:
        return _to_login()
    ids = ids or []
    eigen, problem = _with_preview(state, user, ids, filter, "eigenvalues", MAX_OVERLAID)
    densities, _ = _with_preview(state, user, ids, filter, "spectral_density", MAX_OVERLAID)
    density_lines = [
        (_name(row), list(zip(data["grid"], data["density"], strict=True)))
        for row, data in densities
    ]
    density = _toggle(
        charts.line_chart(density_lines, x_label="eigenvalue", y_label="density"),
        charts.line_chart(density_lines, x_label="eigenvalue", y_label="density", log_y=True),
    )
    body = Html(
        f"{filter_form('/ui/spectrum', filter)}{error_box(problem)}<h2>Top eigenvalues</h2>"
        f"{_eigen_chart(state, [row for row, _ in eigen])}<h2>Spectral density (SLQ)</h2>"
        f"{density}"
    )
    return _render(state, user, "Spectrum", "/ui/spectrum", body)


@router.get("/ntk")
def ntk_page(
    request: Request,
    state: StateDep,
    id: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """An NTK Gram matrix as a heat-map, and the means of its class blocks."""
    user = _user(request, state)
    if user is None:
        return _to_login()
    found, _ = _with_preview(state, user, [id] if id else [], "metric = 'ntk'", "gram", 1)
    if not found:
        body = Html("<p>No NTK job with a Gram matrix (run one with the to_torch operation).</p>")
        return _render(state, user, "NTK", "/ui/ntk", body)
    row, gram = found[0]
    means = gram["class_block_means"]
    body = Html(
        f"<p>Job {esc(row.id)} · {esc(_labels_text(row.labels))} · step {esc(row.step)} · "
        f"{esc(gram['size'])}×{esc(gram['size'])} shown as {len(gram['cells'])}² cells</p>"
        f'<div class="pair"><div><h2>Gram matrix</h2>'
        f"{charts.heatmap(gram['cells'], title='NTK Gram matrix')}</div>"
        f"<div><h2>Class-block means</h2>{charts.heatmap(means, title='class-block means')}"
        f"{table(['class', *range(len(means))], [[i, *r] for i, r in enumerate(means)])}"
        "</div></div>"
    )
    return _render(state, user, "NTK", "/ui/ntk", body)


@router.get("/layers")
def layers_page(
    request: Request,
    state: StateDep,
    id: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """Each layer's share of the trace, and KFAC/EKFAC factor spectra."""
    user = _user(request, state)
    if user is None:
        return _to_login()
    found, _ = _with_preview(state, user, [id] if id else [], "", "layers", 1)
    if not found:
        body = Html("<p>No job with per-layer curvature (run a KFAC, EKFAC or diag job).</p>")
        return _render(state, user, "Layers", "/ui/layers", body)
    row, data = found[0]
    layers = data["layers"]
    total = sum(abs(entry["trace"] or 0.0) for entry in layers) or 1.0
    bars = [(entry["layer"], 100 * abs(entry["trace"] or 0.0) / total) for entry in layers]
    lines = [
        (f"{entry['layer']} {factor}", [(float(i + 1), v) for i, v in enumerate(entry[factor])])
        for entry in layers
        for factor in ("a", "g", "s")
        if factor in entry
    ]
    body = Html(
        f"<p>Job {esc(row.id)} · {esc(row.rep)} · {esc(_labels_text(row.labels))} · step "
        f"{esc(row.step)}</p><h2>Share of the trace</h2>{charts.bar_chart(bars, unit='%')}"
        "<h2>Factor spectra</h2>"
        f"{charts.line_chart(lines, x_label='index', y_label='eigenvalue', log_y=True)}"
    )
    return _render(state, user, "Per-layer curvature", "/ui/layers", body)
