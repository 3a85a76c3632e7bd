"""Schemas of the WebSocket messages and REST bodies (quart-schema with pydantic).

Models are strict: a string where a list belongs, or `true` where a number belongs, is an error
rather than something silently converted.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_BATCH_EVENTS = 10_000


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# -- client -> server ------------------------------------------------------------------------

class ClientMessage(Strict):
    """Every client message: `{type, data, request_id}`."""

    type: str
    data: dict[str, Any] | None = None
    request_id: str | int | None = None


class SubscriptionData(Strict):
    """`data` of `subscribe` and `unsubscribe`. `since` (subscribe only) resumes after that seq."""

    topics: list[str] = Field(default_factory=list)
    symbols: list[str] = Field(default_factory=list)
    since: int | None = Field(default=None, ge=0)


class CommandData(Strict):
    """`data` of `command`: the command's name; every other field is an argument."""

    model_config = ConfigDict(strict=True, extra="allow")
    command: str


# -- server -> client (documented in the AsyncAPI document) ------------------------------------

class ServerEvent(BaseModel):
    """Every server message. `seq` is on stream events; `request_id` on replies that had one."""

    type: str
    data: Any
    timestamp: str = Field(examples=["2025-12-21T10:30:00.000Z"])
    connection_id: str | None
    seq: int | None = None
    request_id: str | int | None = None


class ErrorData(BaseModel):
    error: str
    code: str
    details: str


class SubscribedData(BaseModel):
    topics: list[str]
    symbols: list[str]
    message: str
    recovered: bool | None = Field(default=None, description="present when `since` was sent")
    replayed: int | None = Field(default=None, description="present when `since` was sent")


class SubscriptionsData(BaseModel):
    topics: list[str]
    symbols: list[str]
    count: int


class ConnectedData(BaseModel):
    message: str
    connection_id: str
    server_version: str
    available_topics: list[str]
    heartbeat_interval: float
    last_seq: int


class CommandResultData(BaseModel):
    command: str
    success: bool
    result: Any


# -- REST --------------------------------------------------------------------------------------

class IngestEvent(BaseModel):
    """One event to publish. `topic` defaults to the one its type belongs to."""

    model_config = ConfigDict(strict=True, extra="forbid")
    type: str = Field(examples=["market_update"])
    topic: str | None = Field(default=None, examples=["market"])
    symbol: str | None = Field(default=None, examples=["BTC/USDT"])
    data: Any = Field(description="delivered to clients exactly as sent: a list for "
                      "market_update, an object otherwise")


class EventBatch(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    events: list[IngestEvent] = Field(max_length=MAX_BATCH_EVENTS)


class IngestResult(BaseModel):
    accepted: int
    first_seq: int | None
    last_seq: int | None


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    version: str
    uptime_seconds: float
    connections: int
    bus_backend: str
    last_seq: int


class ConnectionStats(BaseModel):
    active_connections: int
    fast_path_connections: int
    max_connections: int
    connections_total: int
    connections_rejected: int
    auth_failures: int
    events_published: int
    deliveries: int
    replayed: int
    slow_consumer_closes: int
    timeouts: int
    messages_sent: int
    frames_conflated: int
    queue_depth_total: int
    queue_depth_max: int
    last_seq: int
    bus_backend: str
    subscriptions: dict[str, int]
    uptime_seconds: float


class ErrorResponse(BaseModel):
    error: str
    code: str
    details: str
