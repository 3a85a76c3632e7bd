"""The WebSocket protocol's vocabulary as the documents describe it: prose keyed by the
code's own names (which decide what is listed), and one JSON-schema registry for every model."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from app.models import (
    CommandData,
    CommandResultData,
    ConnectedData,
    ErrorData,
    ReplayCompleteData,
    ReplayData,
    StreamResetData,
    SubscribedData,
    SubscriptionData,
    SubscriptionsData,
)
from app.services.events import CloseCode, ErrorCode

log = logging.getLogger(__name__)


WS_PATH = "/api/ws"
ASYNCAPI_PATH = "/asyncapi.json"
WEBSOCKET_PAGE_PATH = "/docs/websocket"
ASSETS_PATH = "/docs/assets"

# -- the protocol's prose: keyed by the code's vocabulary, which decides what is listed ----------

CLIENT_MESSAGES: dict[str, tuple[str, type[BaseModel] | None]] = {
    "subscribe": (
        "Add topics and symbols to the subscription; with `since`, first replay the "
        "missed events. Answered by `subscribed`.",
        SubscriptionData,
    ),
    "unsubscribe": ("Remove topics and symbols. Answered by `unsubscribed`.", SubscriptionData),
    "ping": ("Keep-alive. Answered by `pong`.", None),
    "pong": ("Answer to the server's `ping`. No reply.", None),
    "command": (
        "Run a gateway command (see Commands). Answered by `command_result`, or by an `error` "
        "with the engine's own code when the engine refuses the action (the paper engine's: "
        "PROPOSAL_NOT_FOUND, PROPOSAL_ALREADY_DECIDED, ENGINE_PAUSED, UNKNOWN_SYMBOL, "
        "NOTHING_TO_SELL, INVALID_SIZE, NO_PRICE).",
        CommandData,
    ),
    "get_status": ("Answered by a `system_status` message.", None),
    "get_subscriptions": ("Answered by `subscriptions`.", None),
    "replay": (
        "Stream archived events (since/until: a seq or an RFC 3339 time; topics; symbols) in "
        "seq order with their original seq and timestamps, each carrying this request's "
        "`request_id`, paced at `speed` times their original spacing (0: as fast as the "
        "client reads), then `replay_complete`. Apart from the live subscriptions; one at a "
        "time per connection (REPLAY_IN_PROGRESS); a slow reader slows it down. Errors: "
        "INVALID_POSITION, INVALID_TOPIC, INVALID_SYMBOL.",
        ReplayData,
    ),
}

REPLIES: dict[str, tuple[str, type[BaseModel] | None]] = {
    "connected": ("Sent first on every connection", ConnectedData),
    "subscribed": ("Reply to subscribe; with `since`, says recovered and replayed", SubscribedData),
    "unsubscribed": ("Reply to unsubscribe", SubscribedData),
    "subscriptions": ("Reply to get_subscriptions", SubscriptionsData),
    "command_result": ("Reply to command", CommandResultData),
    "pong": ("Reply to ping", None),
    "ping": (
        "Server heartbeat every WS_HEARTBEAT_INTERVAL seconds; answer with `pong` (or any message)",
        None,
    ),
    "replay_complete": ("The end of a replay: how many events it sent", ReplayCompleteData),
    "error": ("A message could not be processed, or the server is about to close", ErrorData),
    "stream_reset": (
        "Redis lost the event stream and the worker moved to a new one, or a Redis failover "
        "lost events this worker had not delivered (the same `stream_id`), to every "
        "connection: resume with its `stream_id` from now on",
        StreamResetData,
    ),
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
    ("ConnectedData", "heartbeat_interval"): "Seconds between server `ping` messages (the "
    "first comes 1 to 1.25 intervals after connecting).",
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
    ErrorCode.FORBIDDEN_SUBSCRIPTION: "The API key lacks the `read` scope: it may not "
    "subscribe or replay, and receives no stream event.",
    ErrorCode.SLOW_CONSUMER: "The client did not read its events fast enough. Reconnect and "
    "resume with `since`.",
    ErrorCode.CONNECTION_TIMEOUT: "No message from the client for WS_CONNECTION_TIMEOUT seconds.",
    ErrorCode.INTERNAL_ERROR: "The gateway failed to process the message (logged as a bug).",
    ErrorCode.RATE_LIMITED: "Too many commands; `details` says when to retry.",
    ErrorCode.ENGINE_UNAVAILABLE: "A user action could not reach the remote engine (ENGINE_URL): "
    "it is unreachable or did not answer within ENGINE_TIMEOUT. Retry later; an action that "
    "timed out may still have been carried out.",
    ErrorCode.ENGINE_ERROR: "The remote engine answered outside its contract (logged).",
}

# Close code -> (when, the error code of the `error` message sent just before, if any).
# The close reason is that error code.
CLOSE_NOTES: dict[int, tuple[str, tuple[str, ...]]] = {
    CloseCode.GOING_AWAY: (
        "No message from the client for WS_CONNECTION_TIMEOUT seconds.",
        (ErrorCode.CONNECTION_TIMEOUT,),
    ),
    CloseCode.POLICY_VIOLATION: (
        "The API key is missing or invalid, or the client is a slow consumer.",
        (ErrorCode.AUTHENTICATION_FAILED, ErrorCode.SLOW_CONSUMER),
    ),
    CloseCode.MESSAGE_TOO_BIG: (
        "A client message larger than WS_MAX_MESSAGE_SIZE bytes (closed "
        "by the server at once, without an error message).",
        (),
    ),
    CloseCode.TRY_AGAIN_LATER: (
        "The connection limit is reached.",
        (ErrorCode.MAX_CONNECTIONS_EXCEEDED,),
    ),
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

    def ref(self, model: type[BaseModel], mode: JsonSchemaMode = "serialization") -> dict[str, Any]:
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
        schema = TypeAdapter(annotation).json_schema(ref_template=SCHEMA_REF + "{model}", mode=mode)
        self._hoist(schema)
        return schema

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith(SCHEMA_REF):
            return self.schemas[ref[len(SCHEMA_REF) :]]
        return schema

    def _hoist(self, schema: dict[str, Any]) -> None:
        for name, definition in schema.pop("$defs", {}).items():
            self._add(name, definition)

    def _add(self, name: str, schema: dict[str, Any]) -> None:
        known = self.schemas.setdefault(name, schema)
        if known != schema:
            raise ValueError(f"two different schemas are named {name!r}")
