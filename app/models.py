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
    stream_id: str | None = Field(default=None, description="the stream `since` belongs to")


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
    stream_id: str
    worker: str


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
    """Liveness (the worker answers) and readiness (status ok: its event stream works)."""

    status: Literal["ok", "degraded"]
    version: str
    uptime_seconds: float
    connections: int
    bus_backend: str
    last_seq: int
    leader: bool = Field(description="this worker runs the simulated producers")
    redis_connected: bool | None = Field(default=None, description="with REDIS_URL only")
    stream_lag: int | None = Field(default=None, description="events behind the stream head")
    receiving: bool | None = Field(
        default=None, description="false: behind the stream head for too long (deaf worker)")
    reason: str | None = None


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
    refusals: dict[str, int] = Field(
        description="Requests refused by each abuse limit: connections, connections_per_key, "
                    "subscriptions, command_rate, message_size, rest_rate")
    uptime_seconds: float
    event_loop_lag_ms: float = Field(description="How late the worker's event loop last woke "
                                                 "a 100 ms timer")
    event_loop_lag_max_ms: float = Field(description="The largest such lag since start")
    rss_bytes: int = Field(description="The worker's resident memory")


class ErrorResponse(BaseModel):
    error: str
    code: str
    details: str


# -- stream event data (what the producers emit; ingest checks external events against these) ---

class EventData(BaseModel):
    """Extra fields are kept: they reach clients as sent."""

    model_config = ConfigDict(strict=True, extra="allow")


class MarketEntry(EventData):
    symbol: str = Field(examples=["BTC/USDT"])
    price: float = Field(examples=[95000.0])
    volume_24h: float = Field(examples=[1000000])
    change_24h: float = Field(examples=[2.5])


class AnalysisData(EventData):
    symbol: str
    decision: Literal["buy", "sell", "hold"]
    confidence: float
    bull_score: float
    bear_score: float
    reasoning: str


class ProposalCreatedData(EventData):
    proposal_id: str
    symbol: str
    action: Literal["buy", "sell"]
    size: float
    reason: str
    created_at: str


class ProposalApprovedData(EventData):
    proposal_id: str
    symbol: str
    action: Literal["buy", "sell"]
    size: float
    approved_by: str | None
    approved_at: str


class ProposalClosedData(EventData):
    proposal_id: str
    status: str
    reason: str | None = None


class TradeExecutedData(EventData):
    proposal_id: str
    symbol: str
    action: Literal["buy", "sell"]
    size: float
    filled_price: float
    order_id: str
    status: str
    fee: float
    timestamp: str


class PositionData(EventData):
    symbol: str
    size: float
    entry_price: float
    current_price: float
    value: float
    pnl: float
    pnl_percent: float


class PortfolioData(EventData):
    total_value: float
    available_cash: float
    positions: list[PositionData]
    total_pnl: float
    total_pnl_percent: float


class HealthData(EventData):
    cpu_percent: float
    memory_percent: float
    disk_percent: float
    process_count: int


class StatusChangeData(EventData):
    status: str


class SystemStatusData(EventData):
    status: str


class AlertData(EventData):
    level: str = Field(examples=["warning"])
    message: str


EVENT_DATA_MODELS: dict[str, Any] = {
    "market_update": list[MarketEntry],
    "analysis_update": AnalysisData,
    "proposal_created": ProposalCreatedData,
    "proposal_approved": ProposalApprovedData,
    "proposal_rejected": ProposalClosedData,
    "proposal_expired": ProposalClosedData,
    "trade_executed": TradeExecutedData,
    "portfolio_update": PortfolioData,
    "health_update": HealthData,
    "status_change": StatusChangeData,
    "system_status": SystemStatusData,
    "alert": AlertData,
}


# -- trading REST bodies -------------------------------------------------------------------------

class ProposalOut(BaseModel):
    proposal_id: str
    symbol: str
    action: str
    size: float
    reason: str
    confidence: float | None
    source: str
    status: str
    created_at: str
    expires_at: str
    decided_by: str | None
    decided_at: str | None
    status_reason: str | None


# A trade in REST answers is the `trade_executed` data.
TradeOut = TradeExecutedData


class ProposalPage(BaseModel):
    items: list[ProposalOut]
    total: int
    limit: int
    offset: int


class TradePage(BaseModel):
    items: list[TradeOut]
    total: int
    limit: int
    offset: int


class ProposalQuery(BaseModel):
    status: Literal["pending", "approved", "executed", "rejected", "expired"] | None = None
    symbol: str | None = None
    limit: int = Field(default=50, ge=1, le=500)
    offset: int = Field(default=0, ge=0)


class PageQuery(BaseModel):
    limit: int = Field(default=50, ge=1, le=500)
    offset: int = Field(default=0, ge=0)


class NewProposal(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    symbol: str = Field(examples=["BTC/USDT"])
    action: Literal["buy", "sell"]
    size: float | None = Field(default=None, gt=0, description="default: sized by the risk rule")
    reason: str = Field(default="Manual proposal", max_length=500)


class Decision(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    reason: str | None = Field(default=None, max_length=500)


class BulkDecision(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    proposal_ids: list[str] = Field(min_length=1, max_length=500)
    reason: str | None = Field(default=None, max_length=500)


class DecisionResult(BaseModel):
    proposal: ProposalOut
    trade: TradeOut | None = None


class BulkItem(BaseModel):
    proposal_id: str
    ok: bool
    status: str | None = None
    error: ErrorResponse | None = None


class BulkResult(BaseModel):
    results: list[BulkItem]
    succeeded: int
    failed: int


class EngineState(BaseModel):
    status: Literal["running", "paused"]
    changed: bool


class MarketSnapshot(BaseModel):
    symbols: list[MarketEntry]
