"""Screenshots of every dashboard page over the ``fimntk demo --dashboard`` data, for the README.

Starts ``fimntk serve`` on a fresh data directory, fills it with the demo's training run
(:func:`fimntk.client.dashboard_demo.fill`), signs in with Debian's chromium through
Playwright and writes one PNG per page to ``bench/out/ui/``::

    python -m bench.ui_screenshots
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fimntk.client import Client
from fimntk.client.dashboard_demo import fill
from fimntk.client.demo import local_server

OUT = Path(__file__).resolve().parent / "out" / "ui"
PAGES = (
    ("queue", "/ui"),
    ("runs", "/ui/runs?filter=rep+%3D+%27kfac%27"),
    ("dynamics", "/ui/dynamics?key=trace&group_by=labels.run%2Crep&filter=metric+%3D+%27fim%27"),
    ("dynamics-lambda-max", "/ui/dynamics?key=lambda_max&group_by=labels.run%2Crep"),
    ("spectrum", "/ui/spectrum?filter=rep+%3D+%27kfac%27+AND+labels.run+%3D+%27seed0%27"),
    ("ntk", "/ui/ntk"),
    ("layers", "/ui/layers"),
)


def main() -> None:
    """Fill a fresh local server and screenshot each page."""
    from playwright.sync_api import sync_playwright

    browser_path = shutil.which("chromium")
    if browser_path is None:
        raise SystemExit("ui_screenshots: install Debian's chromium (apt-get install chromium)")
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as data, local_server(Path(data)) as (url, key):
        with Client(url, key, timeout=600, progress=False) as client:
            fill(client)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{url}/ui/login")
            page.fill("#api_key", key)
            page.click("button[type=submit]")
            page.wait_for_url(f"{url}/ui")
            for name, path in PAGES:
                page.goto(url + path)
                page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)
                print(f"wrote {OUT / name}.png")
            browser.close()


if __name__ == "__main__":
    main()
