"""/docs and /redoc work with no network beyond the host: their assets come from the installed
package (routes/docs.py), and a real headless Chromium (Debian's, driven by Playwright; no browser
downloaded) renders every operation while every request to another host is aborted and recorded.

``INITSERVE_SCREENSHOTS=docs`` keeps the screenshots there (docs/swagger-ui.png, docs/redoc.png).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from initserve.app import create_app
from initserve.routes.docs import ASSET_PATHS, asset
from initserve.settings import Settings

# Debian's Chromium (.ci/run installs it); INITSERVE_CHROMIUM names another build.
BROWSER = os.environ.get("INITSERVE_CHROMIUM") or shutil.which("chromium")
# What keeps a headless Chromium off the network on its own account, and working as root in CI.
BROWSER_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
async def client() -> Any:
    app = create_app(Settings(api_token="secret"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest.mark.anyio
async def test_pages_name_no_other_host(client: httpx.AsyncClient) -> None:
    """Every URL in both pages is a path on this server (the CDN's were absolute)."""
    for page in ("/docs", "/redoc"):
        html = (await client.get(page, headers={"Authorization": "Bearer secret"})).text
        urls = re.findall(r"""(?:src|href|url)\s*[=:(]\s*['"]([^'"]+)['"]""", html)
        assert urls and all(u.startswith("/") for u in urls), (page, urls)
        assert not re.search(r"https?://", html), (page, re.findall(r"https?://\S+", html))


@pytest.mark.anyio
async def test_assets_are_the_packages_bytes_and_open_without_the_token(
    client: httpx.AsyncClient,
) -> None:
    """The page's script, style and icon need no token (a browser sends none), as /docs does."""
    assert (await client.get("/docs")).status_code == 200
    for path in ASSET_PATHS:
        response = await client.get(path, headers={"Authorization": "Bearer secret"})
        assert response.status_code == 200 and response.content == asset(path.split("/")[-1])
        open_ = (await client.get(path)).status_code
        assert open_ == (401 if path.endswith("redoc.standalone.js") else 200), path
    assert (await client.get("/docs/other.js")).status_code == 401


@pytest.fixture
def browser() -> Iterator[Any]:
    if BROWSER is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium; .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=BROWSER, args=BROWSER_FLAGS)
        yield chromium
        chromium.close()


def open_offline(browser: Any, url: str) -> tuple[Any, list[str]]:
    """A page where every request to a host other than 127.0.0.1 is aborted, and recorded."""
    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    outside: list[str] = []

    def only_this_host(route: Any) -> None:
        request_url = route.request.url
        if request_url.startswith("data:") or urlsplit(request_url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(request_url)
            route.abort()

    page.route("**/*", only_this_host)
    page.goto(url)
    return page, outside


def screenshot_dir(tmp_path: Path) -> Path:
    return Path(os.environ.get("INITSERVE_SCREENSHOTS") or tmp_path)


def paths(live_server: str) -> set[str]:
    return set(httpx.get(f"{live_server}/openapi.json", timeout=30).json()["paths"])


def test_swagger_ui_renders_every_operation_offline(
    browser: Any, live_server: str, tmp_path: Path
) -> None:
    page, outside = open_offline(browser, f"{live_server}/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=60_000)
    shown = {text.strip() for text in page.locator(".opblock-summary-path").all_inner_texts()}
    assert {p.replace("\u200b", "") for p in shown} == paths(live_server)
    assert page.locator(".info .title").inner_text().startswith("initserve")
    page.screenshot(path=str(screenshot_dir(tmp_path) / "swagger-ui.png"))
    assert outside == []


def test_redoc_renders_every_operation_offline(
    browser: Any, live_server: str, tmp_path: Path
) -> None:
    page, outside = open_offline(browser, f"{live_server}/redoc")
    page.wait_for_selector("[data-section-id^='operation/']", timeout=60_000)
    sections = page.eval_on_selector_all(
        "[data-section-id^='operation/']", "found => found.map(e => e.dataset.sectionId)"
    )
    schema = httpx.get(f"{live_server}/openapi.json", timeout=30).json()
    ids = {op["operationId"] for methods in schema["paths"].values() for op in methods.values()}
    assert set(sections) == {f"operation/{operation_id}" for operation_id in ids}
    page.screenshot(path=str(screenshot_dir(tmp_path) / "redoc.png"))
    assert outside == []
