"""REST API under `/api`: state, trading operations, event ingest, connection stats; Prometheus
text at `/metrics`. Every error is JSON `{error, code, details}`, and the OpenAPI document lists
each error an operation can answer with (RestOpenAPIProvider)."""
from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from functools import wraps
from http import HTTPStatus
from typing import Any, TypeVar, cast

import orjson
from pydantic import TypeAdapter, ValidationError
from quart import Blueprint, Response, current_app, g, request
from quart_schema import (
    RequestSchemaValidationError,
    document_request,
    hide,
    tag,
    validate_headers,
    validate_querystring,
    validate_request,
    validate_response,
)
from quart_schema.conversion import model_load
from quart_schema.openapi import OpenAPIProvider
from werkzeug.routing import BaseConverter, Rule

from app.errors import GatewayError, describe_validation_error, excerpt, quoted
from app.models import (
    EVENT_DATA_MODELS,
    TRADED_SYMBOL,
    BulkDecision,
    BulkItem,
    BulkResult,
    ConnectionStats,
    Decision,
    DecisionResult,
    EngineState,
    ErrorResponse,
    EventBatch,
    EventBatchDocument,
    Health,
    IngestHeaders,
    IngestResult,
    MarketSnapshot,
    NewProposal,
    PageQuery,
    PortfolioData,
    ProposalOut,
    ProposalPage,
    ProposalQuery,
    SystemStatusData,
    TradeOut,
    TradePage,
)
from app.services import commands
from app.services.events import (
    EVENT_TOPICS,
    PER_SYMBOL_LIST_TYPES,
    PUBLISHABLE_TOPICS,
    SERVER_VERSION,
    Event,
    normalize_symbol,
)
from app.services.gateway import Gateway
from app.services.redis_bus import RedisBus

log = logging.getLogger(__name__)
api_bp = Blueprint("api", __name__)
NO_ARGUMENTS = commands.NoArguments()
View = TypeVar("View", bound=Callable[..., Any])

# The engine's ingest path is not rate limited.
NOT_RATE_LIMITED = frozenset({"/api/events"})

API_KEY_SCHEME = "ApiKey"
API_KEY_SECURITY = {
    "type": "apiKey", "in": "header", "name": "X-API-Key",
    "description": "Needed once the gateway has API keys (API_KEYS, or keys created with "
                   "`python -m app keys create`); with none it is open. An operation names the "
                   "scope its key needs. `?api_key=` is accepted too."}

ERROR_DESCRIPTIONS = {
    400: "Invalid input: the body or query string does not match the schema "
         "(`VALIDATION_ERROR`, `BAD_REQUEST`), or a value is refused, for example "
         "`INVALID_SYMBOL`, `UNKNOWN_SYMBOL`, `INVALID_EVENT`",
    401: "The gateway has API keys and the request has no valid one (`AUTHENTICATION_FAILED`)",
    403: "The API key lacks the scope this operation needs (`FORBIDDEN`)",
    404: "No such proposal (`PROPOSAL_NOT_FOUND`)",
    409: "The proposal is decided already (`PROPOSAL_ALREADY_DECIDED`, with its "
         "`proposal_status`), trading is paused (`ENGINE_PAUSED`), or an `Idempotency-Key` was "
         "used for another batch (`IDEMPOTENCY_KEY_REUSED`)",
    422: "A trading rule refuses the request (`NOTHING_TO_SELL`)",
    429: "Too many requests from this client (`TOO_MANY_REQUESTS`); retry after `Retry-After` "
         "seconds",
    503: "Not possible now, retry: the event stream is unavailable (`BUS_UNAVAILABLE`), or there "
         "is no market price yet (`NO_PRICE`)",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "required": True,
                               "schema": {"type": "integer", "minimum": 0}}}
_ERROR_STATUSES = "_sigmax_error_statuses"
_REQUIRED_SCOPE = "_sigmax_required_scope"
_OPTIONAL_BODY = "_sigmax_optional_body"


def _gateway() -> Gateway:
    return current_app.extensions["gateway"]


def errors(*statuses: int) -> Callable[[View], View]:
    """Document that the view answers with the JSON error of each of `statuses` (raised as
    GatewayError), besides those RestOpenAPIProvider adds to every operation of its kind."""

    def decorator(view: View) -> View:
        setattr(view, _ERROR_STATUSES, (*getattr(view, _ERROR_STATUSES, ()), *statuses))
        return view

    return decorator


class RestOpenAPIProvider(OpenAPIProvider):
    """quart-schema's OpenAPI document, completed with what operations share: request bodies
    are required; each operation lists the JSON error of every status it can answer with (400
    when it validates input, 401 and 403 when it needs a key scope, 429 when it is rate
    limited, and those named with `errors`); the API key scheme; the traded symbols."""

    def schema(self) -> dict[str, Any]:
        document = super().schema()
        # Here rather than QuartSchema(security_schemes=...), which drops the description.
        document["components"]["securitySchemes"] = {API_KEY_SCHEME: API_KEY_SECURITY}
        return document

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        view = self._app.view_functions[rule.endpoint]
        config = self._app.config["SIGMAX"]
        scope = getattr(view, _REQUIRED_SCOPE, None)
        for operation in (op for path_item in paths.values() for op in path_item.values()):
            _describe(operation, inspect.getdoc(view) or "")
            statuses = set(getattr(view, _ERROR_STATUSES, ()))
            if "requestBody" in operation:
                operation["requestBody"]["required"] = not getattr(view, _OPTIONAL_BODY, False)
                _list_traded_symbols(operation["requestBody"], config.SYMBOLS)
            if "requestBody" in operation or any(p["in"] == "query"
                                                 for p in operation["parameters"]):
                statuses.add(400)
            if scope is not None:
                statuses |= {401, 403}
                # `{}`: no key is needed while the gateway has none.
                operation["security"] = [{API_KEY_SCHEME: [scope]}, {}]
            if config.REST_RATE_LIMIT and rule.rule not in NOT_RATE_LIMITED:
                statuses.add(429)
            operation["responses"] = {**operation["responses"], **{
                status: _error_response(status) for status in sorted(statuses)
                if status not in operation["responses"]}}
        components[ErrorResponse.__name__] = ErrorResponse.model_json_schema()
        return paths, components


PATH_PARAMETERS = {"proposal_id": "The proposal's id, as `proposal_created` gave it"}


def _describe(operation: dict[str, Any], docstring: str) -> None:
    """The summary is the docstring's first sentence, the description the rest (quart-schema
    cuts at the first line break, mid-sentence); every response and path parameter says what
    it is."""
    text = " ".join(docstring.split())
    summary, _, rest = text.partition(". ")
    operation["summary"] = summary.rstrip(".")
    operation["description"] = rest
    for status, response in operation["responses"].items():
        if not response.get("description"):
            response["description"] = HTTPStatus(int(status)).phrase
    for parameter in operation.get("parameters", ()):
        if parameter["in"] == "path" and not parameter.get("description"):
            parameter["description"] = PATH_PARAMETERS.get(parameter["name"], parameter["name"])


def _error_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": ERROR_DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {
            "$ref": f"#/components/schemas/{ErrorResponse.__name__}"}}}}
    if status == 429:
        response["headers"] = RETRY_AFTER
    return response


def _list_traded_symbols(schema: Any, symbols: tuple[str, ...]) -> None:
    """Turn each field marked TRADED_SYMBOL into an enum of the traded symbols."""
    if isinstance(schema, dict):
        if schema.pop(TRADED_SYMBOL, False):
            schema["enum"] = list(symbols)
        for value in schema.values():
            _list_traded_symbols(value, symbols)
    elif isinstance(schema, list):
        for value in schema:
            _list_traded_symbols(value, symbols)


class ProposalIdConverter(BaseConverter):
    """A proposal id in a path: anything but `approve` and `reject`, so that those paths answer
    405 to the methods they do not have instead of looking for a proposal of that name."""

    regex = r"(?!(?:approve|reject)$)[^/]+"


@api_bp.record_once
def _register_converters(state: Any) -> None:
    state.app.url_map.converters["proposal_id"] = ProposalIdConverter


def optional_body(model: type[Any]) -> Callable[[View], View]:
    """quart-schema's validate_request for a body that may be left out: no body (or an empty
    one) means the model's defaults. Documented as an optional request body."""

    def decorator(view: View) -> View:
        @wraps(view)
        async def parsed(*args: Any, **kwargs: Any) -> Any:
            if (await request.get_data()).strip():
                data = model_load(await request.get_json(), model, RequestSchemaValidationError)
            else:
                data = model()
            return await view(*args, data=data, **kwargs)

        setattr(parsed, _OPTIONAL_BODY, True)
        return cast(View, document_request(model)(parsed))

    return decorator


def requires(scope: str) -> Callable[[View], View]:
    """Refuse the request unless its X-API-Key (when keys exist) has `scope`; the caller's
    principal is then `g.principal`. Checked before the body is validated."""

    def decorator(view: View) -> View:
        @wraps(view)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            presented = request.headers.get("X-API-Key") or request.args.get("api_key")
            principal = await _gateway().api_keys.authenticate(presented)
            if principal is None:
                log.info("refused %s %s from %s: %s", request.method, request.path,
                         request.remote_addr, "wrong API key" if presented else "no API key")
                if presented:
                    raise GatewayError("AUTHENTICATION_FAILED", "Invalid API key",
                                   "The key sent is not valid; send a valid key in the "
                                   "X-API-Key header")
                raise GatewayError("AUTHENTICATION_FAILED", "Missing API key",
                               "This gateway requires an API key: send it in the X-API-Key "
                               "header")
            if not principal.can(scope):
                raise GatewayError("FORBIDDEN", "Not allowed",
                               f"This endpoint needs an API key with the {scope!r} scope")
            g.principal = principal.name
            return await view(*args, **kwargs)

        setattr(guarded, _REQUIRED_SCOPE, scope)
        return cast(View, guarded)

    return decorator


@api_bp.get("/api/health")
@tag(["system"])
@validate_response(Health, 200)
@validate_response(Health, 503)
async def get_health() -> tuple[Health, int]:
    """Liveness and readiness of this worker: 503 while its event stream does not work."""
    gateway = _gateway()
    bus = gateway.bus
    health = Health(status="ok", version=SERVER_VERSION,
                    uptime_seconds=round(time.time() - gateway.started, 3),
                    connections=len(gateway.manager.connections),
                    bus_backend=bus.backend, last_seq=bus.head, leader=gateway.is_leader)
    if isinstance(bus, RedisBus):
        health.redis_connected = bus.connected
        health.stream_lag = bus.lag
        health.receiving = not bus.deaf
        if not bus.connected:
            health.status, health.reason = "degraded", f"Redis unavailable: {bus.last_error}"
        elif bus.deaf:
            health.status, health.reason = "degraded", "not receiving the event stream"
    return health, 200 if health.status == "ok" else 503


@api_bp.get("/api/ws/stats")
@tag(["system"])
@requires("read")
@validate_response(ConnectionStats, 200)
async def get_ws_stats() -> ConnectionStats:
    """The connection manager's counters (connections, deliveries, queues, conflation, refusals
    by each abuse limit) and this worker's memory and event-loop lag."""
    return ConnectionStats(**_gateway().stats())


@api_bp.post("/api/events")
@tag(["ingest"])
@requires("publish")
@document_request(EventBatchDocument)  # the data of each type; EventBatch is parsed first
@validate_request(EventBatch)
@validate_headers(IngestHeaders)
@validate_response(IngestResult, 202)
@errors(409, 503)
async def post_events(data: EventBatch, headers: IngestHeaders) -> tuple[IngestResult, int]:
    """Publish a batch of events from an external engine. All or nothing: a batch with one bad
    event is refused whole, naming it. With an `Idempotency-Key`, a retry of the same batch
    (within the history's age, on any worker) answers the first result and publishes nothing."""
    events = [_event(position, item.type, item.topic, item.symbol, item.data)
              for position, item in enumerate(data.events)]
    published = await _gateway().bus.publish(events, headers.idempotency_key)
    return IngestResult(accepted=published.accepted, first_seq=published.first_seq,
                        last_seq=published.last_seq, repeated=published.repeated), 202


_DATA_ADAPTERS = {type_: TypeAdapter(model) for type_, model in EVENT_DATA_MODELS.items()}


def _event(position: int, type_: str, topic: str | None, symbol: str | None,
           data: Any) -> Event:
    def invalid(details: str) -> GatewayError:
        return GatewayError("INVALID_EVENT", f"Invalid event at events[{position}]", details)

    if type_ not in EVENT_TOPICS:
        raise invalid(f"Unknown type {quoted(type_)}; known: "
                      f"{', '.join(sorted(EVENT_TOPICS))}")
    if topic is not None and topic not in PUBLISHABLE_TOPICS:
        raise invalid(f"Unknown topic {quoted(topic)}; known: "
                      f"{', '.join(sorted(PUBLISHABLE_TOPICS))}")
    if topic is not None and topic != EVENT_TOPICS[type_]:
        raise invalid(f"Type {quoted(type_)} belongs to topic {EVENT_TOPICS[type_]!r}, "
                      f"not {quoted(topic)}")
    if symbol is not None:
        normalized = normalize_symbol(symbol)
        if normalized is None:
            raise invalid(f"Symbol {quoted(symbol)} is not BASE/QUOTE (for example BTC/USDT)")
        symbol = normalized
    if type_ in PER_SYMBOL_LIST_TYPES:
        if not isinstance(data, list):
            raise invalid(f"{type_} data must be a list of per-symbol entries")
        for entry in data:
            entry_symbol = entry.get("symbol") if isinstance(entry, dict) else None
            if not isinstance(entry_symbol, str) or normalize_symbol(entry_symbol) != entry_symbol:
                raise invalid(f"{type_} entries must be objects with an upper-case BASE/QUOTE "
                              f"symbol; got {excerpt(repr(entry), 80)}")
    elif not isinstance(data, dict):
        raise invalid(f"{type_} data must be an object")
    try:
        _DATA_ADAPTERS[type_].validate_python(data)
    except ValidationError as error:
        raise invalid(f"{type_} data: {describe_validation_error(error)}") from None
    if symbol is None and isinstance(data, dict) and isinstance(data.get("symbol"), str):
        symbol = data["symbol"]  # checked by the model: `symbol:X` subscribers get it too
    try:
        return Event(type_, data, topic=topic, symbol=symbol)
    except TypeError as error:  # e.g. an integer beyond 64 bits
        raise invalid(f"data cannot be serialized: {error}") from None


@api_bp.get("/metrics")
@hide  # Prometheus text, for a scraper: not part of the JSON API
async def get_metrics() -> Response:
    """Prometheus text exposition of the gateway's stats."""
    stats = _gateway().stats()
    lines = []
    for name, value in stats.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"# TYPE sigmax_ws_{name} gauge")
            lines.append(f"sigmax_ws_{name} {value}")
    lines.append("# TYPE sigmax_ws_subscribers gauge")
    for key, count in stats["subscriptions"].items():
        label = orjson.dumps(key).decode()
        lines.append(f"sigmax_ws_subscribers{{key={label}}} {count}")
    lines.append("# TYPE sigmax_limit_refusals_total counter")
    for limit, count in stats["refusals"].items():
        lines.append(f'sigmax_limit_refusals_total{{limit="{limit}"}} {count}')
    return Response("\n".join(lines) + "\n", content_type="text/plain; version=0.0.4")


# -- trading state ------------------------------------------------------------------------------

@api_bp.get("/api/status")
@tag(["system"])
@requires("read")
@validate_response(SystemStatusData)
async def get_status() -> dict[str, Any]:
    """The system status: running or paused, uptime, symbols, connections, counters."""
    return await commands.get_status(_gateway(), g.principal, NO_ARGUMENTS)


@api_bp.get("/api/market")
@tag(["trading"])
@requires("read")
@validate_response(MarketSnapshot)
async def get_market() -> dict[str, Any]:
    """The latest price, 24 h volume and change of every symbol."""
    return {"symbols": [ticker.as_dict() for ticker in _gateway().market.latest()]}


@api_bp.get("/api/portfolio")
@tag(["trading"])
@requires("read")
@validate_response(PortfolioData)
async def get_portfolio() -> dict[str, Any]:
    """Cash, positions with P&L, totals."""
    return await commands.get_portfolio(_gateway(), g.principal, NO_ARGUMENTS)


@api_bp.get("/api/proposals")
@tag(["proposals"])
@requires("read")
@validate_querystring(ProposalQuery)
@validate_response(ProposalPage)
async def get_proposals(query_args: ProposalQuery) -> ProposalPage:
    """Proposals, newest first, filtered by status and symbol, paged."""
    symbol = _symbol(query_args.symbol) if query_args.symbol is not None else None
    items, total = await _gateway().engine.proposals(
        status=query_args.status, symbol=symbol, limit=query_args.limit,
        offset=query_args.offset)
    return ProposalPage(items=[ProposalOut(**p.as_dict()) for p in items], total=total,
                        limit=query_args.limit, offset=query_args.offset)


@api_bp.get("/api/proposals/<proposal_id:proposal_id>")
@tag(["proposals"])
@requires("read")
@validate_response(ProposalOut, 200)
@errors(404)
async def get_proposal(proposal_id: str) -> ProposalOut:
    """One proposal."""
    return ProposalOut(**(await _gateway().engine.proposal(proposal_id)).as_dict())


@api_bp.get("/api/trades")
@tag(["trading"])
@requires("read")
@validate_querystring(PageQuery)
@validate_response(TradePage)
async def get_trades(query_args: PageQuery) -> TradePage:
    """Executed trades, newest first, paged."""
    trades, total = await _gateway().engine.trades(limit=query_args.limit,
                                                   offset=query_args.offset)
    return TradePage(items=[TradeOut(**t.as_event()) for t in trades], total=total,
                     limit=query_args.limit, offset=query_args.offset)


# -- trading operations -------------------------------------------------------------------------

@api_bp.post("/api/proposals")
@tag(["proposals"])
@requires("trade")
@validate_request(NewProposal)
@validate_response(ProposalOut, 201)
@errors(409, 422, 503)
async def post_proposal(data: NewProposal) -> tuple[ProposalOut, int]:
    """Create a manual proposal; without `size` the risk rule sizes it. Refused (409
    `ENGINE_PAUSED`) while trading is paused."""
    proposal = await _gateway().engine.propose(
        _symbol(data.symbol), data.action, data.size, data.reason,
        requested_by=g.principal)
    return ProposalOut(**proposal.as_dict()), 201


@api_bp.post("/api/proposals/<proposal_id:proposal_id>/approve")
@tag(["proposals"])
@requires("trade")
@validate_response(DecisionResult, 200)
@errors(404, 409, 503)
async def approve_proposal(proposal_id: str) -> DecisionResult:
    """Approve a pending proposal: executed at once unless the engine is paused. Approving
    twice, or concurrently, executes once; the others get 409."""
    return DecisionResult(**await commands.approve_proposal(
        _gateway(), g.principal, commands.ProposalRef(proposal_id=proposal_id)))


@api_bp.post("/api/proposals/<proposal_id:proposal_id>/reject")
@tag(["proposals"])
@requires("trade")
@optional_body(Decision)
@validate_response(DecisionResult, 200)
@errors(404, 409, 503)
async def reject_proposal(proposal_id: str, data: Decision) -> DecisionResult:
    """Reject a pending (or approved, not yet executed) proposal; the body, with a reason, is
    optional."""
    return DecisionResult(**await commands.reject_proposal(
        _gateway(), g.principal,
        commands.ProposalDecision(proposal_id=proposal_id, reason=data.reason)))


@api_bp.post("/api/proposals/approve")
@tag(["proposals"])
@requires("trade")
@validate_request(BulkDecision)
@validate_response(BulkResult)
async def approve_proposals(data: BulkDecision) -> BulkResult:
    """Approve many proposals in one call; each succeeds or fails on its own."""
    return await _bulk(data.proposal_ids, lambda proposal_id: commands.approve_proposal(
        _gateway(), g.principal, commands.ProposalRef(proposal_id=proposal_id)))


@api_bp.post("/api/proposals/reject")
@tag(["proposals"])
@requires("trade")
@validate_request(BulkDecision)
@validate_response(BulkResult)
async def reject_proposals(data: BulkDecision) -> BulkResult:
    """Reject many proposals in one call; each succeeds or fails on its own."""
    return await _bulk(data.proposal_ids, lambda proposal_id: commands.reject_proposal(
        _gateway(), g.principal,
        commands.ProposalDecision(proposal_id=proposal_id, reason=data.reason)))


@api_bp.post("/api/pause")
@tag(["system"])
@requires("trade")
@validate_response(EngineState)
@errors(503)
async def post_pause() -> EngineState:
    """Pause trading: no new proposals, approvals wait for resume. Market data continues."""
    return EngineState(**await commands.pause(_gateway(), g.principal, NO_ARGUMENTS))


@api_bp.post("/api/resume")
@tag(["system"])
@requires("trade")
@validate_response(EngineState)
@errors(503)
async def post_resume() -> EngineState:
    """Resume trading; approvals made while paused are executed now."""
    return EngineState(**await commands.resume(_gateway(), g.principal, NO_ARGUMENTS))


def _symbol(raw: str) -> str:
    symbol = normalize_symbol(raw)
    if symbol is None:
        raise GatewayError("INVALID_SYMBOL", "Invalid symbol format",
                       f"Symbol {quoted(raw)} is not BASE/QUOTE (for example BTC/USDT)")
    return symbol


async def _bulk(proposal_ids: list[str],
                decide: Callable[[str], Awaitable[dict[str, Any]]]) -> BulkResult:
    results = []
    for proposal_id in dict.fromkeys(proposal_ids):  # once each, in the order given
        try:
            outcome = await decide(proposal_id)
            results.append(BulkItem(proposal_id=proposal_id, ok=True,
                                    status=outcome["proposal"]["status"]))
        except GatewayError as error:
            results.append(BulkItem(proposal_id=proposal_id, ok=False,
                                    status=error.fields.get("proposal_status"),
                                    error=ErrorResponse(**error.body())))
    succeeded = sum(1 for r in results if r.ok)
    return BulkResult(results=results, succeeded=succeeded, failed=len(results) - succeeded)
