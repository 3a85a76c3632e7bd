"""Schemas of the WebSocket messages and REST bodies (quart-schema with pydantic).

Models are strict: a string where a list belongs, or `true` where a number belongs, is an error
rather than something silently converted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, create_model
from typing_extensions import TypeAliasType

from app.services.events import EVENT_TOPICS, PUBLISHABLE_TOPICS

MAX_BATCH_EVENTS = 10_000
# The smallest proposal size: sizes are kept to 8 decimals.
MIN_PROPOSAL_SIZE = 1e-8
# A symbol as clients may write it (BASE/QUOTE, any case), and as the stream carries it.
SYMBOL_PATTERN = r"^[A-Za-z0-9]{1,20}/[A-Za-z0-9]{1,20}$"
CANONICAL_SYMBOL_PATTERN = r"^[A-Z0-9]{1,20}/[A-Z0-9]{1,20}$"
# In a request model's JSON schema, marks a field whose OpenAPI schema lists the symbols the
# gateway trades (SYMBOLS, a setting: the OpenAPI document fills them in).
TRADED_SYMBOL = "x-traded-symbol"
# The largest offset a page query may ask for: a 64-bit SQL integer.
MAX_OFFSET = 2**63 - 1


def _integral(value: Any) -> Any:
    # JSON Schema's integer: 2.0 is one, which strict mode alone would refuse (true and "2" it
    # still refuses).
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer the gateway can send on (orjson writes 64 bits, signed or not).
SerializableInt = Annotated[int, Field(ge=-(2**63), le=2**64 - 1), BeforeValidator(_integral)]
JsonValue = TypeAliasType(
    "JsonValue",
    "None | bool | SerializableInt | float | str | list[JsonValue] | dict[str, JsonValue]",
)


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


class ReplayData(Strict):
    """`data` of `replay`: archived events between two positions (a seq, or an RFC 3339 time),
    of some topics and symbols, paced at `speed` times their original spacing."""

    since: int | str | None = Field(
        default=None, description="after this seq, or at or after this time; default: the oldest"
    )
    until: int | str | None = Field(
        default=None, description="up to this seq or time; default: the newest archived"
    )
    topics: list[str] = Field(default_factory=list, description="the events' own topics; none: all")
    symbols: list[str] = Field(default_factory=list, description="events carrying one of these")
    speed: float = Field(
        default=0, ge=0, le=1_000_000, description="times the original pace; 0: as fast as read"
    )


class ReplayCompleteData(BaseModel):
    count: int = Field(description="events replayed")
    last_seq: int | None = Field(description="the seq of the last one (null: none)")


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


class StreamResetData(BaseModel):
    stream_id: str = Field(
        description="The stream (new, or the same after a failover): send it with `since` "
        "from now on"
    )
    last_seq: int = Field(description="The stream continues after this seq")
    recovered: bool = Field(
        description="false: events up to `last_seq` may be missing; reload state over REST"
    )
    reason: str


# -- REST --------------------------------------------------------------------------------------


class IngestEvent(BaseModel):
    """One event to publish. `topic` defaults to the one its type belongs to."""

    model_config = ConfigDict(strict=True, extra="forbid")
    type: str = Field(examples=["market_update"])
    topic: str | None = Field(default=None, examples=["market"])
    symbol: str | None = Field(default=None, examples=["BTC/USDT"])
    data: Any = Field(
        description="delivered to clients exactly as sent: a list for "
        "market_update, an object otherwise"
    )


POSITION = (
    "A seq (events after it) or an RFC 3339 time (events at or after it, for `since`; at or "
    "before it, to the millisecond, for `until`)"
)
POSITION_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {"type": "string", "pattern": "^[0-9]{1,18}$"},
            {"type": "string", "format": "date-time"},
        ]
    }
)
_TOPIC_NAMES = "|".join(sorted(PUBLISHABLE_TOPICS))
TOPIC_LIST_PATTERN = f"^({_TOPIC_NAMES})(,({_TOPIC_NAMES}))*$"
_SYMBOL = SYMBOL_PATTERN.strip("^$")
SYMBOL_LIST_PATTERN = f"^{_SYMBOL}(,{_SYMBOL})*$"
EXPORT_LIMIT = 1_000_000


class EventQuery(BaseModel):
    since: Annotated[str, POSITION_SCHEMA] | None = Field(
        default=None,
        description=f"{POSITION}; left out: from the oldest archived event",
        examples=["1200"],
    )
    until: Annotated[str, POSITION_SCHEMA] | None = Field(
        default=None,
        description=f"{POSITION}; left out: up to the newest archived event",
        examples=["2026-12-03T10:00:00Z"],
    )
    topic: str | None = Field(
        default=None,
        description="Only events of these topics, comma-separated (the event's own topic)",
        examples=["market,alerts"],
        json_schema_extra={"pattern": TOPIC_LIST_PATTERN},
    )
    symbol: str | None = Field(
        default=None,
        description="Only events carrying one of these symbols, comma-separated (BASE/QUOTE)",
        examples=["BTC/USDT"],
        json_schema_extra={"pattern": SYMBOL_LIST_PATTERN},
    )
    limit: int = Field(
        default=10_000, ge=1, le=EXPORT_LIMIT, description="At most this many events, oldest first"
    )


class ArchivedEvent(BaseModel):
    """One line of `GET /api/events`: an archived stream event."""

    seq: int = Field(description="Its place in the stream, as live delivery gave it")
    stream_id: str = Field(description="The stream it was published in")
    type: str
    topic: str
    symbol: str | None
    timestamp: str = Field(description="When it was published, UTC ISO 8601")
    data: Any


class EventBatch(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    events: list[IngestEvent] = Field(max_length=MAX_BATCH_EVENTS)


# An Idempotency-Key header: 1-200 printable ASCII characters.
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[!-~]+$")]


class IngestHeaders(BaseModel):
    idempotency_key: IdempotencyKey | None = Field(
        None,
        description="Unique per batch, the same on every retry of it (for example a UUID): a "
        "retry within EVENT_HISTORY_MAX_AGE, to any worker or host, answers the "
        "first result and publishes nothing",
    )


class ActionHeaders(BaseModel):
    idempotency_key: IdempotencyKey | None = Field(
        None,
        description="Unique per action, the same on every retry of it: the engine carries the "
        "action out once (a remote engine receives it, per proposal in a bulk call)",
    )


class IngestResult(BaseModel):
    accepted: int
    first_seq: int | None
    last_seq: int | None
    repeated: bool = Field(
        False,
        description="This Idempotency-Key was published before: "
        "its result, nothing was published again",
    )


class Liveness(BaseModel):
    """The worker's event loop serves: never failed for a dependency."""

    status: Literal["ok"]
    worker: str = Field(description="the worker that answered: host and process id")
    uptime_seconds: float


class Health(BaseModel):
    """Readiness: status ok while the worker's event stream works and its database answers."""

    status: Literal["ok", "degraded"]
    version: str
    worker: str = Field(
        description="the worker that answered: host and process id, as its log lines name it"
    )
    uptime_seconds: float
    connections: int
    bus_backend: str
    last_seq: int
    leader: bool = Field(description="this worker runs the simulated producers")
    redis_mode: str | None = Field(
        default=None, description="with Redis only: standalone, sentinel or cluster"
    )
    redis_connected: bool | None = Field(default=None, description="with Redis only")
    stream_lag: int | None = Field(default=None, description="events behind the stream head")
    receiving: bool | None = Field(
        default=None, description="false: behind the stream head for too long (deaf worker)"
    )
    engine_reachable: bool | None = Field(
        default=None,
        description="the remote engine (ENGINE_URL) answers; null with the paper engine. "
        "Not part of `status`: the stream is served while the engine is away",
    )
    database_backend: str = Field(description="sqlite or postgresql")
    database_available: bool | None = Field(
        default=None,
        description="the database answered when last used (null: not used yet); false: "
        "requests that need it answer 503 DATABASE_UNAVAILABLE",
    )
    api_keys_age_seconds: float | None = Field(
        default=None,
        description="seconds since the stored API keys were last read: they stay in force "
        "while the database is away, for API_KEY_CACHE_MAX_AGE at most",
    )
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
        "subscriptions, command_rate, message_size, rest_rate"
    )
    uptime_seconds: float
    event_loop_lag_ms: float = Field(
        description="How late the worker's event loop last woke a 100 ms timer"
    )
    event_loop_lag_max_ms: float = Field(description="The largest such lag since start")
    rss_bytes: int = Field(description="The worker's resident memory")
    gc_full_collections: int = Field(
        description="Full garbage collections since start: Python's own and the GC_INTERVAL "
        "timer's (none with the default settings unless the long-lived objects grow by a quarter)"
    )
    gc_pause_ms: float = Field(description="How long the last of them blocked the worker")
    gc_pause_max_ms: float = Field(description="The longest of them")
    gc_young_pause_max_ms: float = Field(
        description="The longest collection of the young generations"
    )


class ErrorResponse(BaseModel):
    error: str
    code: str
    details: str
    proposal_status: str | None = Field(
        default=None,
        description="PROPOSAL_ALREADY_DECIDED: what the proposal is now "
        "(approved, executed, rejected, expired)",
    )


# -- stream event data ---------------------------------------------------------------------------
# What the gateway's producers emit, and what ingest checks an external engine's events against.
# Ingest relays the data as sent: every field is optional (the original SIGMAX engine leaves many
# out), a field that is present must have its type, and unknown fields are kept.


class EventData(BaseModel):
    """Extra fields are kept: they reach clients as sent."""

    model_config = ConfigDict(strict=True, extra="allow")
    __pydantic_extra__: dict[str, JsonValue]


# A symbol inside event data: BASE/QUOTE as the stream carries it.
DataSymbol = Annotated[str, Field(examples=["BTC/USDT"], pattern=CANONICAL_SYMBOL_PATTERN)]
Action = Literal["buy", "sell"]


class MarketEntry(EventData):
    symbol: DataSymbol = Field(description="routes the entry to `symbol:X` subscribers")
    price: float | None = Field(default=None, examples=[95000.0])
    volume_24h: float | None = Field(default=None, examples=[1000000])
    change_24h: float | None = Field(default=None, examples=[2.5])


class AnalysisData(EventData):
    symbol: DataSymbol | None = None
    decision: Literal["buy", "sell", "hold"] | None = None
    confidence: float | None = None
    bull_score: float | None = None
    bear_score: float | None = None
    reasoning: str | None = None


class ProposalCreatedData(EventData):
    proposal_id: str | None = None
    symbol: DataSymbol | None = None
    action: Action | None = None
    size: float | None = None
    reason: str | None = None
    created_at: str | None = None
    confidence: float | None = Field(
        default=None, description="the analysis behind it; null for a manual proposal"
    )
    source: str | None = Field(default=None, description="`analysis` or `manual`")
    expires_at: str | None = Field(default=None, description="pending until then (PROPOSAL_TTL)")
    requested_by: str | None = Field(default=None, description="who proposed it (manual proposals)")


class ProposalApprovedData(EventData):
    proposal_id: str | None = None
    symbol: DataSymbol | None = None
    action: Action | None = None
    size: float | None = None
    approved_by: str | None = None
    approved_at: str | None = None


class ProposalClosedData(EventData):
    proposal_id: str | None = None
    status: str | None = None
    reason: str | None = None


class TradeExecutedData(EventData):
    proposal_id: str | None = None
    symbol: DataSymbol | None = None
    action: Action | None = None
    size: float | None = None
    filled_price: float | None = None
    order_id: str | None = None
    status: str | None = None
    fee: float | None = None
    timestamp: str | None = None


class PositionData(EventData):
    symbol: DataSymbol | None = None
    size: float | None = None
    entry_price: float | None = None
    current_price: float | None = None
    value: float | None = None
    pnl: float | None = None
    pnl_percent: float | None = None


class PortfolioData(EventData):
    total_value: float | None = None
    available_cash: float | None = None
    positions: list[PositionData] | None = None
    total_pnl: float | None = None
    total_pnl_percent: float | None = None


class HealthData(EventData):
    cpu_percent: float | None = None
    memory_percent: float | None = None
    disk_percent: float | None = None
    process_count: SerializableInt | None = None


class StatusChangeData(EventData):
    status: str | None = Field(default=None, description="the gateway's own notices")
    previous_status: str | None = Field(default=None, description="the original engine's")
    current_status: str | None = Field(default=None, description="the original engine's")
    reason: str | None = None


class EngineInfo(EventData):
    mode: Literal["paper", "remote"] | None = Field(
        default=None, description="the built-in paper engine, or ENGINE_URL"
    )
    reachable: bool | None = Field(
        default=None, description="the remote engine answers; null with the paper one"
    )


class MarketFeedInfo(EventData):
    source: str | None = Field(
        default=None, examples=["simulated", "ccxt:binance"], description="MARKET_FEED"
    )
    healthy: bool | None = Field(
        default=None, description="false while the exchange fails (prices are the last known)"
    )


class SystemStatusData(EventData):
    status: str | None = None
    engine: EngineInfo | None = Field(default=None, description="the gateway's own status only")
    market_feed: MarketFeedInfo | None = Field(
        default=None, description="the gateway's own status only"
    )


SEVERITY_DESCRIPTION = "low, medium, high or critical"


class AlertData(EventData):
    severity: str | None = Field(default=None, examples=["high"], description=SEVERITY_DESCRIPTION)
    level: str | None = Field(
        default=None,
        examples=["warning"],
        description="a synonym of severity (info, warning, critical)",
    )
    message: str | None = None
    action_required: bool | None = None


class WarningData(EventData):
    severity: str | None = Field(
        default=None, examples=["medium"], description=SEVERITY_DESCRIPTION
    )
    message: str | None = None


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
    "warning": WarningData,
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
    expires_at: str | None = Field(description="null when a remote engine did not say")
    decided_by: str | None
    decided_at: str | None
    status_reason: str | None
    requested_by: str | None = Field(default=None, description="who made a manual proposal")


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


PAGE_LIMIT = "How many items at most (one page)"
PAGE_OFFSET = "How many items to skip, newest first: the page starts after them"


class ProposalQuery(BaseModel):
    status: Literal["pending", "approved", "executed", "rejected", "expired"] | None = Field(
        default=None, description="Only proposals in this state (all when left out)"
    )
    # Documented, not validated here: an invalid symbol is INVALID_SYMBOL, as everywhere.
    symbol: str | None = Field(
        default=None,
        examples=["BTC/USDT"],
        description="Only proposals of this symbol (BASE/QUOTE)",
        json_schema_extra={"pattern": SYMBOL_PATTERN},
    )
    limit: int = Field(default=50, ge=1, le=500, description=PAGE_LIMIT)
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET, description=PAGE_OFFSET)


class PageQuery(BaseModel):
    limit: int = Field(default=50, ge=1, le=500, description=PAGE_LIMIT)
    offset: int = Field(default=0, ge=0, le=MAX_OFFSET, description=PAGE_OFFSET)


class NewProposal(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    # An unknown or malformed symbol is refused by the engine (UNKNOWN_SYMBOL, INVALID_SYMBOL);
    # the document lists the traded ones.
    symbol: str = Field(examples=["BTC/USDT"], json_schema_extra={TRADED_SYMBOL: True})
    action: Literal["buy", "sell"]
    # At least MIN_PROPOSAL_SIZE: documented; a smaller one is INVALID_SIZE from the engine.
    size: Annotated[float, Field(gt=0, json_schema_extra={"minimum": MIN_PROPOSAL_SIZE})] | None = (
        Field(default=None, description="default: sized by the risk rule")
    )
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


class ProposalResult(BaseModel):
    proposal: ProposalOut


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


# -- ingest, as documented: each event type with the data its stream event carries ---------------


def _ingest_event_model(type_: str, topic: str) -> type[BaseModel]:
    data: Any = EVENT_DATA_MODELS[type_]
    its_type: Any = Literal[type_]
    its_topic: Any = Literal[topic] | None
    a_symbol: Any = str | None
    return create_model(
        "Ingest" + "".join(part.title() for part in type_.split("_")),
        __config__=ConfigDict(extra="forbid"),
        type=(its_type, ...),
        topic=(its_topic, Field(default=None, description="the type's topic")),
        symbol=(a_symbol, Field(default=None, pattern=SYMBOL_PATTERN, examples=["BTC/USDT"])),
        data=(data, Field(description="delivered to clients exactly as sent")),
    )


_INGEST_EVENT_MODELS = tuple(_ingest_event_model(t, topic) for t, topic in EVENT_TOPICS.items())
IngestEventDocument = Annotated[
    Union[_INGEST_EVENT_MODELS],  # type: ignore[valid-type]  # noqa: UP007
    Field(discriminator="type"),
]


# Documents the body of `POST /api/events`; EventBatch parses it, then each event is checked
# against its type (see the ingest view), so that an error names the event.
class EventBatchDocument(BaseModel):
    """Events to publish, all or nothing: each `type` with the data its stream event carries."""

    model_config = ConfigDict(extra="forbid")
    events: list[IngestEventDocument] = Field(max_length=MAX_BATCH_EVENTS)


class CommandResultData(BaseModel):
    command: str
    success: bool
    result: DecisionResult | ProposalResult | EngineState | AnalysisData = Field(
        description=(
            "approve_proposal: {proposal, trade} (trade null while paused); reject_proposal, "
            "create_proposal: {proposal}; pause, resume: {status, changed}; analyze: the "
            "analysis_update data. "
            "get_status, get_portfolio and get_health answer with their event instead"
        )
    )
