"""Protocol docs: the WebSocket API as an AsyncAPI 2.6 document and as a readable page, and the
REST documentation UIs of quart-schema served from local assets (no CDN).

quart-schema documents REST only; the WebSocket protocol is described here from the code's own
vocabulary (the models, TOPICS, EVENT_TOPICS, ErrorCode, CloseCode, the handled message types),
so `/asyncapi.json` and `/docs/websocket` cannot drift from what the gateway does.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from jinja2 import Environment, StrictUndefined
from markupsafe import Markup, escape
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode
from quart import Blueprint, Quart, Response, abort, current_app, redirect, request, url_for
from quart.helpers import send_from_directory
from quart.typing import ResponseReturnValue
from quart_schema import hide
from quart_schema.openapi import ExternalDocumentation

from app.blueprints.ws import MESSAGE_TYPES
from app.models import (
    EVENT_DATA_MODELS,
    ClientMessage,
    CommandData,
    CommandResultData,
    ConnectedData,
    ErrorData,
    ServerEvent,
    StreamResetData,
    SubscribedData,
    SubscriptionData,
    SubscriptionsData,
)
from app.services.commands import COMMANDS
from app.services.events import (
    CONFLATABLE_TYPES,
    EVENT_TOPICS,
    PER_SYMBOL_LIST_TYPES,
    SERVER_VERSION,
    TOPICS,
    CloseCode,
    ErrorCode,
)
from config import Config

log = logging.getLogger(__name__)

docs_bp = Blueprint("docs", __name__)

WS_PATH = "/api/ws"
ASYNCAPI_PATH = "/asyncapi.json"
WEBSOCKET_PAGE_PATH = "/docs/websocket"
ASSETS_PATH = "/docs/assets"

# -- the protocol's prose: keyed by the code's vocabulary, which decides what is listed ----------

CLIENT_MESSAGES: dict[str, tuple[str, type[BaseModel] | None]] = {
    "subscribe": ("Add topics and symbols to the subscription; with `since`, first replay the "
                  "missed events. Answered by `subscribed`.", SubscriptionData),
    "unsubscribe": ("Remove topics and symbols. Answered by `unsubscribed`.", SubscriptionData),
    "ping": ("Keep-alive. Answered by `pong`.", None),
    "pong": ("Answer to the server's `ping`. No reply.", None),
    "command": ("Run a gateway command (see Commands). Answered by `command_result`.",
                CommandData),
    "get_status": ("Answered by a `system_status` message.", None),
    "get_subscriptions": ("Answered by `subscriptions`.", None),
}

REPLIES: dict[str, tuple[str, type[BaseModel] | None]] = {
    "connected": ("Sent first on every connection", ConnectedData),
    "subscribed": ("Reply to subscribe; with `since`, says recovered and replayed", SubscribedData),
    "unsubscribed": ("Reply to unsubscribe", SubscribedData),
    "subscriptions": ("Reply to get_subscriptions", SubscriptionsData),
    "command_result": ("Reply to command", CommandResultData),
    "pong": ("Reply to ping", None),
    "ping": ("Server heartbeat every WS_HEARTBEAT_INTERVAL seconds; answer with `pong` (or any "
             "message)", None),
    "error": ("A message could not be processed, or the server is about to close", ErrorData),
    "stream_reset": ("Redis lost the event stream and the worker moved to a new one, to every "
                     "connection: resume with its `stream_id` from now on", StreamResetData),
}

ALSO_DIRECT = {  # stream event types also sent to one connection only, without `seq`
    "system_status": "it answers `get_status` and follows `connected`",
    "status_change": "the worker's own notices (shutting down, event stream degraded or "
                     "reconnected)",
    "portfolio_update": "it answers the `get_portfolio` command",
    "health_update": "it answers the `get_health` command",
}

ENVELOPE_NOTES: dict[str, str] = {
    "type": "The message type.",
    "data": "The payload; its shape depends on `type`.",
    "timestamp": "When the server made the message: UTC, ISO 8601 with milliseconds and `Z`.",
    "connection_id": "The recipient's connection id on direct replies; `null` on stream events.",
    "seq": "Stream events only: the event's place in the deployment-wide stream, one more for "
           "each event published. Keep the last one to resume with `since`.",
    "request_id": "Direct replies only: the `request_id` of the client message answered, when "
                  "it had one (also on an `error` about that message).",
}

CLIENT_ENVELOPE_NOTES: dict[str, str] = {
    "type": "One of the client message types below.",
    "data": "An object; its fields depend on `type`. May be left out when there are none.",
    "request_id": "Optional string or integer, echoed in the reply (or `error`) to this message.",
}

FIELD_NOTES: dict[tuple[str, str], str] = {
    ("SubscriptionData", "topics"): "Topics; a `symbol:BASE/QUOTE` entry counts as a symbol.",
    ("SubscriptionData", "symbols"): "Trading pairs as BASE/QUOTE, case-insensitive.",
    ("SubscriptionData", "since"): "Subscribe only: the last `seq` the client received; the "
                                   "events after it that match the new subscription are "
                                   "replayed before live ones.",
    ("CommandData", "command"): "The command's name; every other field of `data` is one of "
                                "its arguments.",
    ("ConnectedData", "heartbeat_interval"): "Seconds between server `ping` messages.",
    ("ConnectedData", "last_seq"): "The newest `seq` when the connection opened.",
    ("ConnectedData", "available_topics"): "The topics a client can subscribe to.",
    ("SubscriptionsData", "count"): "Topics plus symbols subscribed.",
    ("ErrorData", "code"): "One of the error codes below.",
    ("ErrorData", "details"): "What was wrong, for a person to read.",
}

TOPIC_NOTES: dict[str, str] = {
    "all": "Every stream event.",
    "proposals": "Trade proposals: created, approved, rejected, expired.",
    "executions": "Executed trades.",
    "analysis": "Analysis results per symbol.",
    "status": "System status: changes, and the full status periodically.",
    "market": "Prices of every traded symbol, periodically.",
    "portfolio": "Portfolio value and positions, periodically.",
    "health": "Host health metrics, periodically.",
    "alerts": "Alerts and warnings.",
}

ERROR_NOTES: dict[str, str] = {
    ErrorCode.INVALID_TOPIC: "A subscribe or unsubscribe named a topic that does not exist.",
    ErrorCode.INVALID_SYMBOL: "A symbol is not BASE/QUOTE (for example BTC/USDT), or a command "
                              "named a symbol the gateway does not trade.",
    ErrorCode.MESSAGE_PROCESSING_ERROR: "The message is not a JSON object, has an unknown "
                                        "`type`, invalid fields, an unknown command or invalid "
                                        "command arguments.",
    ErrorCode.MAX_CONNECTIONS_EXCEEDED: "The worker already serves WS_MAX_CONNECTIONS "
                                        "connections. Retry later.",
    ErrorCode.AUTHENTICATION_FAILED: "The API key is missing or invalid.",
    ErrorCode.FORBIDDEN_COMMAND: "The API key lacks the scope the command needs.",
    ErrorCode.SLOW_CONSUMER: "The client did not read its events fast enough. Reconnect and "
                             "resume with `since`.",
    ErrorCode.CONNECTION_TIMEOUT: "No message from the client for WS_CONNECTION_TIMEOUT seconds.",
    ErrorCode.INTERNAL_ERROR: "The gateway failed to process the message (logged as a bug).",
    ErrorCode.RATE_LIMITED: "Too many commands; `details` says when to retry.",
}

# Close code -> (when, the error code of the `error` message sent just before, if any).
# The close reason is that error code.
CLOSE_NOTES: dict[int, tuple[str, tuple[str, ...]]] = {
    CloseCode.GOING_AWAY: ("No message from the client for WS_CONNECTION_TIMEOUT seconds.",
                           (ErrorCode.CONNECTION_TIMEOUT,)),
    CloseCode.POLICY_VIOLATION: ("The API key is missing or invalid, or the client is a slow "
                                 "consumer.",
                                 (ErrorCode.AUTHENTICATION_FAILED, ErrorCode.SLOW_CONSUMER)),
    CloseCode.MESSAGE_TOO_BIG: ("A client message larger than WS_MAX_MESSAGE_SIZE bytes (closed "
                                "by the server at once, without an error message).", ()),
    CloseCode.TRY_AGAIN_LATER: ("The connection limit is reached.",
                                (ErrorCode.MAX_CONNECTIONS_EXCEEDED,)),
}


def _constants(holder: type) -> dict[str, Any]:
    """The public constants of a vocabulary class such as ErrorCode, by name."""
    return {name: value for name, value in vars(holder).items() if not name.startswith("_")}


def error_codes() -> list[str]:
    return list(_constants(ErrorCode).values())


def close_codes() -> dict[str, int]:
    return _constants(CloseCode)


# -- JSON schemas: one components.schemas for every model, refs that resolve in the document ---

SCHEMA_REF = "#/components/schemas/"


class SchemaRegistry:
    """Collects the pydantic schemas of a document under `components.schemas`.

    pydantic puts nested models in a local `$defs` with `#/$defs/...` refs, which do not resolve
    once the schema is embedded in another document: here every schema is generated with refs
    to `#/components/schemas/{model}`, and its `$defs` are hoisted there.
    """

    def __init__(self) -> None:
        self.schemas: dict[str, dict[str, Any]] = {}

    def ref(self, model: type[BaseModel], mode: JsonSchemaMode = "serialization"
            ) -> dict[str, Any]:
        """A `$ref` to `model`, whose schema is added to the components."""
        schema = model.model_json_schema(ref_template=SCHEMA_REF + "{model}", mode=mode)
        name = model.__name__
        self._hoist(schema)
        if schema.get("$ref") != SCHEMA_REF + name:  # a recursive model is already hoisted
            self._add(name, schema)
        return {"$ref": SCHEMA_REF + name}

    def of(self, annotation: Any, mode: JsonSchemaMode = "serialization") -> dict[str, Any]:
        """The schema of any type: a `$ref` for a model, inline otherwise."""
        if annotation is None:
            return {"type": "object"}
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return self.ref(annotation, mode)
        schema = TypeAdapter(annotation).json_schema(ref_template=SCHEMA_REF + "{model}",
                                                     mode=mode)
        self._hoist(schema)
        return schema

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith(SCHEMA_REF):
            return self.schemas[ref[len(SCHEMA_REF):]]
        return schema

    def _hoist(self, schema: dict[str, Any]) -> None:
        for name, definition in schema.pop("$defs", {}).items():
            self._add(name, definition)

    def _add(self, name: str, schema: dict[str, Any]) -> None:
        known = self.schemas.setdefault(name, schema)
        if known != schema:
            raise ValueError(f"two different schemas are named {name!r}")


# -- AsyncAPI -----------------------------------------------------------------------------------

def _event_data_annotation(event_type: str) -> Any:
    return EVENT_DATA_MODELS.get(event_type)


def asyncapi_document(host: str | None = None, secure: bool = False) -> dict[str, Any]:
    """The WebSocket protocol as an AsyncAPI 2.6 document. With `host`, it names the server
    (and links the readable page) as seen by the client that asked."""
    registry = SchemaRegistry()
    messages: dict[str, Any] = {}

    client_envelope = registry.ref(ClientMessage, "validation")
    for type_ in MESSAGE_TYPES:
        summary, model = CLIENT_MESSAGES.get(type_, ("", None))
        data = registry.of(model, "validation") if model is not None else {"type": "object"}
        messages[f"client.{type_}"] = _message(
            f"client.{type_}", summary, {"allOf": [client_envelope, {
                "type": "object",
                "properties": {"type": {"const": type_}, "data": data},
                "required": ["type"] + (["data"] if type_ == "command" else [])}]})

    server_envelope = registry.ref(ServerEvent)
    for type_, (summary, model) in REPLIES.items():
        messages[type_] = _message(type_, summary, {"allOf": [server_envelope, {
            "type": "object",
            "properties": {"type": {"const": type_}, "data": registry.of(model)}}]})
    for type_, topic in EVENT_TOPICS.items():
        summary = f"Stream event on topic {topic!r}. {_event_note(type_)}"
        event: dict[str, Any] = {"type": "object", "properties": {
            "type": {"const": type_}, "data": registry.of(_event_data_annotation(type_))}}
        if type_ not in ALSO_DIRECT:  # a direct reply has no seq
            event["properties"]["seq"] = {"type": "integer", "minimum": 1}
            event["required"] = ["seq"]
        messages[type_] = _message(type_, summary, {"allOf": [server_envelope, event]},
                                   tags=[{"name": f"topic:{topic}"}])

    document: dict[str, Any] = {
        "asyncapi": "2.6.0",
        "id": "urn:sigmax:gateway:websocket",
        "info": {
            "title": "SIGMAX WebSocket API",
            "version": SERVER_VERSION,
            "description": _asyncapi_description(),
        },
        "defaultContentType": "application/json",
        "tags": [{"name": f"topic:{topic}", "description": TOPIC_NOTES.get(topic, "")}
                 for topic in TOPICS],
        "channels": {
            WS_PATH: {
                "description": "The event stream: subscribe to topics and symbols, receive "
                               "events, send commands. One JSON object per text frame.",
                "bindings": {"ws": {
                    "method": "GET",
                    "query": {"type": "object", "properties": {"api_key": {
                        "type": "string", "description": "API key (or the X-API-Key header)"}}},
                    "headers": {"type": "object", "properties": {"X-API-Key": {
                        "type": "string", "description": "API key (or ?api_key=)"}}},
                    "bindingVersion": "0.1.0",
                }},
                "publish": {
                    "operationId": "sendClientMessage",
                    "summary": "Messages the client sends",
                    "message": {"oneOf": [{"$ref": f"#/components/messages/client.{t}"}
                                          for t in MESSAGE_TYPES]},
                },
                "subscribe": {
                    "operationId": "receiveServerMessage",
                    "summary": "Replies and stream events the server sends",
                    "message": {"oneOf": [{"$ref": f"#/components/messages/{name}"}
                                          for name in dict.fromkeys([*REPLIES, *EVENT_TOPICS])]},
                },
            },
        },
        "components": {
            "schemas": registry.schemas,
            "messages": messages,
            "securitySchemes": {
                "apiKeyQuery": {"type": "httpApiKey", "in": "query", "name": "api_key",
                                "description": "Needed when the gateway has API_KEYS"},
                "apiKeyHeader": {"type": "httpApiKey", "in": "header", "name": "X-API-Key",
                                 "description": "Needed when the gateway has API_KEYS"},
            },
        },
    }
    if host:
        scheme = "https" if secure else "http"
        document["servers"] = {"gateway": {
            "url": host, "protocol": "wss" if secure else "ws",
            "description": "This gateway",
            "security": [{"apiKeyQuery": []}, {"apiKeyHeader": []}],
        }}
        document["externalDocs"] = {"description": "The protocol as a readable page",
                                    "url": f"{scheme}://{host}{WEBSOCKET_PAGE_PATH}"}
    return document


def _event_note(type_: str) -> str:
    """How a stream event type is routed and delivered, in a sentence or three."""
    if type_ in PER_SYMBOL_LIST_TYPES:
        note = ("Also delivered to `symbol:X` subscribers, restricted to the entries of their "
                "symbols.")
    else:
        note = "Also delivered to `symbol:X` subscribers when published with a symbol."
    if type_ in ALSO_DIRECT:
        note += f" Also sent directly, without `seq`: {ALSO_DIRECT[type_]}."
    if type_ in CONFLATABLE_TYPES:
        note += " A snapshot: conflated for slow consumers."
    return note


def _message(message_id: str, summary: str, payload: dict[str, Any],
             tags: list[dict[str, str]] | None = None) -> dict[str, Any]:
    type_ = message_id.removeprefix("client.")
    message: dict[str, Any] = {"messageId": message_id, "name": type_, "title": type_,
                               "payload": payload}
    if summary:
        message["summary"] = summary
    if tags:
        message["tags"] = tags
    return message


def _asyncapi_description() -> str:
    closes = "; ".join(f"{code} {CLOSE_NOTES.get(code, ('', ()))[0]}"
                       for code in close_codes().values())
    return (
        f"The SIGMAX Gateway's WebSocket protocol at `{WS_PATH}`; a readable version is at "
        f"`{WEBSOCKET_PAGE_PATH}`.\n\n"
        f"Topics: {', '.join(TOPICS)}. Symbols: `BASE/QUOTE` in `symbols`, or "
        "`symbol:BASE/QUOTE` in `topics`.\n\n"
        "Every stream event carries `seq`; `subscribe` with `data.since` replays what was "
        "missed, then continues live.\n\n"
        f"Error codes: {', '.join(error_codes())}.\n\n"
        f"Close codes: {closes}"
    )


# -- the readable page -----------------------------------------------------------------------

@dataclass
class Field:
    name: str
    type: str
    required: bool
    default: str
    description: str


@dataclass
class Section:
    """A message type, an object, with its fields."""

    name: str
    summary: str
    fields: list[Field]
    topic: str = ""
    note: str = ""


def _type_label(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return " | ".join(json.dumps(value) for value in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " | ".join(_type_label(option) for option in schema[key])
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items")
        return f"array of {_type_label(items)}" if isinstance(items, dict) else "array"
    if isinstance(kind, list):
        return " | ".join(str(k) for k in kind)
    if kind is None:
        return "any"
    label = str(kind)
    bounds = [f"{sign} {schema[key]}" for key, sign in
              (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"),
               ("exclusiveMaximum", "<")) if key in schema]
    return f"{label} ({', '.join(bounds)})" if bounds else label


def _fields(registry: SchemaRegistry, schema: dict[str, Any], notes: dict[str, str] | None = None
            ) -> list[Field]:
    """The fields of an object schema, for a person to read."""
    name = str(schema.get("$ref", "")).rsplit("/", 1)[-1]
    resolved = registry.resolve(schema)
    required = set(resolved.get("required", ()))
    fields = []
    for field_name, field_schema in resolved.get("properties", {}).items():
        note = ((notes or {}).get(field_name) or FIELD_NOTES.get((name, field_name))
                or field_schema.get("description", ""))
        default = json.dumps(field_schema["default"]) if "default" in field_schema else ""
        fields.append(Field(field_name, _type_label(field_schema), field_name in required,
                            default, note))
    return fields


def _data_section(registry: SchemaRegistry, name: str, summary: str, annotation: Any,
                  topic: str = "", note: str = "") -> Section:
    if annotation is None:
        return Section(name, summary, [], topic, note or "`data` is an empty object.")
    schema = registry.of(annotation)
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        item = schema["items"]
        note = note or f"`data` is an array of {_type_label(item)}."
        return Section(name, summary, _fields(registry, item), topic, note)
    fields = _fields(registry, schema)
    if not fields:
        note = note or f"`data` is {_type_label(schema)}."
    return Section(name, summary, fields, topic, note)


def _model_names(annotation: Any) -> set[str]:
    """The models a message's data is made of at its top (a model, or a list of models)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {annotation.__name__}
    return {name for arg in get_args(annotation) for name in _model_names(arg)}


def _nested_objects(registry: SchemaRegistry, top: Iterable[str]) -> list[Section]:
    """Objects that only appear inside others (PositionData in a portfolio), to be listed too."""
    shown = set(top)
    return [Section(name, str(schema.get("description", "")),
                    _fields(registry, {"$ref": SCHEMA_REF + name}))
            for name, schema in sorted(registry.schemas.items())
            if name not in shown and schema.get("properties")]


def _commands() -> list[dict[str, str]]:
    listed = []
    for name, command in sorted(COMMANDS.items()):
        fields = command.arguments.model_fields
        args = ", ".join(field if info.is_required() else f"{field}?"
                         for field, info in fields.items())
        listed.append({"name": name, "scope": command.scope, "args": args})
    return listed


def websocket_page_context(config: Config, ws_url: str, commands: list[dict[str, str]]
                           ) -> dict[str, Any]:
    registry = SchemaRegistry()
    client_envelope = _fields(registry, registry.ref(ClientMessage, "validation"),
                              CLIENT_ENVELOPE_NOTES)
    server_envelope = _fields(registry, registry.ref(ServerEvent), ENVELOPE_NOTES)
    client_messages = []
    for type_ in MESSAGE_TYPES:
        summary, model = CLIENT_MESSAGES.get(type_, ("", None))
        section = (_data_section(registry, type_, summary, model) if model is not None
                   else Section(type_, summary, [], note="No `data`."))
        client_messages.append(section)
    replies = [_data_section(registry, type_, summary, model)
               for type_, (summary, model) in REPLIES.items()]
    events = [_data_section(registry, type_, _event_note(type_), _event_data_annotation(type_),
                            topic=topic, note="" if _event_data_annotation(type_) is not None
                            else "`data` as the producer sent it.")
              for type_, topic in EVENT_TOPICS.items()]
    shown = {"ClientMessage", "ServerEvent", "ErrorData"}
    for annotation in [*(m for _, m in CLIENT_MESSAGES.values()),
                       *(m for _, m in REPLIES.values()), *EVENT_DATA_MODELS.values()]:
        shown |= _model_names(annotation)
    nested = _nested_objects(registry, shown)

    topic_events = {topic: [t for t, tp in EVENT_TOPICS.items() if tp == topic or topic == "all"]
                    for topic in TOPICS}
    closes: list[dict[str, Any]] = []
    close_of: dict[str, int] = {}
    for name, code in close_codes().items():
        when, sent_first = CLOSE_NOTES.get(code, ("", ()))
        closes.append({"code": code, "name": name, "when": when, "errors": sent_first})
        close_of.update(dict.fromkeys(sent_first, code))
    errors = [{"code": code, "when": ERROR_NOTES.get(code, ""), "closes": close_of.get(code)}
              for code in error_codes()]
    examples = {
        "subscribe": {"type": "subscribe", "data": {"topics": ["proposals", "market"],
                                                    "symbols": ["BTC/USDT"]},
                      "request_id": "r1"},
        "resume": {"type": "subscribe", "data": {"topics": ["proposals", "market"],
                                                 "symbols": ["BTC/USDT"], "since": 1234}},
    }
    return {
        "version": SERVER_VERSION,
        "ws_path": WS_PATH,
        "ws_url": ws_url,
        "asyncapi_url": ASYNCAPI_PATH,
        "config": config,
        "client_envelope": client_envelope,
        "server_envelope": server_envelope,
        "client_messages": client_messages,
        "replies": replies,
        "events": events,
        "nested": nested,
        "topics": [{"name": t, "note": TOPIC_NOTES.get(t, ""), "events": topic_events[t]}
                   for t in TOPICS],
        "conflated": sorted(CONFLATABLE_TYPES),
        "per_symbol": sorted(PER_SYMBOL_LIST_TYPES),
        "errors": errors,
        "error_fields": _fields(registry, registry.ref(ErrorData)),
        "closes": closes,
        "close": close_codes(),
        "commands": commands,
        "examples": {name: json.dumps(example) for name, example in examples.items()},
    }


def _inline_code(text: str) -> Markup:
    """Escape `text`, showing its `backticked` parts as code."""
    parts = str(text).split("`")
    out = Markup("")
    for index, part in enumerate(parts):
        out += Markup("<code>{}</code>").format(part) if index % 2 else escape(part)
    return out


_ENV = Environment(autoescape=True, undefined=StrictUndefined, trim_blocks=True,
                   lstrip_blocks=True)
_ENV.filters["md"] = _inline_code

WEBSOCKET_TEMPLATE = _ENV.from_string("""\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SIGMAX WebSocket API {{ version }}</title>
<style>
body { font: 16px/1.5 system-ui, sans-serif; margin: 0 auto; max-width: 62rem;
       padding: 1rem 1.5rem 4rem; color: #1d1d1f; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #ddd; }
h3 { margin: 1.6rem 0 .3rem; } h3 code { font-size: 1.05em; }
nav a { margin-right: .9rem; white-space: nowrap; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0 1rem; font-size: .94rem; }
table.fields { table-layout: fixed; } table.fields th:nth-child(1) { width: 30%; }
table.fields th:nth-child(2) { width: 24%; } td { overflow-wrap: anywhere; }
th, td { text-align: left; vertical-align: top; padding: .3rem .6rem;
         border-bottom: 1px solid #e4e4e4; }
th { background: #f5f5f7; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
            font-size: .9em; }
code { background: #f2f2f4; padding: 0 .25em; border-radius: 3px; }
pre { background: #f5f5f7; padding: .7rem 1rem; overflow-x: auto; border-radius: 4px; }
pre code { background: none; padding: 0; }
.muted { color: #6e6e73; } .req { color: #b3261e; font-size: .85em; }
</style>
</head>
<body>
<header>
<h1>SIGMAX WebSocket API</h1>
<p class="muted">Server version {{ version }}. Machine-readable:
<a href="{{ asyncapi_url }}">AsyncAPI document</a>. REST API: <a href="/docs">/docs</a>.</p>
<nav>
<a href="#connection">Connection</a><a href="#envelope">Envelope</a>
<a href="#client">Client messages</a><a href="#server">Server messages</a>
<a href="#topics">Topics</a><a href="#events">Stream events</a><a href="#resume">Resume</a>
<a href="#slow">Slow consumers</a><a href="#errors">Errors</a><a href="#close">Close codes</a>
</nav>
</header>

{% macro field_table(fields) %}
{% if fields %}
<table class="fields">
<tr><th>field</th><th>type</th><th>description</th></tr>
{% for f in fields %}
<tr><td><code>{{ f.name }}</code>{% if f.required %} <span class="req">required</span>{% endif %}
</td><td>{{ f.type }}{% if f.default %} <span class="muted">(default {{ f.default }})</span>
{% endif %}</td><td>{{ f.description | md }}</td></tr>
{% endfor %}
</table>
{% endif %}
{% endmacro %}

{% macro sections(items) %}
{% for s in items %}
<h3 id="msg-{{ s.name }}"><code>{{ s.name }}</code></h3>
{% if s.topic %}<p>Topic <a href="#topic-{{ s.topic }}"><code>{{ s.topic }}</code></a>.
{{ s.summary | md }}</p>{% elif s.summary %}<p>{{ s.summary | md }}</p>{% endif %}
{% if s.note %}<p>{{ s.note | md }}</p>{% endif %}
{{ field_table(s.fields) }}
{% endfor %}
{% endmacro %}

<h2 id="connection">Connection and authentication</h2>
<p>Connect to <code>{{ ws_url }}</code>. Each message, both ways, is one JSON object in one
text frame.</p>
<p>When the gateway has API keys (<code>API_KEYS</code>), pass one as
<code>?api_key=KEY</code> or in the <code>X-API-Key</code> header. Without a valid key the
server sends an <code>error</code> with code <code>AUTHENTICATION_FAILED</code> and closes with
{{ close.POLICY_VIOLATION }}. A key's scopes (<code>read</code>,
<code>trade</code>, <code>publish</code>) decide which commands it may run. Browsers may connect
only from the configured origins (<code>CORS_ORIGINS</code>) or the gateway's own.</p>
<p>Flow:</p>
<ol>
<li>The server accepts and sends <a href="#msg-connected"><code>connected</code></a> (connection
id, topics, heartbeat interval, <code>last_seq</code>), then a <code>system_status</code>.</li>
<li>The client sends <a href="#msg-subscribe"><code>subscribe</code></a>; the server answers
<code>subscribed</code>.</li>
<li>The server sends every stream event of the subscribed topics and symbols.</li>
<li>The server sends <code>ping</code> every {{ config.WS_HEARTBEAT_INTERVAL }} s
(<code>WS_HEARTBEAT_INTERVAL</code>); the client answers <code>pong</code>. A connection with no
client message for {{ config.WS_CONNECTION_TIMEOUT }} s (<code>WS_CONNECTION_TIMEOUT</code>) is
closed with <code>CONNECTION_TIMEOUT</code>, {{ close.GOING_AWAY }}.</li>
</ol>
<p>Client messages are at most {{ config.WS_MAX_MESSAGE_SIZE }} bytes
(<code>WS_MAX_MESSAGE_SIZE</code>). A message that cannot be processed gets an
<code>error</code> and the connection stays open.</p>
<pre><code>{{ examples.subscribe }}</code></pre>

<h2 id="envelope">Envelope</h2>
<p>Every client message:</p>
{{ field_table(client_envelope) }}
<p>Every server message:</p>
{{ field_table(server_envelope) }}

<h2 id="client">Client messages</h2>
{{ sections(client_messages) }}
{% if commands %}
<h3 id="commands">Commands</h3>
<p>Sent as <code>{"type": "command", "data": {"command": NAME, ...arguments}}</code>; at most
{{ config.WS_COMMAND_RATE }} per second per connection, in bursts of
{{ config.WS_COMMAND_BURST }} (<code>RATE_LIMITED</code> beyond). Arguments marked ? are
optional.</p>
<table>
<tr><th>command</th><th>arguments</th><th>scope</th></tr>
{% for c in commands %}
<tr><td><code>{{ c.name }}</code></td><td>{{ c.args or "none" }}</td>
<td><code>{{ c.scope }}</code></td></tr>
{% endfor %}
</table>
{% endif %}

<h2 id="server">Server messages: replies and notices</h2>
{{ sections(replies) }}

<h2 id="topics">Topics and symbols</h2>
<table>
<tr><th>topic</th><th>what</th><th>event types</th></tr>
{% for t in topics %}
<tr id="topic-{{ t.name }}"><td><code>{{ t.name }}</code></td><td>{{ t.note | md }}</td>
<td>{% for e in t.events %}<a href="#msg-{{ e }}"><code>{{ e }}</code></a>{% if not loop.last %},
{% endif %}{% endfor %}</td></tr>
{% endfor %}
</table>
<p>Symbols are <code>BASE/QUOTE</code> pairs such as <code>BTC/USDT</code>, given in
<code>symbols</code> or as <code>symbol:BTC/USDT</code> in <code>topics</code>. A symbol
subscription receives every stream event about that symbol, whatever its topic. A client
subscribed to a symbol but not to the event's topic receives
{% for t in per_symbol %}<code>{{ t }}</code>{% if not loop.last %}, {% endif %}{% endfor %}
{{ " " }}restricted to the entries of its symbols.</p>

<h2 id="events">Stream events</h2>
<p>Sent to every connection subscribed to the topic (or <code>all</code>) or to a symbol of the
event. They carry <code>seq</code>, and <code>connection_id</code> is <code>null</code>.</p>
{{ sections(events) }}
{% if nested %}
<h3>Objects inside events and replies</h3>
{% for s in nested %}
<h3 id="obj-{{ s.name }}"><code>{{ s.name }}</code></h3>
{% if s.summary %}<p>{{ s.summary | md }}</p>{% endif %}
{{ field_table(s.fields) }}
{% endfor %}
{% endif %}

<h2 id="resume">Resume with <code>since</code></h2>
<p>Every stream event has a <code>seq</code>, one more for each event published across the
deployment. A client that reconnects sends <code>subscribe</code> with
<code>"since": LAST_SEQ</code>, the last <code>seq</code> it received: the server replays the
missed events that match the subscription, then continues live, with no gap and no duplicate.
The <code>subscribed</code> reply then has <code>replayed</code> (how many) and
<code>recovered</code>: <code>false</code> when the history no longer reaches back that far, and
the client should reload the state over REST. The gateway keeps the last
{{ config.EVENT_HISTORY_SIZE }} events (<code>EVENT_HISTORY_SIZE</code>) for at most
{{ config.EVENT_HISTORY_MAX_AGE }} s (<code>EVENT_HISTORY_MAX_AGE</code>).</p>
<pre><code>{{ examples.resume }}</code></pre>
<p>A <code>since</code> counts in one stream, named by <code>stream_id</code> in
<code>connected</code>; send it along, and a <code>since</code> of another stream (a restarted
gateway) is answered <code>recovered: false</code>. If Redis loses its data, each worker sends
its connections a <code>stream_reset</code> with the new stream's id: <code>recovered</code> says
whether any event was missed. Seq numbers never go back and are never used twice.</p>

<h2 id="proposals">Proposals</h2>
<p>The agent analyses each symbol once it has 20 prices (a warm-up of 20 market ticks after a
start with no stored prices). An analysis at least {{ config.PROPOSAL_CONFIDENCE }} confident
(<code>PROPOSAL_CONFIDENCE</code>) becomes a <code>proposal_created</code>, unless its symbol
already has an open proposal: one open proposal per symbol, so a pending one blocks its symbol
until it is decided or expires after {{ config.PROPOSAL_TTL }} s (<code>PROPOSAL_TTL</code>,
then <code>proposal_expired</code>). <code>proposal_created</code> carries
<code>confidence</code>, <code>source</code>, <code>expires_at</code> and, for a manual
proposal, <code>requested_by</code>. Approval executes at once (<code>trade_executed</code>)
unless trading is paused; while paused there are no new proposals. A strategy that connects late
sees what is already pending by subscribing with <code>since</code> or with
<code>GET /api/proposals?status=pending</code>.</p>

<h2 id="slow">Slow consumers</h2>
<p>Each connection has a queue of at most {{ config.WS_SEND_QUEUE_SIZE }} frames
(<code>WS_SEND_QUEUE_SIZE</code>); a slow client never delays the others. When its queue is
full, snapshots ({% for t in conflated %}<code>{{ t }}</code>{% if not loop.last %},
{% endif %}{% endfor %}) are conflated: only the newest per type and symbol is kept. When that
is not enough, the client gets an <code>error</code> with code <code>SLOW_CONSUMER</code> and the
connection is closed with {{ close.POLICY_VIOLATION }}; the client reconnects and resumes with
<code>since</code>.</p>

<h2 id="errors">Errors</h2>
<p>An <code>error</code> message's <code>data</code>:</p>
{{ field_table(error_fields) }}
<table>
<tr><th>code</th><th>when</th><th>connection</th></tr>
{% for e in errors %}
<tr id="error-{{ e.code }}"><td><code>{{ e.code }}</code></td><td>{{ e.when | md }}</td>
<td>{% if e.closes %}close {{ e.closes }}{% else %}stays open{% endif %}</td></tr>
{% endfor %}
</table>

<h2 id="close">Close codes</h2>
<p>The close reason is the error code of the <code>error</code> sent just before.</p>
<table>
<tr><th>code</th><th>name</th><th>when</th><th>error sent first</th></tr>
{% for c in closes %}
<tr><td>{{ c.code }}</td><td><code>{{ c.name }}</code></td><td>{{ c.when | md }}</td>
<td>{% for e in c.errors %}<code>{{ e }}</code>{% if not loop.last %}, {% endif %}
{% else %}none{% endfor %}</td></tr>
{% endfor %}
</table>
</body>
</html>
""")


def render_websocket_page(context: dict[str, Any]) -> str:
    return WEBSOCKET_TEMPLATE.render(context)


# -- REST documentation UIs from local assets -------------------------------------------------

@dataclass(frozen=True)
class UIAssets:
    """Where a documentation UI's files are in an installed package."""

    ui: str                     # quart-schema's endpoint of the UI
    distribution: str           # the PyPI package shipping the files
    files: dict[str, str]       # public name under ASSETS_PATH -> path inside the package
    config_keys: dict[str, str]  # quart-schema config key -> public name


UIS: tuple[UIAssets, ...] = (
    UIAssets("swagger_ui", "swagger-ui-bundle-v2",
             {"swagger-ui/swagger-ui-bundle.js": "swagger-ui-bundle.js",
              "swagger-ui/swagger-ui.css": "swagger-ui.css"},
             {"QUART_SCHEMA_SWAGGER_JS_URL": "swagger-ui/swagger-ui-bundle.js",
              "QUART_SCHEMA_SWAGGER_CSS_URL": "swagger-ui/swagger-ui.css"}),
    UIAssets("redoc_ui", "flask-openapi-redoc",
             {"redoc/redoc.standalone.js": "templates/redoc/js/redoc.standalone.js"},
             {"QUART_SCHEMA_REDOC_JS_URL": "redoc/redoc.standalone.js"}),
    UIAssets("scalar_ui", "flask-openapi-scalar",
             {"scalar/scalar.standalone.js": "templates/scalar/js/scalar.standalone.js"},
             {"QUART_SCHEMA_SCALAR_JS_URL": "scalar/scalar.standalone.js"}),
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
            log.debug("%s is not installed: %s redirects to another documentation UI",
                     ui.distribution, ui.ui)
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
    own_pages: dict[str, Callable[..., Any]] = {"redoc_ui": _redoc_page,
                                                "scalar_ui": _scalar_page}
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
UI_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; "
          "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
          "connect-src 'self'; worker-src 'self' blob:; base-uri 'self'; form-action 'self'; "
          "frame-ancestors 'self'")
# The WebSocket page runs no script and loads nothing.
PAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'self'")


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


UI_PAGE = _ENV.from_string("""\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>body { margin: 0; padding: 0; }</style>
</head>
<body>
{{ body }}
<noscript>This page needs JavaScript; the schema itself is at
<a href="{{ openapi_url }}">{{ openapi_url }}</a>.</noscript>
</body>
</html>
""")

# Redoc's options: no telemetry (it would report to Redocly's servers).
REDOC_OPTIONS = {"disableTelemetry": True}


async def _redoc_page() -> str:
    title, openapi_url = _schema_info()
    body = Markup(
        '<div id="redoc"></div>\n<script type="module">\n'
        'import {{ init }} from {};\n'
        'init({}, {}, document.getElementById("redoc"));\n</script>').format(
        _js(current_app.config["QUART_SCHEMA_REDOC_JS_URL"]), _js(openapi_url),
        _js(REDOC_OPTIONS))
    return UI_PAGE.render(title=title, openapi_url=openapi_url, body=body)


async def _scalar_page() -> str:
    title, openapi_url = _schema_info()
    body = Markup('<script id="api-reference" data-url="{}" data-configuration="{}"></script>\n'
                  '<script src="{}"></script>').format(
        openapi_url, json.dumps(SCALAR_CONFIGURATION),
        current_app.config["QUART_SCHEMA_SCALAR_JS_URL"])
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
            f"[{ASYNCAPI_PATH}]({ASYNCAPI_PATH}).")
    if extension.external_docs is None:
        extension.external_docs = ExternalDocumentation(
            url=WEBSOCKET_PAGE_PATH, description="The WebSocket protocol")


# -- routes --------------------------------------------------------------------------------------

@docs_bp.get(ASYNCAPI_PATH)
@hide  # a document, like /openapi.json; the REST document links it
async def get_asyncapi() -> dict[str, Any]:
    """The WebSocket protocol as an AsyncAPI 2.6 document."""
    return asyncapi_document(request.host or None, request.scheme in ("https", "wss"))


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
    context = websocket_page_context(config if isinstance(config, Config) else Config(),
                                     f"{scheme}://{request.host}{WS_PATH}", _commands())
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
    response = await send_from_directory(directory, name,
                                         mimetype=MIMETYPES.get(Path(name).suffix))
    response.cache_control.public = True
    response.cache_control.max_age = ASSET_MAX_AGE
    return response
