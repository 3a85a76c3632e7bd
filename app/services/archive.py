"""The event archive: every stream event kept in the database (table `events`, migration 3), for
a resume that reaches back past the hot history, and for bulk export.

One worker of the deployment writes it, the archivist: without Redis the only worker; with
Redis the holder of a lease (`<REDIS_PREFIX>:archivist`), so each event is written once per
deployment, not once per worker. The archivist's bus listener only appends each event's history
entry to a list; a task writes the list in batches every ARCHIVE_FLUSH_INTERVAL, off the
fan-out path. What it did not see itself (it was elected late, the database was away and the
list overflowed) it takes from the hot history before writing on, so the archive has no gap as
long as the hot history reaches back that far. Writes ignore a seq already archived: two
archivists overlapping at a lease handover leave one row each.

Seq is the archive's key: a starting gateway continues the stream's numbering after the
archive's newest seq (`EventBus.raise_floor`), so a seq names one event for the deployment's
whole life, across restarts of the gateway and of Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.errors import GatewayError, quoted
from app.services.bus import EventBus
from app.services.database import DatabaseUnavailable, uncut
from app.services.events import (
    PUBLISHABLE_TOPICS,
    ErrorCode,
    Event,
    dumps,
    normalize_symbol,
    utc_timestamp,
)

log = logging.getLogger(__name__)

ARCHIVE_FLUSH_INTERVAL = 0.25  # seconds between batch writes
ARCHIVE_BATCH = 5000  # events per INSERT statement
# Events waiting while the database is away; past it the oldest are dropped and taken back
# from the hot history once it is reachable again.
ARCHIVE_QUEUE_LIMIT = 200_000
ARCHIVE_RETRY_DELAYS = (0.5, 10.0)  # first and longest wait after a failed write
ARCHIVE_PRUNE_INTERVAL = 60.0
# How long a resume waits for the archive to reach the hot history (a stream faster than the
# hot history is long, per flush interval).
ARCHIVE_CATCH_UP = 5.0
READ_PAGE = 1000  # rows per query when reading in pages

History = Callable[[int, int], Awaitable[tuple[list[Event], bool]]]

_COLUMNS = "seq, stream_id, type, topic, symbol, symbols, created_at, data"
_INSERT = (
    f"INSERT INTO events ({_COLUMNS}) VALUES (:seq, :stream_id, :type, :topic, :symbol, "
    ":symbols, :created_at, :data) ON CONFLICT (seq) DO NOTHING"
)


@dataclass(frozen=True)
class EventFilter:
    """Which archived events a read wants: since < seq <= until and, by time, created at or
    after `since_time` and at or before `until_time`; of `topics` (the event's own topic; none:
    every topic) and carrying one of `symbols` (none: any)."""

    since: int = 0
    until: int | None = None
    since_time: float | None = None
    until_time: float | None = None
    topics: tuple[str, ...] = ()
    symbols: tuple[str, ...] = ()

    def where(self) -> tuple[str, dict[str, Any]]:
        clauses = ["seq > :since"]
        values: dict[str, Any] = {"since": self.since}
        if self.until is not None:
            clauses.append("seq <= :until")
            values["until"] = self.until
        if self.since_time is not None:
            clauses.append("created_at >= :since_time")
            values["since_time"] = self.since_time
        if self.until_time is not None:
            # Timestamps are shown to the millisecond: an event's own is "at or before" it.
            clauses.append("created_at < :until_time")
            values["until_time"] = self.until_time + 0.001
        if self.topics:
            names = [f":topic{i}" for i in range(len(self.topics))]
            clauses.append(f"topic IN ({', '.join(names)})")
            values.update({name[1:]: topic for name, topic in zip(names, self.topics, strict=True)})
        if self.symbols:
            # Routing symbols are stored space-separated: one LIKE per symbol wanted.
            likes = []
            for i, symbol in enumerate(self.symbols):
                likes.append(f"(' ' || symbols || ' ') LIKE :symbol{i}")
                values[f"symbol{i}"] = f"% {symbol} %"
            clauses.append(f"({' OR '.join(likes)})")
        return " AND ".join(clauses), values


# A seq, or an RFC 3339 time: what the events' own timestamps are.
_SEQ = re.compile(r"[0-9]{1,18}")
_TIME = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
_ANY_CASE_SYMBOL = re.compile(r"[A-Za-z0-9]{1,20}/[A-Za-z0-9]{1,20}")


def parse_position(name: str, value: str | None) -> tuple[int | None, float | None]:
    """A `since`/`until` given as a seq (`1200`) or an RFC 3339 time (`2026-12-03T10:00:00Z`):
    (seq, None), (None, epoch seconds), or (None, None) when not given."""
    if value is None:
        return None, None
    if _SEQ.fullmatch(value):
        return int(value), None
    match = _TIME.fullmatch(value)
    try:
        if match is None:
            raise ValueError(value)
        day, minutes, seconds, fraction, offset = match.groups()
        # A leap second (:60) is the last second of its minute; past microseconds is noise.
        seconds = min(seconds, "59")
        fraction = (fraction or "")[:7]
        offset = "+00:00" if offset in ("Z", "z") else offset
        moment = datetime.fromisoformat(f"{day}T{minutes}:{seconds}{fraction}{offset}")
        return None, moment.timestamp()
    except (ValueError, OverflowError):
        raise GatewayError(
            ErrorCode.INVALID_POSITION,
            f"Invalid {name}",
            f"{name}={quoted(value)} is neither a seq (a whole number) nor an RFC 3339 time "
            "such as 2026-12-03T10:00:00Z",
        ) from None


def event_filter(
    since: str | None,
    until: str | None,
    topics: Sequence[str] = (),
    symbols: Sequence[str] = (),
) -> EventFilter:
    """The filter of an export or replay request: positions (seq or time), topics and
    symbols, each checked."""
    since_seq, since_time = parse_position("since", since)
    until_seq, until_time = parse_position("until", until)
    topic_names = tuple(topics)
    for topic in topic_names:
        if topic not in PUBLISHABLE_TOPICS:
            raise GatewayError(
                ErrorCode.INVALID_TOPIC,
                "Invalid topic",
                f"topic {quoted(topic)} is not one of {', '.join(sorted(PUBLISHABLE_TOPICS))}",
            )
    symbol_names = []
    for text in symbols:
        symbol = normalize_symbol(text) if _ANY_CASE_SYMBOL.fullmatch(text) else None
        if symbol is None:
            raise GatewayError(
                ErrorCode.INVALID_SYMBOL,
                "Invalid symbol",
                f"symbol {quoted(text)} is not BASE/QUOTE",
            )
        symbol_names.append(symbol)
    return EventFilter(
        since=since_seq or 0,
        until=until_seq,
        since_time=since_time,
        until_time=until_time,
        topics=topic_names,
        symbols=tuple(symbol_names),
    )


def ndjson_line(row: Any) -> bytes:
    """An archived event as one line of an export: its stored data as it is, not parsed."""
    head = dumps(
        {
            "seq": int(row["seq"]),
            "stream_id": row["stream_id"],
            "type": row["type"],
            "topic": row["topic"],
            "symbol": row["symbol"],
            "timestamp": utc_timestamp(float(row["created_at"])),
        }
    )
    return f'{head[:-1]},"data":{row["data"]}}}\n'.encode()


class Archive:
    """The archive of `bus`'s stream in `db`."""

    def __init__(self, db: Any, bus: EventBus, *, max_age: float, max_events: int) -> None:
        self._db = db
        self._bus = bus
        self.max_age = max_age
        self.max_events = max_events
        self.writing = False  # this worker is the archivist
        # Each event with the stream it came in (read when it arrives, not when written).
        self._pending: list[tuple[str, Event]] = []
        self._through = 0  # the newest seq this archivist wrote or found written
        self.written = 0  # events written by this worker since start
        self.dropped = 0  # events dropped from a full queue (then taken from the hot history)

    # -- writing (the archivist) --------------------------------------------------------------

    def observe(self, events: list[Event]) -> None:
        """The bus listener: keep each event for the next batch (nothing else on the fan-out
        path)."""
        if not self.writing:
            return
        stream_id = self._bus.stream_id
        self._pending.extend((stream_id, event) for event in events)
        overflow = len(self._pending) - ARCHIVE_QUEUE_LIMIT
        if overflow > 0:
            del self._pending[:overflow]
            self.dropped += overflow

    async def run(self) -> None:
        """Archive while this worker is the archivist (call `elected` first): write batches,
        prune by age and count, retry a failed write with backoff."""
        delay = ARCHIVE_RETRY_DELAYS[0]
        next_prune = time.monotonic()
        while True:
            await asyncio.sleep(ARCHIVE_FLUSH_INTERVAL)
            if not self.writing:
                continue
            try:
                await self.flush()
                if time.monotonic() >= next_prune:
                    await self.prune()
                    next_prune = time.monotonic() + ARCHIVE_PRUNE_INTERVAL
                delay = ARCHIVE_RETRY_DELAYS[0]
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.error("event archive: write failed (%s); retrying in %.1f s", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, ARCHIVE_RETRY_DELAYS[1])

    def behind(self, head: int) -> int:
        """Events up to `head` (the bus's) that this archivist has not written yet."""
        return max(0, head - self._through) if self.writing else 0

    async def elected(self) -> None:
        """This worker is now the archivist: it writes on from the archive's newest seq."""
        # (elected while the worker stops: the lease's task is cancelled)
        self._through = await uncut(self.head())
        self._pending.clear()
        self.writing = True
        log.info("this worker is the archivist: it archives events after seq %d", self._through)

    async def deposed(self) -> None:
        """Another worker holds the lease now; what this one holds is written when it stops."""
        self.writing = False

    async def flush(self) -> None:
        """Write what is pending, after what the hot history has between the last seq written
        and the first pending one (what this worker did not see itself). A failed write leaves
        it all pending."""
        pending, self._pending = self._pending, []
        try:
            first = pending[0][1].seq if pending else None
            if first is not None and first > self._through + 1:
                missed, _ = await self._bus.history(self._through, first - 1)
                current = self._bus.stream_id
                pending[:0] = [(current, event) for event in missed]
            rows = [_row(stream, event) for stream, event in pending if event.seq > self._through]
            if not rows:
                return
            await uncut(self._insert(rows))
        except BaseException:
            self._pending[:0] = pending
            raise
        self._through = rows[-1]["seq"]
        self.written += len(rows)

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        async with self._db.connection() as connection:
            for start in range(0, len(rows), ARCHIVE_BATCH):
                # One transaction per batch: SQLite would otherwise commit every row.
                async with connection.transaction():
                    await connection.execute_many(_INSERT, rows[start : start + ARCHIVE_BATCH])

    async def prune(self) -> None:
        """Drop events older than `max_age` and beyond the newest `max_events` (both by index:
        no count of the table)."""
        await uncut(self._prune())

    async def _prune(self) -> None:
        async with self._db.connection() as connection:
            await connection.execute(
                "DELETE FROM events WHERE created_at < :cutoff",
                {"cutoff": time.time() - self.max_age},
            )
            newest = await connection.fetch_val("SELECT MAX(seq) FROM events")
            if newest is not None:
                await connection.execute(
                    "DELETE FROM events WHERE seq <= :bound",
                    {"bound": int(newest) - self.max_events},
                )

    # -- reading (any worker) -----------------------------------------------------------------

    async def head(self) -> int:
        """The newest archived seq (0: none)."""
        async with self._db.connection() as connection:
            return int(await connection.fetch_val("SELECT MAX(seq) FROM events") or 0)

    async def holds(self, seq: int, stream_id: str | None) -> bool:
        """Whether the archive can continue a client's stream after `seq`: it has that event (of
        `stream_id`, when given), or, for 0, the stream's first event."""
        async with self._db.connection() as connection:
            if seq == 0:
                return await connection.fetch_val("SELECT MIN(seq) FROM events") == 1
            stored = await connection.fetch_val(
                "SELECT stream_id FROM events WHERE seq = :seq", {"seq": seq}
            )
        return stored is not None and (stream_id is None or stored == stream_id)

    async def export(self, wanted: EventFilter, limit: int) -> AsyncIterator[bytes]:
        """The wanted events as NDJSON, a page of lines at a time."""
        async for rows in self.pages(wanted, limit):
            yield b"".join(ndjson_line(row) for row in rows)

    async def read(self, wanted: EventFilter, limit: int | None = None) -> list[Event]:
        """The wanted events, oldest first, at most `limit`."""
        return [event async for event in self.iterate(wanted, limit)]

    async def iterate(self, wanted: EventFilter, limit: int | None = None) -> AsyncIterator[Event]:
        async for rows in self.pages(wanted, limit):
            for row in rows:
                yield _event(row)

    async def pages(
        self, wanted: EventFilter, limit: int | None = None
    ) -> AsyncIterator[list[Any]]:
        """The wanted rows in pages of READ_PAGE, by seq: memory stays bounded however many
        there are."""
        since = wanted.since
        left = limit
        while left is None or left > 0:
            page = READ_PAGE if left is None else min(READ_PAGE, left)
            where, values = dataclasses.replace(wanted, since=since).where()
            # (a replay whose client left)
            rows = await uncut(self._fetch(where, values, page))
            if not rows:
                return
            yield rows
            since = int(rows[-1]["seq"])
            if left is not None:
                left -= len(rows)
            if len(rows) < page:
                return

    async def _fetch(self, where: str, values: dict[str, Any], limit: int) -> list[Any]:
        async with self._db.connection() as connection:
            return list(
                await connection.fetch_all(
                    f"SELECT {_COLUMNS} FROM events WHERE {where} ORDER BY seq LIMIT {limit}",
                    values,
                )
            )


async def resume_history(
    archive: Archive | None,
    history: History,
    since: int,
    until: int,
    stream_id: str | None,
    current_stream: str,
) -> tuple[list[Event], bool]:
    """The events after `since` up to `until` for a client resuming the stream `stream_id` (None:
    the current one), oldest first, and whether nothing is missing: the hot history when it
    reaches back to `since`; else the archive from `since` on, then the hot history from where
    the archive ends. Recovered only if the seqs run on without a gap from `since` to `until`."""
    same_stream = stream_id is None or stream_id == current_stream
    if same_stream:
        events, recovered = await history(since, until)
        if recovered or archive is None:
            return events, recovered
    try:
        return await _resume_from_archive(archive, history, since, until, stream_id, same_stream)
    except DatabaseUnavailable:
        # The archive is out of reach: the client is told it was not recovered (as when the
        # archive lacks the events) rather than refused; it reloads state and goes on live.
        return ([], False) if not same_stream else await history(since, until)


async def _resume_from_archive(
    archive: Archive | None,
    history: History,
    since: int,
    until: int,
    stream_id: str | None,
    same_stream: bool,
) -> tuple[list[Event], bool]:
    if archive is None or not await archive.holds(since, stream_id):
        return ([], False) if not same_stream else await history(since, until)
    if since >= until:  # nothing after the client's last event yet, or it comes live
        return [], True
    archived: list[Event] = []
    deadline = time.monotonic() + ARCHIVE_CATCH_UP
    while True:
        through = archived[-1].seq if archived else since
        archived += await archive.read(EventFilter(since=through, until=until))
        through = archived[-1].seq if archived else since
        if through - since != len(archived):  # a seq missing in the archive
            return archived, False
        if through >= until:
            return archived, True
        hot, recovered = await history(through, until)
        if recovered or time.monotonic() > deadline:
            return archived + hot, recovered
        # The hot history no longer reaches back to where the archive ends (it is being
        # written behind a fast stream): read on once the archivist has written more.
        await asyncio.sleep(ARCHIVE_FLUSH_INTERVAL)


def _row(stream_id: str, event: Event) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "stream_id": stream_id,
        "type": event.type,
        "topic": event.topic,
        "symbol": event.symbol,
        "symbols": " ".join(event.symbols),
        "created_at": event.created,
        "data": event.data_json,
    }


def _event(row: Any) -> Event:
    symbols = tuple(row["symbols"].split()) if row["symbols"] else ()
    return Event.from_history(
        (
            int(row["seq"]),
            float(row["created_at"]),
            row["type"],
            row["topic"],
            row["symbol"],
            symbols,
            row["data"],
            "",
        )
    )
