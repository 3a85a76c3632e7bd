"""The gateway's read model of a remote engine: proposals, trades, the portfolio and the paused
flag, built from the events the engine publishes and kept in the gateway's database, so REST
reads and the dashboard answer while the engine is slow or away, and after a gateway restart.

Every worker applies every event (a bus listener queues them; one task writes them off the
fan-out path). Writes are idempotent: a row keeps the stream position of the last event applied
to it and only a later event of the same stream (or any event of a newer stream) changes it, so
workers applying the same events in any interleaving leave the same rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson

from app.errors import GatewayError, quoted
from app.services.database import DatabaseUnavailable
from app.services.events import Event

log = logging.getLogger(__name__)

RETRY_DELAYS = (0.5, 5.0)  # first and longest wait for the database, while it is away

PROPOSAL_EVENTS = frozenset(
    {"proposal_created", "proposal_approved", "proposal_rejected", "proposal_expired"}
)
TRACKED = PROPOSAL_EVENTS | {"trade_executed", "portfolio_update", "status_change"}
QUEUE_LIMIT = 100_000  # events waiting to be written; beyond it the oldest are dropped (logged)

# What a proposal row holds, and the value shown when the engine did not send the field.
PROPOSAL_DEFAULTS: dict[str, Any] = {
    "symbol": "",
    "action": "",
    "size": 0.0,
    "reason": "",
    "confidence": None,
    "source": "engine",
    "status": "pending",
    "created_at": "",  # set when first seen
    "expires_at": None,
    "decided_by": None,
    "decided_at": None,
    "status_reason": None,
    "requested_by": None,
}

_UPSERT_GUARD = "WHERE {table}.stream_id <> :stream_id OR {table}.seq < :seq"


class ReadModel:
    def __init__(self, db: Any, stream_id: Callable[[], str]) -> None:
        self._db = db
        self._stream_id = stream_id
        # Each event with the stream it came in (read when it arrives, not when written).
        self._queue: asyncio.Queue[tuple[Event, str]] = asyncio.Queue()
        self.paused = False
        self.latest_portfolio: dict[str, Any] | None = None
        # The engine's events this worker has seen, named as the paper engine counts them.
        self.counters = dict.fromkeys([*_COUNTER.values(), "trades_executed"], 0)
        self.applied = 0  # events written by this worker's model since start

    # -- writing ------------------------------------------------------------------------------

    def observe(self, events: list[Event]) -> None:
        """The bus listener: queue what the model tracks (never blocks the fan-out)."""
        for event in events:
            if event.type in TRACKED:
                if self._queue.qsize() >= QUEUE_LIMIT:
                    dropped, _ = self._queue.get_nowait()
                    self._queue.task_done()
                    log.error("read model behind: dropped event seq %d", dropped.seq)
                self._queue.put_nowait((event, self._stream_id()))

    async def run(self) -> None:
        """Write queued events, in order, as many as are waiting in one connection."""
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            delay = RETRY_DELAYS[0]
            while batch:
                try:
                    async with self._db.connection() as connection:
                        while batch:
                            event, stream_id = batch[0]
                            try:
                                await self.apply(connection, event, stream_id)
                            except DatabaseUnavailable:
                                raise
                            except Exception:  # this event's: the others are still written
                                log.exception("read model: event seq %d not written", event.seq)
                            batch.pop(0)
                            self._queue.task_done()
                except DatabaseUnavailable:
                    # Written once the database is back (the outage is logged once, there).
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_DELAYS[1])
                except Exception:
                    log.exception("read model: %d events not written", len(batch))
                    for _ in batch:
                        self._queue.task_done()
                    batch = []

    async def written(self) -> None:
        """Until what was queued is written (a stopping worker waits for it)."""
        await self._queue.join()

    async def apply(self, connection: Any, event: Event, stream_id: str) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        position = {"stream_id": stream_id, "seq": event.seq}
        if event.type in PROPOSAL_EVENTS:
            proposal_id = data.get("proposal_id")
            if isinstance(proposal_id, str):
                await self._merge_proposal(
                    connection, proposal_id, _proposal_fields(event), position, event.timestamp
                )
                self.counters[_COUNTER[event.type]] += 1
        elif event.type == "trade_executed":
            order_id = data.get("order_id") or f"trade-{position['stream_id']}-{event.seq}"
            await connection.execute(
                "INSERT INTO engine_trades (order_id, executed_at, stream_id, seq, data) "
                "VALUES (:order_id, :executed_at, :stream_id, :seq, :data) ON CONFLICT "
                "(order_id) DO UPDATE SET executed_at = :executed_at, stream_id = :stream_id, "
                "seq = :seq, data = :data " + _UPSERT_GUARD.format(table="engine_trades"),
                {
                    "order_id": str(order_id),
                    "executed_at": _epoch(data.get("timestamp"), event.created),
                    "data": orjson.dumps({**data, "order_id": order_id}).decode(),
                    **position,
                },
            )
            if isinstance(data.get("proposal_id"), str):
                await self._merge_proposal(
                    connection,
                    data["proposal_id"],
                    {"status": "executed"},
                    position,
                    event.timestamp,
                )
            self.counters["trades_executed"] += 1
        elif event.type == "portfolio_update":
            self.latest_portfolio = data
            await self._save_snapshot(connection, "portfolio", data, position)
        elif event.type == "status_change":
            paused = _paused(data)
            if paused is not None:
                self.paused = paused
                await self._save_snapshot(connection, "engine_status", {"paused": paused}, position)
        self.applied += 1

    async def _merge_proposal(
        self,
        connection: Any,
        proposal_id: str,
        fields: dict[str, Any],
        position: dict[str, Any],
        seen_at: str,
    ) -> None:
        row = await connection.fetch_first(
            "SELECT data FROM engine_proposals WHERE id = :id", {"id": proposal_id}
        )
        merged = {**(orjson.loads(row["data"]) if row is not None else {}), **fields}
        merged["proposal_id"] = proposal_id
        # first seen by a later event (or without a time): when the gateway first heard of it
        if not isinstance(merged.get("created_at"), str):
            merged["created_at"] = seen_at
        await connection.execute(
            "INSERT INTO engine_proposals (id, status, symbol, created_at, stream_id, seq, data) "
            "VALUES (:id, :status, :symbol, :created_at, :stream_id, :seq, :data) ON CONFLICT "
            "(id) DO UPDATE SET status = :status, symbol = :symbol, created_at = :created_at, "
            "stream_id = :stream_id, seq = :seq, data = :data "
            + _UPSERT_GUARD.format(table="engine_proposals"),
            {
                "id": proposal_id,
                "status": str(merged.get("status") or "pending"),
                "symbol": str(merged.get("symbol") or ""),
                "created_at": _epoch(merged.get("created_at"), 0.0),
                "data": orjson.dumps(merged).decode(),
                **position,
            },
        )

    async def _save_snapshot(
        self, connection: Any, name: str, data: dict[str, Any], position: dict[str, Any]
    ) -> None:
        await connection.execute(
            "INSERT INTO engine_snapshots (name, stream_id, seq, data) "
            "VALUES (:name, :stream_id, :seq, :data) ON CONFLICT (name) DO UPDATE SET "
            "stream_id = :stream_id, seq = :seq, data = :data "
            + _UPSERT_GUARD.format(table="engine_snapshots"),
            {"name": name, "data": orjson.dumps(data).decode(), **position},
        )

    # -- reading ------------------------------------------------------------------------------

    async def load(self) -> None:
        """What the model knew before a restart: the paused flag and the last portfolio."""
        async with self._db.connection() as connection:
            rows = await connection.fetch_all("SELECT name, data FROM engine_snapshots")
        snapshots = {row["name"]: orjson.loads(row["data"]) for row in rows}
        self.paused = bool(snapshots.get("engine_status", {}).get("paused", False))
        self.latest_portfolio = snapshots.get("portfolio")

    def portfolio(self) -> dict[str, Any]:
        if self.latest_portfolio is None:
            raise GatewayError(
                "NO_PORTFOLIO",
                "No portfolio yet",
                "The engine has not published a portfolio_update yet; retry shortly",
                retry_after=1,
            )
        return self.latest_portfolio

    async def proposal(self, proposal_id: str) -> dict[str, Any]:
        async with self._db.connection() as connection:
            row = await connection.fetch_first(
                "SELECT data FROM engine_proposals WHERE id = :id", {"id": proposal_id}
            )
        if row is None:
            raise GatewayError(
                "PROPOSAL_NOT_FOUND", "Proposal not found", f"No proposal {quoted(proposal_id)}"
            )
        return _proposal_out(row["data"])

    async def proposals(
        self, *, status: str | None, symbol: str | None, limit: int, offset: int
    ) -> tuple[list[dict[str, Any]], int]:
        where = (
            "WHERE (CAST(:status AS TEXT) IS NULL OR status = :status) "
            "AND (CAST(:symbol AS TEXT) IS NULL OR symbol = :symbol)"
        )
        params = {"status": status, "symbol": symbol}
        async with self._db.connection() as connection:
            rows = await connection.fetch_all(
                f"SELECT data FROM engine_proposals {where} "
                "ORDER BY created_at DESC, id LIMIT :limit OFFSET :offset",
                {**params, "limit": limit, "offset": offset},
            )
            total = await connection.fetch_val(
                f"SELECT COUNT(*) FROM engine_proposals {where}", params
            )
        return [_proposal_out(row["data"]) for row in rows], int(total)

    async def trades(self, *, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        async with self._db.connection() as connection:
            rows = await connection.fetch_all(
                "SELECT data FROM engine_trades ORDER BY executed_at DESC, order_id "
                "LIMIT :limit OFFSET :offset",
                {"limit": limit, "offset": offset},
            )
            total = await connection.fetch_val("SELECT COUNT(*) FROM engine_trades")
        return [orjson.loads(row["data"]) for row in rows], int(total)


_COUNTER = {
    "proposal_created": "proposals_created",
    "proposal_approved": "proposals_approved",
    "proposal_rejected": "proposals_rejected",
    "proposal_expired": "proposals_expired",
}


def _proposal_fields(event: Event) -> dict[str, Any]:
    """What a proposal event says of its proposal, in the REST proposal's field names."""
    data: dict[str, Any] = event.data
    if event.type == "proposal_created":
        return {"status": "pending", "created_at": event.timestamp, **data}
    if event.type == "proposal_approved":
        return {
            "status": "approved",
            "decided_by": data.get("approved_by"),
            "decided_at": data.get("approved_at", event.timestamp),
        }
    closed = {
        "status": data.get("status") or event.type.removeprefix("proposal_"),
        "status_reason": data.get("reason"),
        "decided_at": data.get("decided_at", event.timestamp),
    }
    if "decided_by" in data:
        closed["decided_by"] = data["decided_by"]
    return closed


def _proposal_out(stored: str) -> dict[str, Any]:
    """A stored proposal as REST shows it: what the engine sent, defaults where it sent
    nothing or null."""
    data = orjson.loads(stored)
    out = {
        name: default if data.get(name) is None else data[name]
        for name, default in PROPOSAL_DEFAULTS.items()
    }
    out["proposal_id"] = data["proposal_id"]
    return out


def _paused(data: dict[str, Any]) -> bool | None:
    """An engine's pause or resume: its `status_change` (ours or the original engine's fields).
    The gateway's own notices name another `component` and say nothing of the engine."""
    if data.get("component") not in (None, "engine"):
        return None
    status = data.get("current_status", data.get("status"))
    if status == "paused":
        return True
    if status == "running" and (data.get("previous") or data.get("previous_status")) == "paused":
        return False
    return None


def _epoch(timestamp: Any, default: float) -> float:
    if isinstance(timestamp, str):
        try:
            return datetime.fromisoformat(timestamp).timestamp()
        except ValueError:
            pass
    return default
