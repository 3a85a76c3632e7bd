"""REST API under `/api`: state, trading operations, event ingest, connection stats; Prometheus
text at `/metrics`. Every error is JSON `{error, code, details}`, and the OpenAPI document lists
each error an operation can answer with (RestOpenAPIProvider)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel
from quart import Blueprint, Response, current_app, g, request
from quart_schema import (
    document_request,
    hide,
    tag,
    validate_headers,
    validate_querystring,
    validate_request,
    validate_response,
)
from werkzeug.routing import BaseConverter

from app.apidocs.openapi import NDJSON, errors, ndjson
from app.blueprints.access import optional_body, requires
from app.errors import GatewayError
from app.logs import worker_id
from app.models import (
    ActionHeaders,
    AnalysisData,
    ArchivedEvent,
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
    EventQuery,
    Health,
    IngestHeaders,
    IngestResult,
    Liveness,
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
from app.services import commands, metrics
from app.services.archive import event_filter
from app.services.engines import Caller
from app.services.gateway import Gateway
from app.services.ingest import ingest_event

log = logging.getLogger(__name__)
api_bp = Blueprint("api", __name__)
NO_ARGUMENTS = commands.NoArguments()


def _gateway() -> Gateway:
    return current_app.extensions["gateway"]


class ProposalIdConverter(BaseConverter):
    """A proposal id in a path: anything but `approve` and `reject`, so that those paths answer
    405 to the methods they do not have instead of looking for a proposal of that name."""

    regex = r"(?!(?:approve|reject)$)[^/]+"


@api_bp.record_once
def _register_converters(state: Any) -> None:
    state.app.url_map.converters["proposal_id"] = ProposalIdConverter


@api_bp.get("/api/health")
@tag(["system"])
@validate_response(Health, 200)
@validate_response(Health, 503)
async def get_health() -> tuple[Health, int]:
    """Readiness of this worker: 503 while its event stream does not work or its database
    does not answer. A load balancer sends new clients elsewhere meanwhile; a liveness probe
    asks `/api/health/live` instead."""
    health = Health(**_gateway().health())
    return health, 200 if health.status == "ok" else 503


@api_bp.get("/api/health/live")
@tag(["system"])
@validate_response(Liveness, 200)
async def get_liveness() -> Liveness:
    """Liveness of this worker: 200 whenever its event loop answers, whatever its
    dependencies do (restarting it would not bring them back; it would cut its clients)."""
    gateway = _gateway()
    return Liveness(
        status="ok",
        worker=worker_id(),
        uptime_seconds=round(time.time() - gateway.started, 3),
    )


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
    events = [
        ingest_event(position, item.type, item.topic, item.symbol, item.data)
        for position, item in enumerate(data.events)
    ]
    published = await _gateway().publisher.publish(events, headers.idempotency_key)
    return IngestResult(
        accepted=published.accepted,
        first_seq=published.first_seq,
        last_seq=published.last_seq,
        repeated=published.repeated,
    ), 202


@api_bp.get("/api/events")
@tag(["ingest"])
@requires("read")
@validate_querystring(EventQuery)
@ndjson(ArchivedEvent)
@errors(503)
async def get_events(query_args: EventQuery) -> Response:
    """Export archived stream events as NDJSON, oldest first, streamed page by page (memory stays
    bounded however many there are). Page on with `since` set to the last line's seq."""
    wanted = event_filter(
        query_args.since,
        query_args.until,
        _listed(query_args.topic),
        _listed(query_args.symbol),
    )
    pages = _gateway().archive.export(wanted, query_args.limit)
    # The first page is read before the 200 is sent: a database outage is still a 503.
    first = await anext(pages, b"")
    return Response(_after(first, pages), content_type=NDJSON)  # type: ignore[arg-type]


async def _after(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for page in rest:
        yield page


def _listed(value: str | None) -> list[str]:
    """A comma-separated query parameter's items (none when it is left out)."""
    return value.split(",") if value is not None else []


@api_bp.get("/metrics")
@hide  # Prometheus text, for a scraper: not part of the JSON API
async def get_metrics() -> Response:
    """The host's metrics in Prometheus text: every worker's (app/services/metrics.py)."""
    _gateway().metrics.sync()  # this worker's own figures as of now
    body, content_type = metrics.exposition(request.headers.get("Accept"))
    return Response(body, content_type=content_type, headers={"X-Sigmax-Worker": worker_id()})


# -- trading state ------------------------------------------------------------------------------


@api_bp.get("/api/status")
@tag(["system"])
@requires("read")
@validate_response(SystemStatusData)
async def get_status() -> dict[str, Any]:
    """The system status: running or paused, uptime, symbols, connections, counters."""
    return await _perform("get_status", NO_ARGUMENTS)


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
@errors(503)
async def get_portfolio() -> dict[str, Any]:
    """Cash, positions with P&L, totals."""
    return await _perform("get_portfolio", NO_ARGUMENTS)


@api_bp.get("/api/proposals")
@tag(["proposals"])
@requires("read")
@validate_querystring(ProposalQuery)
@validate_response(ProposalPage)
@errors(503)
async def get_proposals(query_args: ProposalQuery) -> ProposalPage:
    """Proposals, newest first, filtered by status and symbol, paged."""
    symbol = commands.parse_symbol(query_args.symbol) if query_args.symbol is not None else None
    items, total = await _gateway().engine.proposals(
        status=query_args.status, symbol=symbol, limit=query_args.limit, offset=query_args.offset
    )
    return ProposalPage(
        items=[ProposalOut(**p) for p in items],
        total=total,
        limit=query_args.limit,
        offset=query_args.offset,
    )


@api_bp.get("/api/proposals/<proposal_id:proposal_id>")
@tag(["proposals"])
@requires("read")
@validate_response(ProposalOut, 200)
@errors(404, 503)
async def get_proposal(proposal_id: str) -> ProposalOut:
    """One proposal."""
    return ProposalOut(**await _gateway().engine.proposal(proposal_id))


@api_bp.get("/api/trades")
@tag(["trading"])
@requires("read")
@validate_querystring(PageQuery)
@validate_response(TradePage)
@errors(503)
async def get_trades(query_args: PageQuery) -> TradePage:
    """Executed trades, newest first, paged."""
    trades, total = await _gateway().engine.trades(limit=query_args.limit, offset=query_args.offset)
    return TradePage(
        items=[TradeOut(**t) for t in trades],
        total=total,
        limit=query_args.limit,
        offset=query_args.offset,
    )


# -- trading operations -------------------------------------------------------------------------


@api_bp.post("/api/proposals")
@tag(["proposals"])
@requires("trade")
@validate_request(NewProposal)
@validate_headers(ActionHeaders)
@validate_response(ProposalOut, 201)
@errors(409, 422, 502, 503)
async def post_proposal(data: NewProposal, headers: ActionHeaders) -> tuple[ProposalOut, int]:
    """Create a manual proposal; without `size` the risk rule sizes it. Refused (409
    `ENGINE_PAUSED`) while trading is paused."""
    result = await _perform("create_proposal", data, headers.idempotency_key)
    return ProposalOut(**result["proposal"]), 201


@api_bp.post("/api/proposals/<proposal_id:proposal_id>/approve")
@tag(["proposals"])
@requires("trade")
@validate_headers(ActionHeaders)
@validate_response(DecisionResult, 200)
@errors(400, 404, 409, 502, 503)
async def approve_proposal(proposal_id: str, headers: ActionHeaders) -> DecisionResult:
    """Approve a pending proposal: executed at once unless the engine is paused. Approving
    twice, or concurrently, executes once; the others get 409."""
    return DecisionResult(
        **await _perform(
            "approve_proposal",
            commands.ProposalRef(proposal_id=proposal_id),
            headers.idempotency_key,
        )
    )


@api_bp.post("/api/proposals/<proposal_id:proposal_id>/reject")
@tag(["proposals"])
@requires("trade")
@optional_body(Decision)
@validate_headers(ActionHeaders)
@validate_response(DecisionResult, 200)
@errors(404, 409, 502, 503)
async def reject_proposal(
    proposal_id: str, data: Decision, headers: ActionHeaders
) -> DecisionResult:
    """Reject a pending (or approved, not yet executed) proposal; the body, with a reason, is
    optional."""
    return DecisionResult(
        **await _perform(
            "reject_proposal",
            commands.ProposalDecision(proposal_id=proposal_id, reason=data.reason),
            headers.idempotency_key,
        )
    )


@api_bp.post("/api/proposals/approve")
@tag(["proposals"])
@requires("trade")
@validate_request(BulkDecision)
@validate_headers(ActionHeaders)
@validate_response(BulkResult)
async def approve_proposals(data: BulkDecision, headers: ActionHeaders) -> BulkResult:
    """Approve many proposals in one call; each succeeds or fails on its own."""
    return await _bulk(
        "approve_proposal",
        [commands.ProposalRef(proposal_id=proposal_id) for proposal_id in data.proposal_ids],
        headers.idempotency_key,
    )


@api_bp.post("/api/proposals/reject")
@tag(["proposals"])
@requires("trade")
@validate_request(BulkDecision)
@validate_headers(ActionHeaders)
@validate_response(BulkResult)
async def reject_proposals(data: BulkDecision, headers: ActionHeaders) -> BulkResult:
    """Reject many proposals in one call; each succeeds or fails on its own."""
    return await _bulk(
        "reject_proposal",
        [
            commands.ProposalDecision(proposal_id=proposal_id, reason=data.reason)
            for proposal_id in data.proposal_ids
        ],
        headers.idempotency_key,
    )


@api_bp.post("/api/pause")
@tag(["system"])
@requires("trade")
@validate_headers(ActionHeaders)
@validate_response(EngineState)
@errors(400, 502, 503)
async def post_pause(headers: ActionHeaders) -> EngineState:
    """Pause trading: no new proposals, approvals wait for resume. Market data continues."""
    return EngineState(**await _perform("pause", NO_ARGUMENTS, headers.idempotency_key))


@api_bp.post("/api/resume")
@tag(["system"])
@requires("trade")
@validate_headers(ActionHeaders)
@validate_response(EngineState)
@errors(400, 502, 503)
async def post_resume(headers: ActionHeaders) -> EngineState:
    """Resume trading; approvals made while paused are executed now."""
    return EngineState(**await _perform("resume", NO_ARGUMENTS, headers.idempotency_key))


@api_bp.post("/api/analyze")
@tag(["trading"])
@requires("trade")
@validate_request(commands.SymbolRef)
@validate_headers(ActionHeaders)
@validate_response(AnalysisData)
@errors(502, 503)
async def post_analyze(data: commands.SymbolRef, headers: ActionHeaders) -> dict[str, Any]:
    """Run the engine's analysis of one symbol now (it may lead to a proposal)."""
    return await _perform("analyze", data, headers.idempotency_key)


async def _perform(
    name: str, args: BaseModel, idempotency_key: str | None = None, caller: Caller | None = None
) -> Any:
    """Run a command for the caller (an action with the client's Idempotency-Key, if any)."""
    caller = caller or Caller.with_client_key(g.principal, idempotency_key)
    return await commands.COMMANDS[name].run(_gateway(), caller, args)


async def _bulk(
    command: str,
    decisions: list[commands.ProposalRef] | list[commands.ProposalDecision],
    idempotency_key: str | None,
) -> BulkResult:
    results = []
    call = Caller.with_client_key(g.principal, idempotency_key)
    # once each, in the order given; each its own action (its own key)
    unique = {decision.proposal_id: decision for decision in decisions}
    for proposal_id, decision in unique.items():
        try:
            outcome = await _perform(command, decision, caller=call.for_item(proposal_id))
            results.append(
                BulkItem(proposal_id=proposal_id, ok=True, status=outcome["proposal"]["status"])
            )
        except GatewayError as error:
            results.append(
                BulkItem(
                    proposal_id=proposal_id,
                    ok=False,
                    status=error.fields.get("proposal_status"),
                    error=ErrorResponse(**error.body()),
                )
            )
    succeeded = sum(1 for r in results if r.ok)
    return BulkResult(results=results, succeeded=succeeded, failed=len(results) - succeeded)
