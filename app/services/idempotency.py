"""Idempotent ingest that outlives the bus's memory.

The bus remembers each Idempotency-Key with its batch's seqs for the window the README promises
(`EVENT_HISTORY_MAX_AGE`): in Redis, for every worker and host. A Redis that lost its data (or
failed over to a replica without the newest writes), and a restarted in-memory gateway, have
forgotten the keys they were given before. So every key is also written to the database (table
`published_batches`), off the request path, in batches; and for one window after the bus's
memory began, a key the bus does not know is looked up there first. Ingest needs the database
only then: if it does not answer at that moment, the publish is refused (503, retry) rather
than risk publishing a batch twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from app.services.bus import EventBus, IdempotencyConflict, Published, batch_fingerprint
from app.services.database import Database, uncut
from app.services.events import Event

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.5  # seconds between writes of the keys given
QUEUE_LIMIT = 100_000  # keys waiting while the database is away; the oldest go first
PRUNE_INTERVAL = 60.0

_INSERT = (
    "INSERT INTO published_batches (idempotency_key, fingerprint, first_seq, last_seq, "
    "published_at) VALUES (:key, :fingerprint, :first_seq, :last_seq, :at) "
    "ON CONFLICT (idempotency_key) DO NOTHING"
)


class IdempotentPublisher:
    """Publishes to `bus`, with each idempotency key also remembered in `db` for `window`
    seconds."""

    def __init__(self, bus: EventBus, db: Database, window: float) -> None:
        self._bus = bus
        self._db = db
        self.window = window
        self._pending: list[dict[str, Any]] = []
        self.dropped = 0  # keys not written: the queue overflowed while the database was away

    async def publish(self, events: list[Event], key: str | None) -> Published:
        if key is None or not events:
            return await self._bus.publish(events, key)
        fingerprint = batch_fingerprint(events)
        if time.time() - self._bus.keys_remembered_since < self.window:
            earlier = await self._recall(key)
            if earlier is not None:
                if earlier["fingerprint"] != fingerprint:
                    raise IdempotencyConflict(key)
                return Published(int(earlier["first_seq"]), int(earlier["last_seq"]), True)
        published = await self._bus.publish(events, key)
        if not published.repeated:
            self._pending.append(
                {
                    "key": key,
                    "fingerprint": fingerprint,
                    "first_seq": published.first_seq,
                    "last_seq": published.last_seq,
                    "at": time.time(),
                }
            )
            overflow = len(self._pending) - QUEUE_LIMIT
            if overflow > 0:
                del self._pending[:overflow]
                self.dropped += overflow
        return published

    async def _recall(self, key: str) -> Any:
        async with self._db.connection() as connection:
            return await connection.fetch_first(
                "SELECT fingerprint, first_seq, last_seq FROM published_batches "
                "WHERE idempotency_key = :key AND published_at >= :since",
                {"key": key, "since": time.time() - self.window},
            )

    async def run(self) -> None:
        """Write the keys given, every FLUSH_INTERVAL (kept while the database is away), and
        forget those past the window."""
        next_prune = time.monotonic() + PRUNE_INTERVAL
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush()
                if time.monotonic() >= next_prune:
                    await uncut(self._prune())
                    next_prune = time.monotonic() + PRUNE_INTERVAL
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the database is away: written once it is back
                log.debug("idempotency keys not written yet: %s", error)

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            await uncut(self._insert(pending))
        except BaseException:
            self._pending[:0] = pending
            raise

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        async with self._db.connection() as connection, connection.transaction():
            await connection.execute_many(_INSERT, rows)

    async def _prune(self) -> None:
        async with self._db.connection() as connection:
            await connection.execute(
                "DELETE FROM published_batches WHERE published_at < :cutoff",
                {"cutoff": time.time() - self.window},
            )
