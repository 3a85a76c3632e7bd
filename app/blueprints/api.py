"""REST API under `/api`: health, connection stats, event ingest; Prometheus text at `/metrics`."""
from __future__ import annotations

from typing import Any

import orjson
from quart import Blueprint, Response, current_app, request
from quart_schema import validate_request, validate_response

from app.errors import APIError, excerpt
from app.models import ConnectionStats, ErrorResponse, EventBatch, Health, IngestResult
from app.services.events import (
    EVENT_TOPICS,
    PER_SYMBOL_LIST_TYPES,
    PUBLISHABLE_TOPICS,
    SERVER_VERSION,
    Event,
    normalize_symbol,
)
from app.services.gateway import Gateway

api_bp = Blueprint("api", __name__)


def _gateway() -> Gateway:
    return current_app.extensions["gateway"]


def require_scope(scope: str) -> None:
    """Refuse the request unless its X-API-Key (when keys are configured) has `scope`."""
    principal = _gateway().api_keys.authenticate(
        request.headers.get("X-API-Key") or request.args.get("api_key"))
    if principal is None:
        raise APIError(401, "AUTHENTICATION_FAILED", "Invalid API key",
                       "Send a valid key in the X-API-Key header")
    if not principal.can(scope):
        raise APIError(403, "FORBIDDEN", "Not allowed",
                       f"This endpoint needs an API key with the {scope!r} scope")


@api_bp.get("/api/health")
@validate_response(Health)
async def get_health() -> Health:
    """Liveness and readiness of this worker."""
    gateway = _gateway()
    return Health(status="ok", version=SERVER_VERSION,
                  uptime_seconds=round(gateway.manager.get_stats()["uptime_seconds"], 3),
                  connections=len(gateway.manager.connections),
                  bus_backend=gateway.bus.backend, last_seq=gateway.bus.head)


@api_bp.get("/api/ws/stats")
@validate_response(ConnectionStats, 200)
@validate_response(ErrorResponse, 401)
async def get_ws_stats() -> ConnectionStats:
    """The connection manager's counters: connections, deliveries, queues, conflation."""
    require_scope("read")
    return ConnectionStats(**_gateway().manager.get_stats())


@api_bp.post("/api/events")
@validate_request(EventBatch)
@validate_response(IngestResult, 202)
@validate_response(ErrorResponse, 400)
async def post_events(data: EventBatch) -> tuple[IngestResult, int]:
    """Publish a batch of events from an external engine. All or nothing: a batch with one bad
    event is refused whole, naming it."""
    require_scope("publish")
    events = [_event(position, item.type, item.topic, item.symbol, item.data)
              for position, item in enumerate(data.events)]
    await _gateway().manager.publish(events)
    return IngestResult(accepted=len(events),
                        first_seq=events[0].seq if events else None,
                        last_seq=events[-1].seq if events else None), 202


def _event(position: int, type_: str, topic: str | None, symbol: str | None,
           data: Any) -> Event:
    def invalid(details: str) -> APIError:
        return APIError(400, "INVALID_EVENT", f"Invalid event at events[{position}]", details)

    if type_ not in EVENT_TOPICS:
        raise invalid(f"Unknown type {type_!r}; known: {', '.join(sorted(EVENT_TOPICS))}")
    if topic is not None and topic not in PUBLISHABLE_TOPICS:
        raise invalid(f"Unknown topic {topic!r}; known: {', '.join(sorted(PUBLISHABLE_TOPICS))}")
    if topic is not None and topic != EVENT_TOPICS[type_]:
        raise invalid(f"Type {type_!r} belongs to topic {EVENT_TOPICS[type_]!r}, not {topic!r}")
    if symbol is not None:
        normalized = normalize_symbol(symbol)
        if normalized is None:
            raise invalid(f"Symbol {symbol!r} is not BASE/QUOTE (for example BTC/USDT)")
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
        return Event(type_, data, topic=topic, symbol=symbol)
    except TypeError as error:  # e.g. an integer beyond 64 bits
        raise invalid(f"data cannot be serialized: {error}") from None


@api_bp.get("/metrics")
async def get_metrics() -> Response:
    """Prometheus text exposition of the connection manager's stats."""
    stats = _gateway().manager.get_stats()
    lines = []
    for name, value in stats.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"# TYPE sigmax_ws_{name} gauge")
            lines.append(f"sigmax_ws_{name} {value}")
    lines.append("# TYPE sigmax_ws_subscribers gauge")
    for key, count in stats["subscriptions"].items():
        label = orjson.dumps(key).decode()
        lines.append(f"sigmax_ws_subscribers{{key={label}}} {count}")
    return Response("\n".join(lines) + "\n", content_type="text/plain; version=0.0.4")
