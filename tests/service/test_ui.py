"""The dashboard in a real headless browser (Debian's chromium driven by Playwright): sign in
with an API key, open every page over jobs run by a real worker, find the charts, see no
console error and no unescaped label. With ``FIMNTK_UI_SCREENSHOTS=<dir>`` the screenshots
go there (``bench/ui_screenshots.py`` writes ``bench/out/ui/``)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient

from tests.service.dashboard_data import HOSTILE, run_dashboard_jobs

pytestmark = pytest.mark.timeout(300)

#: Each page, and the chart elements that must be on it: (path, selector, least count).
PAGES = (
    ("/ui", "table.running", 1),
    ("/ui/runs?filter=labels.experiment+%3D+%27ui%27", "table.runs tbody tr", 13),
    ("/ui/dynamics?filter=labels.experiment+%3D+%27ui%27", "svg.chart .series", 4),
    ("/ui/spectrum?filter=labels.experiment+%3D+%27ui%27", "svg.chart circle", 8),
    ("/ui/ntk", "svg.heatmap rect.cell", 36 * 36),
    ("/ui/layers", "svg.bars rect.bar", 2),
)


def chromium() -> str:
    """Path of Debian's chromium; a missing browser fails the test (the UI must be tested)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: apt-get install chromium (make test does it)")
    return path


@pytest.fixture(scope="module")
def base_url(client: TestClient, users: dict[str, str], worker: Any) -> Iterator[str]:
    """The app of the session served over HTTP (the browser needs a socket), with jobs."""
    run_dashboard_jobs(client, users, "ui", ("run-a", "run-b"))
    config = uvicorn.Config(
        client.app, host="127.0.0.1", port=0, lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_pages_in_chromium(base_url: str, users: dict[str, str]) -> None:
    from playwright.sync_api import sync_playwright

    shots = (
        Path(os.environ.get("FIMNTK_UI_SCREENSHOTS", ""))
        if os.environ.get("FIMNTK_UI_SCREENSHOTS")
        else None
    )
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{base_url}/ui/runs")
        assert page.url.endswith("/ui/login")
        page.fill("#api_key", "not-a-key")
        page.click("button[type=submit]")
        assert "Unknown API key" in page.content()
        errors.clear()  # the browser logs the 401 of the refused key
        page.fill("#api_key", users["alice"])
        page.click("button[type=submit]")
        page.wait_for_url(f"{base_url}/ui")
        cookie = next(c for c in page.context.cookies() if c["name"] == "fimntk_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        for path, selector, least in PAGES:
            page.goto(base_url + path)
            count = page.locator(selector).count()
            assert count >= least, (path, selector, count)
            assert page.locator(".error").count() == 0, page.locator(".error").inner_text()
            if shots is not None:
                shots.mkdir(parents=True, exist_ok=True)
                name = path.split("?")[0].strip("/").replace("/", "-") or "ui"
                page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
        page.goto(base_url + PAGES[1][0])
        # the hostile label is shown as text, never parsed as markup
        assert page.locator("td", has_text=HOSTILE).count() >= 12
        assert page.locator("table.runs b").count() == 0
        page.locator("input.pick").nth(0).check()
        page.locator("input.pick").nth(1).check()
        page.click("#compare button")
        page.wait_for_url("**/ui/compare?**")
        assert page.locator("table.compare").count() == 1
        assert page.locator("svg.chart .series").count() == 2
        if shots is not None:
            page.screenshot(path=str(shots / "compare.png"), full_page=True)
        page.goto(base_url + PAGES[2][0])
        assert page.locator(".log").first.is_hidden()
        page.locator(".log-toggle").first.check()
        assert page.locator(".log").first.is_visible() and page.locator(".linear").first.is_hidden()
        page.click("text=Sign out")
        page.goto(f"{base_url}/ui")
        assert page.url.endswith("/ui/login")
        browser.close()
    assert errors == []


def test_bearer_header_and_escaping(
    client: TestClient, users: dict[str, str], base_url: str
) -> None:
    page = client.get(
        "/ui/runs",
        params={"filter": "labels.experiment = 'ui'"},
        headers={"Authorization": f"Bearer {users['alice']}"},
    )
    assert (
        page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    )
    assert HOSTILE not in page.text and "&lt;b&gt;x&lt;/b&gt;&#x27;; --" in page.text
    bad = client.get(
        "/ui/runs",
        params={"filter": "rep = <script>"},
        headers={"Authorization": f"Bearer {users['alice']}"},
    )
    assert "<script>" not in bad.text.split("</header>")[1].replace(
        '<script src="/ui/static/ui.js" defer></script>', ""
    )
    assert 'class="error"' in bad.text
    anonymous = client.get("/ui/runs", follow_redirects=False)
    assert anonymous.status_code == 303 and anonymous.headers["location"] == "/ui/login"
