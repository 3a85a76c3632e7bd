"""Replay of archived events to one connection, for backtests and post-mortems: in seq order,
with their original seq and timestamps, paced at `speed` times their original spacing (0: as
fast as the client reads), then `replay_complete`.

A replay is apart from the connection's live subscriptions: each replayed frame carries the
replay's `request_id` (live events never do), and a replay never holds more than half the
connection's send queue, so a client that reads slowly slows its replay down instead of being
closed as a slow consumer; its live events keep the rest of the queue.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from app.errors import GatewayError
from app.services.archive import Archive, EventFilter
from app.services.connections import Connection
from app.services.events import ErrorCode, Event, dumps, envelope

QUEUE_POLL = 0.01  # seconds between looks at a full send queue


class ReplayInProgress(GatewayError):
    def __init__(self) -> None:
        super().__init__(
            ErrorCode.REPLAY_IN_PROGRESS,
            "A replay is already running",
            "A connection runs one replay at a time: wait for its replay_complete",
        )


def start_replay(
    archive: Archive,
    conn: Connection,
    wanted: EventFilter,
    speed: float,
    request_id: Any,
    queue_size: int,
) -> None:
    """Run a replay on `conn` in a task of its own (the connection's reader goes on)."""
    if conn.replay is not None and not conn.replay.done():
        raise ReplayInProgress()
    conn.replay = asyncio.get_running_loop().create_task(
        _replay(archive, conn, wanted, speed, request_id, max(1, queue_size // 2))
    )


async def _replay(
    archive: Archive,
    conn: Connection,
    wanted: EventFilter,
    speed: float,
    request_id: Any,
    room: int,
) -> None:
    tag = f',"request_id":{dumps(request_id)}}}'
    symbols = frozenset(wanted.symbols)
    count = 0
    last_seq = None
    started = time.monotonic()
    first_created: float | None = None
    async for event in archive.iterate(wanted):
        if conn.closing:
            return
        if speed > 0:
            if first_created is None:
                first_created = event.created
            due = started + (event.created - first_created) / speed
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        while conn.queue_depth >= room:
            if conn.closing:
                return
            await asyncio.sleep(QUEUE_POLL)
        conn.send_direct(_frame(event, symbols)[:-1] + tag)
        count += 1
        last_seq = event.seq
    conn.send_direct(
        envelope("replay_complete", {"count": count, "last_seq": last_seq}, conn.id, request_id)
    )


def _frame(event: Event, symbols: frozenset[str]) -> str:
    return event.view_for(symbols) if symbols else event.frame
