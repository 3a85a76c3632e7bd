"""The documentation routes: the WebSocket API as an AsyncAPI 2.6 document (`/asyncapi.json`)
and as a readable page (`/docs/websocket`), and the files of the REST documentation UIs (served
from local assets, no CDN). What they say is built in app/apidocs from the code's own
vocabulary, so it cannot drift from what the gateway does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quart import Blueprint, Response, abort, current_app, redirect, request
from quart.helpers import send_from_directory
from quart.typing import ResponseReturnValue
from quart_schema import hide

from app.apidocs.asyncapi import asyncapi_document
from app.apidocs.protocol import ASSETS_PATH, ASYNCAPI_PATH, WEBSOCKET_PAGE_PATH, WS_PATH
from app.apidocs.ui import ASSET_MAX_AGE, MIMETYPES, PAGE_CSP
from app.apidocs.websocket_page import (
    commands_listing,
    render_websocket_page,
    websocket_page_context,
)
from app.engine_service import contract_document
from config import Config

ENGINE_CONTRACT_PATH = "/docs/engine"

docs_bp = Blueprint("docs", __name__)


# -- routes --------------------------------------------------------------------------------------


@docs_bp.get(ASYNCAPI_PATH)
@hide  # a document, like /openapi.json; the REST document links it
async def get_asyncapi() -> dict[str, Any]:
    """The WebSocket protocol as an AsyncAPI 2.6 document."""
    return asyncapi_document(request.host or None, request.scheme in ("https", "wss"))


@docs_bp.get(ENGINE_CONTRACT_PATH)
@hide  # the contract a remote engine serves (ENGINE_URL), not an operation of the gateway
async def get_engine_contract() -> dict[str, Any]:
    """The remote engine contract as an OpenAPI document, for engine authors."""
    return await contract_document()


@docs_bp.get("/docs/")
@hide
async def docs_with_a_slash() -> ResponseReturnValue:
    """`/docs/` is `/docs`, the REST documentation."""
    return redirect("/docs", 301)


@docs_bp.get(WEBSOCKET_PAGE_PATH)
@hide
async def websocket_page() -> Response:
    """The WebSocket protocol as a page to read."""
    config = current_app.config.get("SIGMAX")
    scheme = "wss" if request.scheme in ("https", "wss") else "ws"
    context = websocket_page_context(
        config if isinstance(config, Config) else Config(),
        f"{scheme}://{request.host}{WS_PATH}",
        commands_listing(),
    )
    response = Response(render_websocket_page(context), content_type="text/html; charset=utf-8")
    response.headers["Content-Security-Policy"] = PAGE_CSP
    return response


@docs_bp.get(f"{ASSETS_PATH}/<path:filename>")
@hide
async def docs_asset(filename: str) -> Response:
    """A file of a documentation UI; only the files listed in UIS are served."""
    assets: dict[str, tuple[Path, str]] = current_app.extensions.get("docs_assets") or {}
    found = assets.get(filename)
    if found is None:
        abort(404)
    directory, name = found
    response = await send_from_directory(directory, name, mimetype=MIMETYPES.get(Path(name).suffix))
    response.cache_control.public = True
    response.cache_control.max_age = ASSET_MAX_AGE
    return response
