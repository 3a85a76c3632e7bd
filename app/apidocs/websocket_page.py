"""The WebSocket protocol as a page to read (`/docs/websocket`), from the same vocabulary
and schemas as the AsyncAPI document; the page is app/templates/websocket.html."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape
from pydantic import BaseModel

from app.apidocs.asyncapi import _event_data_annotation, _event_note
from app.apidocs.protocol import (
    ASYNCAPI_PATH,
    CLIENT_ENVELOPE_NOTES,
    CLIENT_MESSAGES,
    CLOSE_NOTES,
    ENVELOPE_NOTES,
    ERROR_NOTES,
    FIELD_NOTES,
    REPLIES,
    SCHEMA_REF,
    TOPIC_NOTES,
    WS_PATH,
    SchemaRegistry,
    close_codes,
    error_codes,
)
from app.blueprints.ws import MESSAGE_TYPES
from app.models import (
    EVENT_DATA_MODELS,
    ClientMessage,
    ErrorData,
    ServerEvent,
)
from app.services.commands import COMMANDS
from app.services.events import (
    CONFLATABLE_TYPES,
    EVENT_TOPICS,
    PER_SYMBOL_LIST_TYPES,
    SERVER_VERSION,
    TOPICS,
)
from config import Config

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


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
    bounds = [
        f"{sign} {schema[key]}"
        for key, sign in (
            ("minimum", "≥"),
            ("exclusiveMinimum", ">"),
            ("maximum", "≤"),
            ("exclusiveMaximum", "<"),
        )
        if key in schema
    ]
    return f"{label} ({', '.join(bounds)})" if bounds else label


def _fields(
    registry: SchemaRegistry, schema: dict[str, Any], notes: dict[str, str] | None = None
) -> list[Field]:
    """The fields of an object schema, for a person to read."""
    name = str(schema.get("$ref", "")).rsplit("/", 1)[-1]
    resolved = registry.resolve(schema)
    required = set(resolved.get("required", ()))
    fields = []
    for field_name, field_schema in resolved.get("properties", {}).items():
        note = (
            (notes or {}).get(field_name)
            or FIELD_NOTES.get((name, field_name))
            or field_schema.get("description", "")
        )
        default = json.dumps(field_schema["default"]) if "default" in field_schema else ""
        fields.append(
            Field(field_name, _type_label(field_schema), field_name in required, default, note)
        )
    return fields


def _data_section(
    registry: SchemaRegistry,
    name: str,
    summary: str,
    annotation: Any,
    topic: str = "",
    note: str = "",
) -> Section:
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
    return [
        Section(
            name, str(schema.get("description", "")), _fields(registry, {"$ref": SCHEMA_REF + name})
        )
        for name, schema in sorted(registry.schemas.items())
        if name not in shown and schema.get("properties")
    ]


def commands_listing() -> list[dict[str, str]]:
    listed = []
    for name, command in sorted(COMMANDS.items()):
        fields = command.arguments.model_fields
        args = ", ".join(
            field if info.is_required() else f"{field}?" for field, info in fields.items()
        )
        listed.append({"name": name, "scope": command.scope, "args": args})
    return listed


def websocket_page_context(
    config: Config, ws_url: str, commands: list[dict[str, str]]
) -> dict[str, Any]:
    registry = SchemaRegistry()
    client_envelope = _fields(
        registry, registry.ref(ClientMessage, "validation"), CLIENT_ENVELOPE_NOTES
    )
    server_envelope = _fields(registry, registry.ref(ServerEvent), ENVELOPE_NOTES)
    client_messages = []
    for type_ in MESSAGE_TYPES:
        summary, model = CLIENT_MESSAGES.get(type_, ("", None))
        section = (
            _data_section(registry, type_, summary, model)
            if model is not None
            else Section(type_, summary, [], note="No `data`.")
        )
        client_messages.append(section)
    replies = [
        _data_section(registry, type_, summary, model)
        for type_, (summary, model) in REPLIES.items()
    ]
    events = [
        _data_section(
            registry,
            type_,
            _event_note(type_),
            _event_data_annotation(type_),
            topic=topic,
            note=""
            if _event_data_annotation(type_) is not None
            else "`data` as the producer sent it.",
        )
        for type_, topic in EVENT_TOPICS.items()
    ]
    shown = {"ClientMessage", "ServerEvent", "ErrorData"}
    for annotation in [
        *(m for _, m in CLIENT_MESSAGES.values()),
        *(m for _, m in REPLIES.values()),
        *EVENT_DATA_MODELS.values(),
    ]:
        shown |= _model_names(annotation)
    nested = _nested_objects(registry, shown)

    topic_events = {
        topic: [t for t, tp in EVENT_TOPICS.items() if tp == topic or topic == "all"]
        for topic in TOPICS
    }
    closes: list[dict[str, Any]] = []
    close_of: dict[str, int] = {}
    for name, code in close_codes().items():
        when, sent_first = CLOSE_NOTES.get(code, ("", ()))
        closes.append({"code": code, "name": name, "when": when, "errors": sent_first})
        close_of.update(dict.fromkeys(sent_first, code))
    errors = [
        {"code": code, "when": ERROR_NOTES.get(code, ""), "closes": close_of.get(code)}
        for code in error_codes()
    ]
    examples = {
        "subscribe": {
            "type": "subscribe",
            "data": {"topics": ["proposals", "market"], "symbols": ["BTC/USDT"]},
            "request_id": "r1",
        },
        "resume": {
            "type": "subscribe",
            "data": {"topics": ["proposals", "market"], "symbols": ["BTC/USDT"], "since": 1234},
        },
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
        "topics": [
            {"name": t, "note": TOPIC_NOTES.get(t, ""), "events": topic_events[t]} for t in TOPICS
        ],
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


_ENV = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters["md"] = _inline_code

WEBSOCKET_TEMPLATE = _ENV.get_template("websocket.html")


def render_websocket_page(context: dict[str, Any]) -> str:
    return WEBSOCKET_TEMPLATE.render(context)
