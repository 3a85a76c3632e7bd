"""Documentation routes: the REST UIs work offline, the WebSocket page and the AsyncAPI document
describe the whole protocol from the code's own vocabulary."""

from __future__ import annotations

import re
from typing import Any

import pytest
from quart import Quart

from app import create_app
from app.apidocs import protocol as docs
from app.apidocs.ui import configure_docs, find_assets
from app.blueprints.ws import MESSAGE_TYPES
from app.services.commands import COMMANDS
from app.services.events import EVENT_TOPICS, TOPICS, CloseCode, ErrorCode
from config import Config

# Redoc and Scalar are served too when their asset packages are installed (optional); the
# project installs Swagger UI's only, and the others redirect to it.
UI_PAGES = ["/docs"]
ERROR_CODES = [v for k, v in vars(ErrorCode).items() if not k.startswith("_")]
CLOSE_CODES = [v for k, v in vars(CloseCode).items() if not k.startswith("_")]


@pytest.fixture
def app() -> Quart:
    return create_app(Config())


def local_urls(html: str) -> list[str]:
    """Every same-origin URL a page refers to (src, href, data-url, module imports...)."""
    return sorted(set(re.findall(r"""["'](/[^"'\s]*)["']""", html)))


def external_urls(text: str) -> list[str]:
    """http(s) and protocol-relative URLs: anything a browser could fetch from another host
    (the gateway's own ws:// address is not one)."""
    return re.findall(r"""(?<!ws:)(?<!wss:)(?:https?:)?//[^\s"'<>)]+""", text)


def expected_type(url: str) -> str:
    path = url.split("?", 1)[0]
    for suffix, content_type in (
        (".js", "text/javascript"),
        (".css", "text/css"),
        (".json", "application/json"),
    ):
        if path.endswith(suffix):
            return content_type
    return "text/html"


@pytest.mark.parametrize("page", UI_PAGES)
async def test_ui_pages_load_only_local_assets(app: Quart, page: str) -> None:
    client = app.test_client()
    response = await client.get(page)
    assert response.status_code == 200
    html = await response.get_data(as_text=True)
    assert external_urls(html) == []
    urls = local_urls(html)
    assert any(url.startswith("/docs/assets/") and ".js" in url for url in urls), urls
    for url in urls:
        asset = await client.get(url)
        assert asset.status_code == 200, url
        assert asset.mimetype == expected_type(url), url
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy
    assert external_urls(policy) == [] and "http" not in policy


async def test_quart_schema_config_points_to_local_assets(app: Quart) -> None:
    keys = ["QUART_SCHEMA_SWAGGER_JS_URL", "QUART_SCHEMA_SWAGGER_CSS_URL"]
    client = app.test_client()
    for key in keys:
        assert app.config[key].startswith("/docs/assets/"), key
        assert (await client.get(app.config[key])).status_code == 200, key


async def test_asset_route_serves_listed_files_only(app: Quart) -> None:
    client = app.test_client()
    bundle = await client.get("/docs/assets/swagger-ui/swagger-ui-bundle.js")
    assert bundle.status_code == 200
    assert "max-age" in bundle.headers["Cache-Control"]
    assert len(await bundle.get_data()) > 100_000
    for path in [
        "/docs/assets/swagger-ui/index.html",  # in the package, but not listed
        "/docs/assets/swagger-ui/../../../../config.py",
        "/docs/assets/%2e%2e/%2e%2e/config.py",
        "/docs/assets//etc/passwd",
        "/docs/assets/nothing.js",
    ]:
        response = await client.get(path, follow_redirects=True)
        assert response.status_code == 404, path


async def test_ui_without_its_package_redirects_to_an_offline_one() -> None:
    app = create_app(Config())
    swagger_only = {
        name: where for name, where in find_assets().items() if name.startswith("swagger-ui/")
    }
    configure_docs(app, swagger_only)
    client = app.test_client()
    for page in ["/redocs", "/scalar"]:
        response = await client.get(page)
        assert response.status_code == 302
        assert response.headers["Location"] == "/docs"
    html = await (await client.get("/docs")).get_data(as_text=True)
    assert external_urls(html) == []
    assert (await client.get("/docs/assets/redoc/redoc.standalone.js")).status_code == 404


async def test_configure_docs_twice_changes_nothing(app: Quart) -> None:
    configure_docs(app)
    client = app.test_client()
    for page in UI_PAGES:
        response = await client.get(page)
        assert response.status_code == 200
        assert len(response.headers.get_all("Content-Security-Policy")) == 1


async def test_rest_docs_link_the_websocket_docs(app: Quart) -> None:
    openapi = await (await app.test_client().get("/openapi.json")).get_json()
    assert "/docs/websocket" in openapi["info"]["description"]
    assert "/asyncapi.json" in openapi["info"]["description"]


async def websocket_page(app: Quart) -> str:
    response = await app.test_client().get("/docs/websocket")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    return await response.get_data(as_text=True)


async def test_websocket_page_names_the_whole_protocol(app: Quart) -> None:
    html = await websocket_page(app)
    for name in [*TOPICS, *MESSAGE_TYPES, *EVENT_TOPICS, *ERROR_CODES, *docs.REPLIES]:
        assert f"<code>{name}</code>" in html, name
    for code in CLOSE_CODES:
        assert f"<td>{code}</td>" in html, code
    for field in ["type", "data", "timestamp", "connection_id", "seq", "request_id", "since"]:
        assert f"<code>{field}</code>" in html, field
    for topic in TOPICS:
        assert f'id="topic-{topic}"' in html
    for section in ["Resume with", "Slow consumers", "Close codes", "Connection and auth"]:
        assert section in html
    assert 'href="/asyncapi.json"' in html and 'href="/docs"' in html
    assert "ws://localhost/api/ws" in html
    # Self-contained: no script, no stylesheet or image to fetch, no other host.
    assert external_urls(html) == []
    assert "<script" not in html and "<link" not in html and "<img" not in html


async def test_websocket_page_shows_configured_values(app: Quart) -> None:
    html = await websocket_page(app)
    config = app.config["SIGMAX"]
    assert f"every {config.WS_HEARTBEAT_INTERVAL} s" in html
    assert f"at most {config.WS_SEND_QUEUE_SIZE} frames" in html
    # The gateway's commands, from the registry the WebSocket protocol uses.
    for name in COMMANDS:
        assert f"<code>{name}</code>" in html, name


async def test_websocket_page_escapes_what_it_inserts(
    app: Quart, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(
        docs.ERROR_NOTES,
        ErrorCode.INVALID_TOPIC,
        '<img src=x onerror="alert(1)"> and `<b>code</b>`',
    )
    monkeypatch.setitem(docs.TOPIC_NOTES, "market", "</td><script>alert(2)</script>")
    response = await app.test_client().get(
        "/docs/websocket", headers={"Host": 'evil"><script>x</script>'}
    )
    html = await response.get_data(as_text=True)
    assert "<img" not in html and "<script" not in html and "<b>" not in html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html
    assert "<code>&lt;b&gt;code&lt;/b&gt;</code>" in html
    assert "&lt;/td&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in html


# -- AsyncAPI -----------------------------------------------------------------------------------


def walk(node: Any, path: str = "#") -> list[tuple[str, Any]]:
    """Every (path, value) under node."""
    found = [(path, node)]
    if isinstance(node, dict):
        for key, value in node.items():
            found += walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += walk(value, f"{path}/{index}")
    return found


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} points outside the document"
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


async def asyncapi(app: Quart) -> dict[str, Any]:
    response = await app.test_client().get("/asyncapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = await response.get_json()
    return document


async def test_asyncapi_refs_all_resolve_within_the_document(app: Quart) -> None:
    document = await asyncapi(app)
    refs = [
        value["$ref"] for _, value in walk(document) if isinstance(value, dict) and "$ref" in value
    ]
    assert len(refs) > 50
    for ref in refs:
        resolve(document, ref)
    # pydantic's local definitions were hoisted into the components.
    assert not [
        path for path, value in walk(document) if isinstance(value, dict) and "$defs" in value
    ]
    schemas = document["components"]["schemas"]
    assert schemas["PortfolioData"]["properties"]["positions"]["anyOf"][0]["items"] == {
        "$ref": "#/components/schemas/PositionData"
    }
    assert "PositionData" in schemas and "MarketEntry" in schemas


async def test_asyncapi_is_a_2_6_document_of_the_whole_protocol(app: Quart) -> None:
    document = await asyncapi(app)
    assert document["asyncapi"] == "2.6.0"
    assert {"title", "version", "description"} <= set(document["info"])
    channel = document["channels"]["/api/ws"]
    messages = document["components"]["messages"]
    sent = [resolve(document, m["$ref"]) for m in channel["publish"]["message"]["oneOf"]]
    received = [resolve(document, m["$ref"]) for m in channel["subscribe"]["message"]["oneOf"]]
    assert [m["name"] for m in sent] == list(MESSAGE_TYPES)
    assert {m["name"] for m in received} == set(docs.REPLIES) | set(EVENT_TOPICS)
    ids = [m["messageId"] for m in messages.values()]
    assert len(ids) == len(set(ids))
    for message in messages.values():
        assert "payload" in message and message["name"]
    for type_, topic in EVENT_TOPICS.items():
        assert messages[type_]["tags"] == [{"name": f"topic:{topic}"}]
        event = messages[type_]["payload"]["allOf"][1]["properties"]
        assert event["type"] == {"const": type_}
    for code in ERROR_CODES:
        assert code in document["info"]["description"]
    server = document["servers"]["gateway"]
    assert server["protocol"] == "ws" and server["url"] == "localhost"
    for requirement in server["security"]:
        for scheme in requirement:
            assert scheme in document["components"]["securitySchemes"]


async def test_openapi_summaries_are_sentences_and_everything_is_described(app: Quart) -> None:
    client = app.test_client()
    document = await (await client.get("/openapi.json")).get_json()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            where = f"{method} {path}"
            assert operation["summary"] and not operation["summary"].endswith(","), where
            for parameter in operation.get("parameters", ()):
                assert parameter.get("description"), (where, parameter["name"])
            for status, response in operation["responses"].items():
                assert response.get("description"), (where, status)
    reject = document["paths"]["/api/proposals/{proposal_id}/reject"]["post"]
    assert reject["requestBody"]["required"] is False
    slash = await client.get("/docs/")
    assert (slash.status_code, slash.headers["Location"]) == (301, "/docs")
