"""The wire vocabulary: topics, event types, symbols, error codes, and the event envelope.

An `Event` is what the bus carries: published once, stamped with a deployment-wide `seq`, and
serialized once for every connection that receives it.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

import orjson

SERVER_VERSION = "2.0.0"

TOPICS = (
    "all",
    "proposals",
    "executions",
    "analysis",
    "status",
    "market",
    "portfolio",
    "health",
    "alerts",
)
PUBLISHABLE_TOPICS = frozenset(TOPICS) - {"all"}

# Each stream event type and the topic that carries it (the spec's Events table).
EVENT_TOPICS: dict[str, str] = {
    "analysis_update": "analysis",
    "proposal_created": "proposals",
    "proposal_approved": "proposals",
    "proposal_rejected": "proposals",
    "proposal_expired": "proposals",
    "trade_executed": "executions",
    "status_change": "status",
    "system_status": "status",
    "market_update": "market",
    "portfolio_update": "portfolio",
    "health_update": "health",
    "alert": "alerts",
    "warning": "alerts",  # the original engine's alert-like event
}

# Snapshots: a newer one replaces an older one still waiting for a slow connection.
CONFLATABLE_TYPES = frozenset(
    {"market_update", "portfolio_update", "system_status", "health_update"}
)

# Events whose data is a list of per-symbol entries: a connection subscribed only through
# `symbol:X` receives the entries of its symbols only.
PER_SYMBOL_LIST_TYPES = frozenset({"market_update"})

SYMBOL_PREFIX = "symbol:"
_SYMBOL_RE = re.compile(r"[A-Z0-9]{1,20}/[A-Z0-9]{1,20}")


class ErrorCode:
    INVALID_TOPIC = "INVALID_TOPIC"
    INVALID_SYMBOL = "INVALID_SYMBOL"
    MESSAGE_PROCESSING_ERROR = "MESSAGE_PROCESSING_ERROR"
    MAX_CONNECTIONS_EXCEEDED = "MAX_CONNECTIONS_EXCEEDED"
    AUTHENTICATION_FAILED = "AUTHENTICATION_FAILED"
    FORBIDDEN_COMMAND = "FORBIDDEN_COMMAND"
    FORBIDDEN_SUBSCRIPTION = "FORBIDDEN_SUBSCRIPTION"  # a key without `read`: no stream
    SLOW_CONSUMER = "SLOW_CONSUMER"
    CONNECTION_TIMEOUT = "CONNECTION_TIMEOUT"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    RATE_LIMITED = "RATE_LIMITED"
    TOO_MANY_SUBSCRIPTIONS = "TOO_MANY_SUBSCRIPTIONS"
    ENGINE_UNAVAILABLE = "ENGINE_UNAVAILABLE"
    ENGINE_ERROR = "ENGINE_ERROR"
    INVALID_POSITION = "INVALID_POSITION"  # since/until of a replay or an export
    REPLAY_IN_PROGRESS = "REPLAY_IN_PROGRESS"


class CloseCode:
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    TRY_AGAIN_LATER = 1013


def normalize_symbol(value: str) -> str | None:
    """`btc/usdt` -> `BTC/USDT`; None when the value is not BASE/QUOTE."""
    symbol = value.strip().upper()
    return symbol if _SYMBOL_RE.fullmatch(symbol) else None


def utc_timestamp(epoch: float | None = None) -> str:
    """UTC ISO 8601 with milliseconds and `Z`, as in the spec's examples."""
    moment = datetime.fromtimestamp(time.time() if epoch is None else epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def envelope(type_: str, data: Any, connection_id: str | None, request_id: Any = None) -> str:
    """A direct message to one connection, serialized."""
    message: dict[str, Any] = {
        "type": type_,
        "data": data,
        "timestamp": utc_timestamp(),
        "connection_id": connection_id,
    }
    if request_id is not None:
        message["request_id"] = request_id
    return dumps(message)


class Event:
    """One stream event. `data` is kept as given; its JSON is built once, on creation.

    `symbols` are the routing symbols: the event's own `symbol` and, for per-symbol lists, the
    symbols of its entries.
    """

    __slots__ = (
        "type",
        "topic",
        "symbol",
        "symbols",
        "data",
        "data_json",
        "timestamp",
        "created",
        "seq",
        "frame",
        "wire",
        "conflation_key",
    )

    def __init__(
        self,
        type_: str,
        data: Any,
        *,
        topic: str | None = None,
        symbol: str | None = None,
        data_json: str | None = None,
        created: float | None = None,
    ) -> None:
        self.type = type_
        self.topic = topic or EVENT_TOPICS[type_]
        self.symbol = symbol
        self.data = data
        # Serializing here makes an unserializable payload fail at the publisher, not in fan-out.
        self.data_json = dumps(data) if data_json is None else data_json
        self.symbols = _routing_symbols(type_, data, symbol)
        self.created = time.time() if created is None else created
        self.timestamp = utc_timestamp(self.created)
        self.seq = 0
        self.frame = ""
        self.wire = b""
        self.conflation_key = _conflation_key(type_, self.symbols)

    def stamp(self, seq: int) -> None:
        """Give the event its place in the stream and build the frame every subscriber gets.
        (`wire`, the same as a WebSocket frame, is the connection layer's, built once there.)"""
        self.seq = seq
        self.frame = self.render(self.data_json)
        self.wire = b""

    def render(self, data_json: str) -> str:
        return (
            f'{{"type":"{self.type}","data":{data_json},"timestamp":"{self.timestamp}",'
            f'"connection_id":null,"seq":{self.seq}}}'
        )

    def view_for(self, symbols: frozenset[str]) -> str:
        """The frame restricted to the entries of `symbols` (per-symbol lists only)."""
        if self.type not in PER_SYMBOL_LIST_TYPES:
            return self.frame
        data = orjson.loads(self.data_json) if self.data is None else self.data
        if not isinstance(data, list):
            return self.frame
        entries = [e for e in data if isinstance(e, dict) and e.get("symbol") in symbols]
        if len(entries) == len(data):
            return self.frame
        return self.render(dumps(entries))

    def to_history(self) -> HistoryEntry:
        """The stamped event as the resume history keeps it: its frame and routing atoms in a
        tuple of strings and numbers, which the garbage collector stops tracking (a history
        of parsed payloads was most of what a full collection had to scan)."""
        return (
            self.seq,
            self.created,
            self.type,
            self.topic,
            self.symbol,
            self.symbols,
            self.data_json,
            self.frame,
        )

    @classmethod
    def from_history(cls, entry: HistoryEntry) -> Event:
        """The event again, for a replay; its data is parsed only if a view needs it. An entry
        without its frame (from the archive) gets it built here."""
        event = cls.__new__(cls)
        (
            event.seq,
            event.created,
            event.type,
            event.topic,
            event.symbol,
            event.symbols,
            event.data_json,
            event.frame,
        ) = entry
        event.data = None
        event.timestamp = utc_timestamp(event.created)
        if not event.frame:
            event.frame = event.render(event.data_json)
        event.wire = b""
        event.conflation_key = _conflation_key(event.type, event.symbols)
        return event

    def encode(self) -> tuple[bytes, bytes]:
        """The event for another process (the Redis stream): its routing fields, and its data
        as already serialized. `decode` reverses it."""
        meta = orjson.dumps(
            {"type": self.type, "topic": self.topic, "symbol": self.symbol, "created": self.created}
        )
        return meta, self.data_json.encode()

    @classmethod
    def decode(cls, meta: bytes, data_json: bytes) -> Event:
        fields = orjson.loads(meta)
        text = data_json.decode()
        return cls(
            fields["type"],
            orjson.loads(text),
            topic=fields["topic"],
            symbol=fields["symbol"],
            created=fields["created"],
            data_json=text,
        )


# seq, created, type, topic, symbol, routing symbols, data as JSON, frame: see Event.to_history.
HistoryEntry = tuple[int, float, str, str, str | None, tuple[str, ...], str, str]


def _conflation_key(type_: str, symbols: tuple[str, ...]) -> tuple[str, str | None] | None:
    if type_ not in CONFLATABLE_TYPES:
        return None
    return (type_, symbols[0] if len(symbols) == 1 else None)


def _routing_symbols(type_: str, data: Any, symbol: str | None) -> tuple[str, ...]:
    symbols: list[str] = [symbol] if symbol else []
    if type_ in PER_SYMBOL_LIST_TYPES and isinstance(data, list):
        for entry in data:
            entry_symbol = entry.get("symbol") if isinstance(entry, dict) else None
            if isinstance(entry_symbol, str) and entry_symbol not in symbols:
                symbols.append(entry_symbol)
    return tuple(symbols)
