"""The dashboard's routes: the page and everything it loads come from the gateway itself, with
the right types, under a Content-Security-Policy that allows no inline script. What the page
does in a browser is tested in tests/e2e (run by test_browser.py)."""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from quart import Quart

from app import create_app
from app.blueprints.dashboard import ASSETS, DASHBOARD_CSP, PAGE_DIRECTORY
from app.models import EngineInfo, MarketFeedInfo, SystemStatusData
from config import Config
from tests.helpers import running_gateway

STATIC = Path(__file__).resolve().parents[1] / "app" / "static"
# What dashboard.js takes from the TypeScript client's browser bundle.
CLIENT_EXPORTS = ["SigmaxWebSocket"]


@pytest.fixture
def app() -> Quart:
    return create_app(Config())


def page_urls(html: str) -> list[str]:
    """Every URL the page loads or links: src and href attributes."""
    return re.findall(r"""\b(?:src|href)=["']([^"']+)["']""", html)


def module_imports(script: str) -> list[str]:
    return re.findall(r"""^\s*import\b[^'"]*["']([^"']+)["']""", script, re.MULTILINE)


def external_urls(text: str) -> list[str]:
    """Anything a browser could fetch from another host: not the page's own host (the
    WebSocket's address), nor the SVG namespace, which is only a name."""
    found = re.findall(r"""(?:https?:)?//[^\s"'<>)`]+""", text)
    return [
        url
        for url in found
        if url != "http://www.w3.org/2000/svg" and not url.startswith("//${location.host}/")
    ]


def expected_type(url: str) -> str:
    suffix = Path(url.split("?", 1)[0]).suffix
    return {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}.get(
        suffix, "text/html"
    )


async def test_page_and_everything_it_loads_are_served_from_this_origin(app: Quart) -> None:
    client = app.test_client()
    response = await client.get("/dashboard")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = await response.get_data(as_text=True)
    assert external_urls(html) == []
    script = (PAGE_DIRECTORY / "dashboard.js").read_text()
    assert external_urls(script) == []
    loaded = [url for url in page_urls(html) if not url.startswith("/docs")]
    assert {"/dashboard/static/dashboard.js", "/dashboard/static/dashboard.css"} <= set(loaded)
    imports = module_imports(script)
    assert imports == ["/static/sigmax.js"], imports
    for url in [*loaded, *imports]:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = await client.get(url)
        assert asset.status_code == 200, url
        assert asset.mimetype == expected_type(url), url
    # The links to the docs lead somewhere.
    for url in page_urls(html):
        if url.startswith("/docs"):
            assert (await client.get(url)).status_code in (200, 302), url


async def test_page_runs_no_inline_script_and_loads_only_from_itself(app: Quart) -> None:
    client = app.test_client()
    response = await client.get("/dashboard")
    policy = response.headers["Content-Security-Policy"]
    assert policy == DASHBOARD_CSP
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["default-src"] == "'none'"
    for name in ("script-src", "style-src", "connect-src", "img-src"):
        assert directives[name] == "'self'", name
    assert "unsafe" not in policy and "http" not in policy
    html = await response.get_data(as_text=True)
    # What that policy would block must not be there: inline scripts, styles, handlers.
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []
    assert "<style" not in html and not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html)
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_script_never_parses_server_text_as_html() -> None:
    script = (PAGE_DIRECTORY / "dashboard.js").read_text()
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
    ):
        assert sink not in script, sink


def test_system_area_shows_the_engine_and_market_feed_of_system_status() -> None:
    """The facts read the fields the models declare (a rename fails here, not on screen), each
    tone the script gives a fact has its colour, and the page says what it does not know."""
    script = (PAGE_DIRECTORY / "dashboard.js").read_text()
    style = (PAGE_DIRECTORY / "dashboard.css").read_text()
    for field in ("engine", "market_feed"):
        assert field in SystemStatusData.model_fields, field
        assert f"data.{field}" in script, field
    for model in (EngineInfo, MarketFeedInfo):
        for name in model.model_fields:
            assert re.search(rf"\.{name}\b", script), f"{model.__name__}.{name}"
    assert "'remote'" in script
    for label in ("reachable", "unreachable", "live", "degraded", "unknown"):
        assert re.search(rf"[ '`]{label}['`]", script), label
    tones = set(re.findall(r"\btone: '([a-z]+)'", script))
    assert {"up", "down", "warn", "unknown"} <= tones, tones
    for tone in tones:
        assert f'dd[data-tone="{tone}"]' in style, tone


async def test_only_the_listed_assets_are_served(app: Quart) -> None:
    client = app.test_client()
    for name in ASSETS:
        assert (await client.get(f"/dashboard/static/{name}")).status_code == 200, name
    for name in ("index.html", "missing.js", "..%2Fdashboard.py", "%2E%2E"):
        assert (await client.get(f"/dashboard/static/{name}")).status_code == 404, name
    assert (await client.get("/dashboard/static/../blueprints/dashboard.py")).status_code == 404


def test_client_bundle_exports_what_the_dashboard_imports() -> None:
    bundle = STATIC / "sigmax.js"
    assert bundle.is_file(), (
        "app/static/sigmax.js (the TypeScript client's browser bundle) "
        "is missing: build it in client/typescript"
    )
    source = bundle.read_text()
    assert not re.search(r"""^\s*import\b""", source, re.MULTILINE), "the bundle must be whole"
    for name in CLIENT_EXPORTS:
        assert re.search(rf"export\s+(?:class|function|const)\s+{name}\b", source) or re.search(
            rf"export\s*\{{[^}}]*\b{name}\b", source
        ), name


async def test_served_by_hypercorn_with_types_a_browser_accepts() -> None:
    """Browsers refuse a module script without a JavaScript type (nosniff)."""
    async with running_gateway() as running:
        base = f"http://127.0.0.1:{running.port}"

        def fetch(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(base + path, timeout=5) as reply:
                    return reply.status, reply.headers["Content-Type"]
            except urllib.error.HTTPError as error:
                return error.code, error.headers["Content-Type"]

        for path, content_type in (
            ("/dashboard", "text/html"),
            ("/dashboard/static/dashboard.js", "text/javascript"),
            ("/dashboard/static/dashboard.css", "text/css"),
            ("/static/sigmax.js", "text/javascript"),
        ):
            status, served = await asyncio.to_thread(fetch, path)
            assert (status, served.split(";")[0]) == (200, content_type), path
