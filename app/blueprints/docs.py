"""Protocol docs: the WebSocket API as an AsyncAPI document (quart-schema documents REST only)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from quart import Blueprint

from app.models import (
    ClientMessage,
    CommandData,
    CommandResultData,
    ConnectedData,
    ErrorData,
    ServerEvent,
    SubscribedData,
    SubscriptionData,
    SubscriptionsData,
)
from app.services.events import EVENT_TOPICS, SERVER_VERSION, TOPICS, CloseCode, ErrorCode

docs_bp = Blueprint("docs", __name__)

REPLIES: dict[str, tuple[str, type[BaseModel] | None]] = {
    "connected": ("Sent first on every connection", ConnectedData),
    "subscribed": ("Reply to subscribe; with `since`, says recovered and replayed", SubscribedData),
    "unsubscribed": ("Reply to unsubscribe", SubscribedData),
    "subscriptions": ("Reply to get_subscriptions", SubscriptionsData),
    "command_result": ("Reply to command", CommandResultData),
    "pong": ("Reply to ping", None),
    "ping": ("Server heartbeat every WS_HEARTBEAT_INTERVAL seconds", None),
    "error": ("A message could not be processed, or the server is about to close", ErrorData),
}

CLOSE_CODES = {
    CloseCode.GOING_AWAY: "CONNECTION_TIMEOUT: no client message for WS_CONNECTION_TIMEOUT",
    CloseCode.POLICY_VIOLATION: "AUTHENTICATION_FAILED or SLOW_CONSUMER",
    CloseCode.MESSAGE_TOO_BIG: "a message larger than WS_MAX_MESSAGE_SIZE",
    CloseCode.TRY_AGAIN_LATER: "MAX_CONNECTIONS_EXCEEDED",
}


def _schema(model: type[BaseModel] | None) -> dict[str, Any]:
    return model.model_json_schema() if model is not None else {"type": "object"}


def asyncapi_document() -> dict[str, Any]:
    messages: dict[str, Any] = {
        "ClientMessage": {"payload": _schema(ClientMessage),
                          "description": "subscribe, unsubscribe, ping, pong, command, "
                                         "get_status, get_subscriptions"},
        "SubscriptionData": {"payload": _schema(SubscriptionData)},
        "CommandData": {"payload": _schema(CommandData)},
    }
    for name, (summary, model) in REPLIES.items():
        messages[name] = {"summary": summary, "payload": {
            "allOf": [_schema(ServerEvent), {"properties": {"data": _schema(model)}}]}}
    for event_type, topic in EVENT_TOPICS.items():
        messages[event_type] = {"summary": f"Stream event on topic {topic!r} and symbol:*",
                                "payload": _schema(ServerEvent)}
    return {
        "asyncapi": "2.6.0",
        "info": {
            "title": "SIGMAX WebSocket API",
            "version": SERVER_VERSION,
            "description": (
                "Topics: " + ", ".join(TOPICS) + ". Symbols: BASE/QUOTE or `symbol:BASE/QUOTE`. "
                "Error codes: " + ", ".join(v for k, v in vars(ErrorCode).items()
                                            if not k.startswith("_")) + ". Close codes: "
                + "; ".join(f"{code} {why}" for code, why in CLOSE_CODES.items())
                + ". Every stream event carries `seq`; `subscribe` with `data.since` resumes."),
        },
        "channels": {
            "/api/ws": {
                "publish": {"message": {"$ref": "#/components/messages/ClientMessage"}},
                "subscribe": {"message": {"oneOf": [
                    {"$ref": f"#/components/messages/{name}"}
                    for name in list(REPLIES) + list(EVENT_TOPICS)]}},
            },
        },
        "components": {"messages": messages},
    }


@docs_bp.get("/asyncapi.json")
async def get_asyncapi() -> dict[str, Any]:
    """The WebSocket protocol as an AsyncAPI 2.6 document."""
    return asyncapi_document()
