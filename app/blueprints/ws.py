"""`/api/ws`: the SIGMAX WebSocket protocol.

Each connection has one task, its handler, which reads, parses and answers client messages;
events are written by the connection (at once, or by a writer task while the client is behind).
A bad message gets an `error` event and the connection stays open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
from quart import Blueprint, Quart
from quart_schema.conversion import model_load
from quart_schema.mixins import SchemaValidationError

from app.errors import GatewayError, describe_validation_error, error_event, excerpt, quoted
from app.logs import Throttled, worker_id
from app.models import ClientMessage, CommandData, ReplayData, SubscriptionData
from app.services.archive import event_filter
from app.services.commands import COMMANDS, parse_symbol
from app.services.connections import Connection, ConnectionLimitExceeded
from app.services.engines import Caller
from app.services.events import (
    SERVER_VERSION,
    SYMBOL_PREFIX,
    TOPICS,
    CloseCode,
    ErrorCode,
    envelope,
)
from app.services.gateway import Gateway
from app.services.ratelimit import TokenBucket
from app.services.replay import start_replay
from app.services.transport import Disconnected, WebSocket, asgi_websocket, open_writer

log = logging.getLogger(__name__)
refusals = Throttled(log)  # anyone can make the gateway refuse: a line per 10 s

# Which worker process serves the connection: useful when several share a port.

ws_bp = Blueprint("ws", __name__)

MESSAGE_TYPES = (
    "subscribe",
    "unsubscribe",
    "ping",
    "pong",
    "command",
    "get_status",
    "get_subscriptions",
    "replay",
)


@asgi_websocket(ws_bp, "/api/ws")
async def gateway_socket(app: Quart, socket: WebSocket) -> None:
    """The event stream: subscribe to topics and symbols, receive events, send commands.

    Served at the ASGI level (app/services/transport.py): one task per connection, this one,
    reading; frames are written by the connection."""
    gateway: Gateway = app.extensions["gateway"]
    if not _origin_allowed(socket, gateway.config.CORS_ORIGINS):
        await socket.reject(403, "Origin not allowed")
        return
    await socket.accept()
    # The query string is parsed only when there is one: most clients send none.
    presented = socket.query("api_key") or socket.header("x-api-key")
    principal = await gateway.api_keys.authenticate(presented)
    if principal is None:
        gateway.manager.refuse_authentication()
        refusals.info(
            "refused a WebSocket from %s: %s",
            socket.remote_addr,
            "wrong API key" if presented else "no API key",
        )
        await _refuse(
            socket,
            CloseCode.POLICY_VIOLATION,
            ErrorCode.AUTHENTICATION_FAILED,
            "Invalid API key" if presented else "Missing API key",
            "Pass a valid key as ?api_key= or in the X-API-Key header"
            if presented
            else "This gateway requires an API key (?api_key= or X-API-Key)",
        )
        return
    try:
        connection_id = await gateway.manager.connect(
            socket,
            {
                "principal": principal.name,
                "scopes": principal.scopes,
                "remote": socket.remote_addr,
            },
        )
    except ConnectionLimitExceeded as limit:
        refusals.info(
            "refused a WebSocket of %s from %s: %s", principal.name, socket.remote_addr, limit
        )
        await _refuse(
            socket,
            CloseCode.TRY_AGAIN_LATER,
            ErrorCode.MAX_CONNECTIONS_EXCEEDED,
            "Connection limit reached",
            f"{limit}; retry later",
        )
        return
    conn = gateway.manager.connections[connection_id]
    conn.send_direct(
        envelope(
            "connected",
            {
                "message": "Connected to SIGMAX",
                "connection_id": conn.id,
                "server_version": SERVER_VERSION,
                "available_topics": list(TOPICS),
                "heartbeat_interval": gateway.config.WS_HEARTBEAT_INTERVAL,
                "worker": worker_id(),
                "last_seq": gateway.bus.head,
                "stream_id": gateway.bus.stream_id,
            },
            conn.id,
        )
    )
    if principal.can("read"):  # the state is the read scope's
        conn.send_direct(envelope("system_status", gateway.system_status(), conn.id))
    conn.attach()
    try:
        while True:
            raw = await socket.receive()
            conn.touch()
            await handle_message(gateway, conn, raw)
    except Disconnected:
        pass
    finally:
        conn.detach()
        gateway.manager.forget(conn)
        if conn.replay is not None:  # cancelled: let it finish the database read it is in
            await asyncio.wait([conn.replay])


def _origin_allowed(socket: WebSocket, allowed: tuple[str, ...]) -> bool:
    """Browsers send Origin: only configured origins and the gateway's own pages may connect
    (no cross-site WebSocket hijacking). Other clients (strategies) send none."""
    origin = socket.header("origin")
    if origin is None or origin in allowed or "*" in allowed:
        return True
    return urlsplit(origin).netloc == socket.header("host")


async def _refuse(socket: WebSocket, close_code: int, code: str, error: str, details: str) -> None:
    """Tell the client why with an error event, then close with `close_code`."""
    refusal = GatewayError(code, error, details)
    writer = open_writer(socket.scope)
    await writer.refuse(error_event(refusal, None), close_code, code)


async def handle_message(gateway: Gateway, conn: Connection, raw: str | bytes | None) -> None:
    """Parse one client message and answer it; every failure becomes an `error` event."""
    request_id: str | int | None = None
    try:
        payload = _parse(raw)
        candidate = payload.get("request_id")
        if isinstance(candidate, (str, int)) and not isinstance(candidate, bool):
            request_id = candidate
        message = _load(payload, ClientMessage)
        handler = HANDLERS.get(message.type)
        if handler is None:
            raise GatewayError(
                ErrorCode.MESSAGE_PROCESSING_ERROR,
                "Unknown message type",
                f"Message type {quoted(message.type)} is not one of {', '.join(MESSAGE_TYPES)}",
            )
        if message.type in READ_MESSAGES and "read" not in conn.scopes:
            raise GatewayError(
                ErrorCode.FORBIDDEN_SUBSCRIPTION,
                "Not allowed",
                f"{message.type!r} needs an API key with the 'read' scope",
            )
        await handler(gateway, conn, message)
    except GatewayError as error:
        conn.send_direct(error_event(error, conn.id, request_id))
    except Exception:
        # A bug, not the client's fault: logged, answered, and the connection stays usable.
        log.exception("message of connection %s failed", conn.id)
        conn.send_direct(
            error_event(
                GatewayError(
                    ErrorCode.INTERNAL_ERROR,
                    "Internal error",
                    "The gateway failed to process this message; it has been logged",
                ),
                conn.id,
                request_id,
            )
        )


def _parse(raw: str | bytes | None) -> dict[str, Any]:
    if not raw:  # Quart gives None for an empty binary frame
        raise GatewayError(
            ErrorCode.MESSAGE_PROCESSING_ERROR, "Empty message", "Send one JSON object per message"
        )
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise GatewayError(
            ErrorCode.MESSAGE_PROCESSING_ERROR, "Invalid JSON", f"{error}: {_excerpt(raw)}"
        ) from None
    if not isinstance(payload, dict):
        raise GatewayError(
            ErrorCode.MESSAGE_PROCESSING_ERROR,
            "Message must be a JSON object",
            f"Got {type(payload).__name__}: {_excerpt(raw)}",
        )
    return payload


def _excerpt(raw: str | bytes) -> str:
    return excerpt(repr(raw if isinstance(raw, str) else raw.decode("utf-8", "replace")), 80)


def _load(data: dict[str, Any], model: type[Any]) -> Any:
    # model_load is what quart-schema's `websocket.receive_as` uses; the message is parsed first
    # so that an invalid one can still be answered with its request_id.
    try:
        return model_load(data, model, SchemaValidationError)
    except SchemaValidationError as error:
        raise GatewayError(
            ErrorCode.MESSAGE_PROCESSING_ERROR,
            "Invalid message",
            describe_validation_error(error.validation_error),
        ) from None


def _subscription(message: ClientMessage) -> tuple[list[str], list[str], SubscriptionData]:
    """Validated, normalised (topics, symbols, data), each once and in the order given;
    `symbol:X` topics count as symbols."""
    data: SubscriptionData = _load(message.data or {}, SubscriptionData)
    # Dicts, not lists, keep the first occurrence: a list's `in` made a subscribe of n
    # symbols quadratic (10,000 of them blocked the event loop for half a second).
    topics: dict[str, None] = {}
    symbols: dict[str, None] = {}
    for raw_topic in data.topics:
        topic = raw_topic.strip().lower()
        if topic.startswith(SYMBOL_PREFIX):
            symbols[parse_symbol(raw_topic.strip()[len(SYMBOL_PREFIX) :])] = None
        elif topic in TOPICS:
            topics[topic] = None
        else:
            raise GatewayError(
                ErrorCode.INVALID_TOPIC,
                "Invalid subscription topic",
                f"Topic {quoted(raw_topic)} does not exist; available: {', '.join(TOPICS)}",
            )
    for raw_symbol in data.symbols:
        symbols[parse_symbol(raw_symbol)] = None
    return list(topics), list(symbols), data


def _keys(topics: list[str], symbols: list[str]) -> list[str]:
    return topics + [SYMBOL_PREFIX + s for s in symbols]


async def _subscribe(gateway: Gateway, conn: Connection, message: ClientMessage) -> None:
    topics, symbols, data = _subscription(message)
    since = data.since
    keys = _keys(topics, symbols)
    limit = gateway.config.WS_MAX_SUBSCRIPTIONS
    total = len(conn.keys.union(keys))
    if total > limit:
        gateway.manager.refuse("subscriptions")
        raise GatewayError(
            ErrorCode.TOO_MANY_SUBSCRIPTIONS,
            "Too many subscriptions",
            f"A connection may hold {limit} topics and symbols; this subscribe would make {total}",
        )
    reply: dict[str, Any] = {
        "topics": topics,
        "symbols": symbols,
        "message": f"Subscribed to {len(topics)} topics and {len(symbols)} symbols",
    }

    def acknowledge(replayed: int, recovered: bool) -> None:
        if since is not None:
            reply["recovered"] = recovered
            reply["replayed"] = replayed
        conn.send_direct(envelope("subscribed", reply, conn.id, message.request_id))

    await gateway.manager.subscribe_with_resume(conn, keys, since, acknowledge, data.stream_id)


async def _unsubscribe(gateway: Gateway, conn: Connection, message: ClientMessage) -> None:
    topics, symbols, _ = _subscription(message)
    for key in _keys(topics, symbols):
        await gateway.manager.unsubscribe(conn.id, key)
    conn.send_direct(
        envelope(
            "unsubscribed",
            {
                "topics": topics,
                "symbols": symbols,
                "message": f"Unsubscribed from {len(topics)} topics and {len(symbols)} symbols",
            },
            conn.id,
            message.request_id,
        )
    )


async def _ping(gateway: Gateway, conn: Connection, message: ClientMessage) -> None:
    conn.send_direct(envelope("pong", {}, conn.id, message.request_id))


async def _pong(gateway: Gateway, conn: Connection, message: ClientMessage) -> None:
    pass  # receiving it already counted as traffic


async def _get_status(gateway: Gateway, conn: Connection, message: ClientMessage) -> None:
    conn.send_direct(
        envelope("system_status", gateway.system_status(), conn.id, message.request_id)
    )


async def _get_subscriptions(gateway: Gateway, conn: Connection, message: ClientMessage) -> None:
    topics = sorted(k for k in conn.keys if not k.startswith(SYMBOL_PREFIX))
    conn.send_direct(
        envelope(
            "subscriptions",
            {
                "topics": topics,
                "symbols": sorted(conn.symbols),
                "count": len(conn.keys),
            },
            conn.id,
            message.request_id,
        )
    )


async def _command(gateway: Gateway, conn: Connection, message: ClientMessage) -> None:
    data: CommandData = _load(message.data or {}, CommandData)
    command = COMMANDS.get(data.command)
    if command is None:
        raise GatewayError(
            ErrorCode.MESSAGE_PROCESSING_ERROR,
            "Unknown command",
            f"Command {quoted(data.command)} is not one of {', '.join(sorted(COMMANDS))}",
        )
    bucket = conn.command_bucket
    if bucket is None:
        config = gateway.config
        bucket = conn.command_bucket = TokenBucket(config.WS_COMMAND_RATE, config.WS_COMMAND_BURST)
    wait = bucket.take()
    if wait:
        gateway.manager.refuse("command_rate")
        raise GatewayError(
            ErrorCode.RATE_LIMITED,
            "Too many commands",
            f"At most {bucket.rate:g} commands per second (bursts of "
            f"{bucket.burst:g}); retry in {wait:.2f} s",
        )
    if command.scope not in conn.scopes:
        raise GatewayError(
            ErrorCode.FORBIDDEN_COMMAND,
            "Command not allowed",
            f"Command {quoted(data.command)} needs an API key with the {command.scope!r} scope",
        )
    try:
        args = model_load(data.model_extra or {}, command.arguments, SchemaValidationError)
    except SchemaValidationError as error:
        raise GatewayError(
            ErrorCode.MESSAGE_PROCESSING_ERROR,
            "Invalid command arguments",
            f"Command {quoted(data.command)}: {describe_validation_error(error.validation_error)}",
        ) from None
    result = await command.run(gateway, Caller(conn.principal, message.request_id), args)
    if command.reply != "command_result":
        conn.send_direct(envelope(command.reply, result, conn.id, message.request_id))
        return
    conn.send_direct(
        envelope(
            "command_result",
            {
                "command": data.command,
                "success": True,
                "result": result,
            },
            conn.id,
            message.request_id,
        )
    )


async def _replay(gateway: Gateway, conn: Connection, message: ClientMessage) -> None:
    data: ReplayData = _load(message.data or {}, ReplayData)
    wanted = event_filter(
        None if data.since is None else str(data.since),
        None if data.until is None else str(data.until),
        [topic for topic in data.topics if topic != "all"],
        data.symbols,
    )
    start_replay(
        gateway.archive,
        conn,
        wanted,
        data.speed,
        message.request_id,
        gateway.config.WS_SEND_QUEUE_SIZE,
    )


Handler = Callable[[Gateway, Connection, ClientMessage], Awaitable[None]]
# The stream and the state are the `read` scope's, on the WebSocket as on REST (commands carry
# their own scope).
READ_MESSAGES = frozenset({"subscribe", "replay", "get_status"})
HANDLERS: dict[str, Handler] = {
    "subscribe": _subscribe,
    "unsubscribe": _unsubscribe,
    "ping": _ping,
    "pong": _pong,
    "command": _command,
    "get_status": _get_status,
    "get_subscriptions": _get_subscriptions,
    "replay": _replay,
}
