"""quart-schema's REST documentation UIs served from local assets (no CDN), under a strict
Content-Security-Policy; their own pages use app/templates/docs_ui.html."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from markupsafe import Markup
from quart import Quart, Response, current_app, redirect, url_for
from quart.typing import ResponseReturnValue
from quart_schema import hide
from quart_schema.openapi import ExternalDocumentation

from app.apidocs.protocol import ASSETS_PATH, ASYNCAPI_PATH, WEBSOCKET_PAGE_PATH, WS_PATH, log
from app.apidocs.websocket_page import _ENV

# -- REST documentation UIs from local assets -------------------------------------------------


@dataclass(frozen=True)
class UIAssets:
    """Where a documentation UI's files are in an installed package."""

    ui: str  # quart-schema's endpoint of the UI
    distribution: str  # the PyPI package shipping the files
    files: dict[str, str]  # public name under ASSETS_PATH -> path inside the package
    config_keys: dict[str, str]  # quart-schema config key -> public name


UIS: tuple[UIAssets, ...] = (
    UIAssets(
        "swagger_ui",
        "swagger-ui-bundle-v2",
        {
            "swagger-ui/swagger-ui-bundle.js": "swagger-ui-bundle.js",
            "swagger-ui/swagger-ui.css": "swagger-ui.css",
        },
        {
            "QUART_SCHEMA_SWAGGER_JS_URL": "swagger-ui/swagger-ui-bundle.js",
            "QUART_SCHEMA_SWAGGER_CSS_URL": "swagger-ui/swagger-ui.css",
        },
    ),
    UIAssets(
        "redoc_ui",
        "flask-openapi-redoc",
        {"redoc/redoc.standalone.js": "templates/redoc/js/redoc.standalone.js"},
        {"QUART_SCHEMA_REDOC_JS_URL": "redoc/redoc.standalone.js"},
    ),
    UIAssets(
        "scalar_ui",
        "flask-openapi-scalar",
        {"scalar/scalar.standalone.js": "templates/scalar/js/scalar.standalone.js"},
        {"QUART_SCHEMA_SCALAR_JS_URL": "scalar/scalar.standalone.js"},
    ),
)

# Scalar's defaults fetch fonts from its CDN and send telemetry: neither, here.
SCALAR_CONFIGURATION = {"withDefaultFonts": False, "telemetry": False}

MIMETYPES = {".js": "text/javascript", ".css": "text/css"}
ASSET_MAX_AGE = 24 * 3600


def _package_root(ui: UIAssets) -> Path | None:
    """The directory the UI's files are relative to, or None when the package is missing."""
    if ui.ui == "swagger_ui":
        try:
            from swagger_ui_bundle import swagger_ui_path
        except ImportError:
            return None
        return Path(str(swagger_ui_path))
    spec = importlib.util.find_spec(ui.distribution.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_assets(uis: Iterable[UIAssets] = UIS) -> dict[str, tuple[Path, str]]:
    """Public asset name -> (directory, file name) of every UI whose files are all installed."""
    found: dict[str, tuple[Path, str]] = {}
    for ui in uis:
        root = _package_root(ui)
        if root is None:
            continue
        files = {public: root / inside for public, inside in ui.files.items()}
        if all(path.is_file() for path in files.values()):
            found.update({public: (path.parent, path.name) for public, path in files.items()})
    return found


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "0"


def configure_docs(app: Quart, assets: dict[str, tuple[Path, str]] | None = None) -> None:
    """Make quart-schema's /docs, /redocs and /scalar load their scripts and styles from this
    gateway (`/docs/assets/...`) instead of a CDN, so that they work without internet access.

    A UI whose package is not installed redirects to one that is (it is never loaded from a
    CDN); only when no UI is installed are quart-schema's defaults left alone. The UI pages get
    a Content-Security-Policy that lets them load nothing from other hosts. Call after
    `QuartSchema(app, ...)`.
    """
    assets = find_assets() if assets is None else assets
    app.extensions["docs_assets"] = assets
    offline: list[str] = []
    for ui in UIS:
        if ui.ui not in app.view_functions:  # disabled in QuartSchema(...)
            continue
        if not all(public in assets for public in ui.files):
            log.debug(
                "%s is not installed: %s redirects to another documentation UI",
                ui.distribution,
                ui.ui,
            )
            continue
        version = _version(ui.distribution)
        for key, public in ui.config_keys.items():
            app.config[key] = f"{ASSETS_PATH}/{public}?v={version}"
        offline.append(ui.ui)
    if not offline:
        log.warning("no documentation UI package is installed: /docs loads from a CDN")
        return
    # quart-schema's pages load Redoc as a classic script, but Redoc 3 is an ES module, and
    # Redoc and Scalar send telemetry unless told not to: these two get pages of our own.
    own_pages: dict[str, Callable[..., Any]] = {"redoc_ui": _redoc_page, "scalar_ui": _scalar_page}
    for ui in UIS:
        view = app.view_functions.get(ui.ui)
        if view is None:
            continue
        if ui.ui not in offline:
            app.view_functions[ui.ui] = _redirect_to(offline[0])
        else:
            app.view_functions[ui.ui] = _self_contained(own_pages.get(ui.ui, view))
    _link_rest_docs(app)


# What a documentation UI page may load: its own origin only. Inline scripts and styles are
# what quart-schema's Swagger page and the UIs themselves use; blob: is for Redoc's workers.
UI_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
    "connect-src 'self'; worker-src 'self' blob:; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'self'"
)
# The WebSocket page runs no script and loads nothing.
PAGE_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'self'"
)


def _self_contained(view: Callable[..., Any]) -> Callable[..., Any]:
    """`view` with a Content-Security-Policy that keeps the page on this origin: nothing it
    loads (a logo, telemetry, fonts) can reach another host, online or not."""
    if getattr(view, "_offline_docs_page", False):  # configure_docs ran already
        return view

    @hide
    @functools.wraps(view)
    async def page(*args: Any, **kwargs: Any) -> ResponseReturnValue:
        response = await current_app.make_response(await view(*args, **kwargs))
        response.headers.setdefault("Content-Security-Policy", UI_CSP)
        return response

    page._offline_docs_page = True  # type: ignore[attr-defined]
    return page


def _redirect_to(endpoint: str) -> Callable[[], Any]:
    @hide
    async def redirect_to_offline_ui() -> Response:
        return redirect(url_for(endpoint))  # type: ignore[return-value]

    return redirect_to_offline_ui


def _schema_info() -> tuple[str, str]:
    extension = current_app.extensions["QUART_SCHEMA"]
    return extension.info.title, url_for("openapi")


def _js(value: Any) -> Markup:
    """`value` as a JavaScript literal that is safe inside a <script> element."""
    text = json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e")
    return Markup(text.replace("&", "\\u0026"))


UI_PAGE = _ENV.get_template("docs_ui.html")

# Redoc's options: no telemetry (it would report to Redocly's servers).
REDOC_OPTIONS = {"disableTelemetry": True}


async def _redoc_page() -> str:
    title, openapi_url = _schema_info()
    body = Markup(
        '<div id="redoc"></div>\n<script type="module">\n'
        "import {{ init }} from {};\n"
        'init({}, {}, document.getElementById("redoc"));\n</script>'
    ).format(
        _js(current_app.config["QUART_SCHEMA_REDOC_JS_URL"]), _js(openapi_url), _js(REDOC_OPTIONS)
    )
    return UI_PAGE.render(title=title, openapi_url=openapi_url, body=body)


async def _scalar_page() -> str:
    title, openapi_url = _schema_info()
    body = Markup(
        '<script id="api-reference" data-url="{}" data-configuration="{}"></script>\n'
        '<script src="{}"></script>'
    ).format(
        openapi_url,
        json.dumps(SCALAR_CONFIGURATION),
        current_app.config["QUART_SCHEMA_SCALAR_JS_URL"],
    )
    return UI_PAGE.render(title=title, openapi_url=openapi_url, body=body)


def _link_rest_docs(app: Quart) -> None:
    """Point the REST docs to the WebSocket docs, unless the app describes itself already."""
    extension = app.extensions.get("QUART_SCHEMA")
    if extension is None or extension.info is None:
        return
    if extension.info.description is None:
        extension.info.description = (
            f"The REST API of the SIGMAX Gateway. The WebSocket API (`{WS_PATH}`) is described "
            f"at [{WEBSOCKET_PAGE_PATH}]({WEBSOCKET_PAGE_PATH}) and, as AsyncAPI 2.6, at "
            f"[{ASYNCAPI_PATH}]({ASYNCAPI_PATH})."
        )
    if extension.external_docs is None:
        extension.external_docs = ExternalDocumentation(
            url=WEBSOCKET_PAGE_PATH, description="The WebSocket protocol"
        )
