"""The live dashboard: one page (`/dashboard`) that shows prices, analyses, proposals with
approve and reject buttons, executions, the portfolio and the system's health as they happen.

Plain HTML, CSS and an ES module from `app/dashboard/`, on top of the TypeScript client's browser
bundle (`/static/sigmax.js`, the app's static folder): everything comes from this gateway, so
the page works without internet access, and its Content-Security-Policy lets it load nothing
from anywhere else and run no inline script.
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response, abort
from quart.helpers import send_from_directory
from quart_schema import hide

dashboard_bp = Blueprint("dashboard", __name__)

PAGE_DIRECTORY = Path(__file__).resolve().parents[1] / "dashboard"
ASSETS_PATH = "/dashboard/static"
# The files served under ASSETS_PATH, with their types; nothing else in the folder is.
ASSETS = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
    "favicon.svg": "image/svg+xml",
}

# Scripts, styles and images from this origin only (no inline script or style), and network
# access to this origin only: REST, and the WebSocket (CSP3 'self' covers ws:// to the same host).
DASHBOARD_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


@dashboard_bp.get("/dashboard")
@hide
async def dashboard_page() -> Response:
    """The live dashboard."""
    return await _send("index.html", "text/html; charset=utf-8")


@dashboard_bp.get(f"{ASSETS_PATH}/<name>")
@hide
async def dashboard_asset(name: str) -> Response:
    """A script, style sheet or icon of the dashboard."""
    if name not in ASSETS:
        abort(404)
    return await _send(name, ASSETS[name])


async def _send(name: str, mimetype: str) -> Response:
    response = await send_from_directory(PAGE_DIRECTORY, name, mimetype=mimetype)
    response.headers["Content-Security-Policy"] = DASHBOARD_CSP
    # Revalidated on every load (ETag): a new version of the gateway is never mixed with the
    # previous one's cached script.
    response.headers["Cache-Control"] = "no-cache"
    return response
