"""HTML of the dashboard's pages, escaped by construction.

Text is escaped unless it is :class:`Html` (markup built here from escaped parts): labels and
every other value a user chose go into pages only through :func:`esc`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape
from typing import Any
from urllib.parse import urlencode

from fimntk.service.ui.charts import number

#: The pages, in the order of the navigation bar: (path, title).
NAV = (
    ("/ui", "Queue"),
    ("/ui/runs", "Runs"),
    ("/ui/dynamics", "Dynamics"),
    ("/ui/spectrum", "Spectrum"),
    ("/ui/ntk", "NTK"),
    ("/ui/layers", "Layers"),
)


class Html(str):
    """Markup that is already safe (built from escaped parts)."""


def esc(value: Any) -> Html:
    """``value`` as safe HTML: markup unchanged, numbers formatted, anything else escaped."""
    if isinstance(value, Html):
        return value
    if value is None:
        return Html("")
    if isinstance(value, float):
        return Html(number(value))
    return Html(escape(str(value), quote=True))


def link(path: str, text: Any, **params: Any) -> Html:
    """A link to a dashboard page with query parameters (URL-encoded, then escaped)."""
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")}, doseq=True)
    href = f"{path}?{query}" if query else path
    return Html(f'<a href="{escape(href, quote=True)}">{esc(text)}</a>')


def table(headers: Sequence[Any], rows: Iterable[Sequence[Any]], css_class: str = "") -> Html:
    """An HTML table; every cell escaped unless it is :class:`Html`."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return Html(
        f'<table class="{esc(css_class)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )


def filter_form(path: str, filter_text: str, hidden: dict[str, Any] | None = None) -> Html:
    """The filter box (same grammar as the API) of a page."""
    fields = "".join(
        f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">'
        for k, v in (hidden or {}).items()
        if v not in (None, "")
    )
    return Html(
        f'<form class="filter" method="get" action="{esc(path)}">{fields}'
        f'<input type="text" name="filter" id="filter" value="{esc(filter_text)}" '
        "placeholder=\"labels.run = 'seed0' AND rep IN ('kfac','ekfac') AND step >= 1000\" "
        'list="filter-names" autocomplete="off"><button type="submit">Filter</button></form>'
    )


def error_box(message: str | None) -> Html:
    """A problem shown above a page's content (nothing when ``None``)."""
    return Html("" if message is None else f'<p class="error">{esc(message)}</p>')


def layout(
    title: str, active: str, body: Html, user_name: str, label_keys: Sequence[str] = ()
) -> str:
    """A whole page: navigation, the signed-in user, the body, the script."""
    nav = "".join(
        f'<a href="{p}" class="{"active" if p == active else ""}">{t}</a>' for p, t in NAV
    )
    names = ["rep", "metric", "variant", "status", "step", "created_at", "model", "dataset"]
    names += [f"labels.{k}" for k in label_keys]
    options = "".join(f'<option value="{esc(n)}">' for n in names)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)} · fimntk</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,"><link rel="stylesheet" href="/ui/static/ui.css">'
        "</head><body>"
        f'<header><span class="brand">fimntk</span><nav>{nav}</nav>'
        f'<span class="user">{esc(user_name)} · <form method="post" action="/ui/logout" '
        'class="inline"><button type="submit">Sign out</button></form></span></header>'
        f"<main><h1>{esc(title)}</h1>{body}</main>"
        f'<datalist id="filter-names">{options}</datalist>'
        '<script src="/ui/static/ui.js" defer></script></body></html>'
    )


def login_page(message: str | None = None) -> str:
    """The sign-in form (an API key)."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>Sign in · fimntk</title>"
        '<link rel="icon" href="data:,"><link rel="stylesheet" href="/ui/static/ui.css">'
        '</head><body class="login">'
        '<form method="post" action="/ui/login" class="login"><h1>fimntk dashboard</h1>'
        f"{error_box(message)}"
        '<label for="api_key">API key</label>'
        '<input type="password" id="api_key" name="api_key" autocomplete="current-password" '
        'required><button type="submit">Sign in</button></form></body></html>'
    )


def progress_bar(done: int | None, total: int | None) -> Html:
    """A progress bar of ``done`` out of ``total`` (empty when the total is unknown)."""
    share = (done or 0) / total if total else 0.0
    text = f"{done or 0}/{total}" if total else "—"
    return Html(
        f'<span class="progress"><span style="width:{100 * min(share, 1.0):.0f}%"></span>'
        f"</span> {esc(text)}"
    )
