"""The WebSocket protocol as an AsyncAPI 2.6 document, built from the code's vocabulary."""

from __future__ import annotations

from typing import Any

from app.apidocs.protocol import (
    ALSO_DIRECT,
    CLIENT_MESSAGES,
    CLOSE_NOTES,
    REPLIES,
    TOPIC_NOTES,
    WEBSOCKET_PAGE_PATH,
    WS_PATH,
    SchemaRegistry,
    close_codes,
    error_codes,
)
from app.blueprints.ws import MESSAGE_TYPES
from app.models import (
    EVENT_DATA_MODELS,
    ClientMessage,
    ServerEvent,
)
from app.services.events import (
    CONFLATABLE_TYPES,
    EVENT_TOPICS,
    PER_SYMBOL_LIST_TYPES,
    SERVER_VERSION,
    TOPICS,
)

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
            f"client.{type_}",
            summary,
            {
                "allOf": [
                    client_envelope,
                    {
                        "type": "object",
                        "properties": {"type": {"const": type_}, "data": data},
                        "required": ["type"] + (["data"] if type_ == "command" else []),
                    },
                ]
            },
        )

    server_envelope = registry.ref(ServerEvent)
    for type_, (summary, model) in REPLIES.items():
        messages[type_] = _message(
            type_,
            summary,
            {
                "allOf": [
                    server_envelope,
                    {
                        "type": "object",
                        "properties": {"type": {"const": type_}, "data": registry.of(model)},
                    },
                ]
            },
        )
    for type_, topic in EVENT_TOPICS.items():
        summary = f"Stream event on topic {topic!r}. {_event_note(type_)}"
        event: dict[str, Any] = {
            "type": "object",
            "properties": {
                "type": {"const": type_},
                "data": registry.of(_event_data_annotation(type_)),
            },
        }
        if type_ not in ALSO_DIRECT:  # a direct reply has no seq
            event["properties"]["seq"] = {"type": "integer", "minimum": 1}
            event["required"] = ["seq"]
        messages[type_] = _message(
            type_, summary, {"allOf": [server_envelope, event]}, tags=[{"name": f"topic:{topic}"}]
        )

    document: dict[str, Any] = {
        "asyncapi": "2.6.0",
        "id": "urn:sigmax:gateway:websocket",
        "info": {
            "title": "SIGMAX WebSocket API",
            "version": SERVER_VERSION,
            "description": _asyncapi_description(),
        },
        "defaultContentType": "application/json",
        "tags": [
            {"name": f"topic:{topic}", "description": TOPIC_NOTES.get(topic, "")}
            for topic in TOPICS
        ],
        "channels": {
            WS_PATH: {
                "description": "The event stream: subscribe to topics and symbols, receive "
                "events, send commands. One JSON object per text frame.",
                "bindings": {
                    "ws": {
                        "method": "GET",
                        "query": {
                            "type": "object",
                            "properties": {
                                "api_key": {
                                    "type": "string",
                                    "description": "API key (or the X-API-Key header)",
                                }
                            },
                        },
                        "headers": {
                            "type": "object",
                            "properties": {
                                "X-API-Key": {
                                    "type": "string",
                                    "description": "API key (or ?api_key=)",
                                }
                            },
                        },
                        "bindingVersion": "0.1.0",
                    }
                },
                "publish": {
                    "operationId": "sendClientMessage",
                    "summary": "Messages the client sends",
                    "message": {
                        "oneOf": [
                            {"$ref": f"#/components/messages/client.{t}"} for t in MESSAGE_TYPES
                        ]
                    },
                },
                "subscribe": {
                    "operationId": "receiveServerMessage",
                    "summary": "Replies and stream events the server sends",
                    "message": {
                        "oneOf": [
                            {"$ref": f"#/components/messages/{name}"}
                            for name in dict.fromkeys([*REPLIES, *EVENT_TOPICS])
                        ]
                    },
                },
            },
        },
        "components": {
            "schemas": registry.schemas,
            "messages": messages,
            "securitySchemes": {
                "apiKeyQuery": {
                    "type": "httpApiKey",
                    "in": "query",
                    "name": "api_key",
                    "description": "Needed when the gateway has API_KEYS",
                },
                "apiKeyHeader": {
                    "type": "httpApiKey",
                    "in": "header",
                    "name": "X-API-Key",
                    "description": "Needed when the gateway has API_KEYS",
                },
            },
        },
    }
    if host:
        scheme = "https" if secure else "http"
        document["servers"] = {
            "gateway": {
                "url": host,
                "protocol": "wss" if secure else "ws",
                "description": "This gateway",
                "security": [{"apiKeyQuery": []}, {"apiKeyHeader": []}],
            }
        }
        document["externalDocs"] = {
            "description": "The protocol as a readable page",
            "url": f"{scheme}://{host}{WEBSOCKET_PAGE_PATH}",
        }
    return document


def _event_note(type_: str) -> str:
    """How a stream event type is routed and delivered, in a sentence or three."""
    if type_ in PER_SYMBOL_LIST_TYPES:
        note = (
            "Also delivered to `symbol:X` subscribers, restricted to the entries of their symbols."
        )
    else:
        note = "Also delivered to `symbol:X` subscribers when published with a symbol."
    if type_ in ALSO_DIRECT:
        note += f" Also sent directly, without `seq`: {ALSO_DIRECT[type_]}."
    if type_ in CONFLATABLE_TYPES:
        note += " A snapshot: conflated for slow consumers."
    return note


def _message(
    message_id: str, summary: str, payload: dict[str, Any], tags: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    type_ = message_id.removeprefix("client.")
    message: dict[str, Any] = {
        "messageId": message_id,
        "name": type_,
        "title": type_,
        "payload": payload,
    }
    if summary:
        message["summary"] = summary
    if tags:
        message["tags"] = tags
    return message


def _asyncapi_description() -> str:
    closes = "; ".join(
        f"{code} {CLOSE_NOTES.get(code, ('', ()))[0]}" for code in close_codes().values()
    )
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
