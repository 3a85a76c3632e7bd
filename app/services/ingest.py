"""Ingest: the events an external engine publishes (`POST /api/events`), checked for what
routing and safety need and relayed as sent."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from app.errors import GatewayError, describe_validation_error, excerpt, quoted
from app.models import EVENT_DATA_MODELS
from app.services.events import (
    EVENT_TOPICS,
    PER_SYMBOL_LIST_TYPES,
    PUBLISHABLE_TOPICS,
    Event,
    normalize_symbol,
)

_DATA_ADAPTERS = {type_: TypeAdapter(model) for type_, model in EVENT_DATA_MODELS.items()}


def ingest_event(
    position: int, type_: str, topic: str | None, symbol: str | None, data: Any
) -> Event:
    """The event at `position` of an ingest batch, checked for what routing and safety need
    (see the README: the original SIGMAX engine's events pass as they are); GatewayError
    INVALID_EVENT naming it otherwise."""

    def invalid(details: str) -> GatewayError:
        return GatewayError("INVALID_EVENT", f"Invalid event at events[{position}]", details)

    if type_ not in EVENT_TOPICS:
        raise invalid(f"Unknown type {quoted(type_)}; known: {', '.join(sorted(EVENT_TOPICS))}")
    if topic is not None and topic not in PUBLISHABLE_TOPICS:
        raise invalid(
            f"Unknown topic {quoted(topic)}; known: {', '.join(sorted(PUBLISHABLE_TOPICS))}"
        )
    if topic is not None and topic != EVENT_TOPICS[type_]:
        raise invalid(
            f"Type {quoted(type_)} belongs to topic {EVENT_TOPICS[type_]!r}, not {quoted(topic)}"
        )
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
                raise invalid(
                    f"{type_} entries must be objects with an upper-case BASE/QUOTE "
                    f"symbol; got {excerpt(repr(entry), 80)}"
                )
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
