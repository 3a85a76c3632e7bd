"""The connection registry, the subscription index and fan-out.

Each event is serialized once (`Event.frame`) and the same string is handed to every recipient.
Every connection has a bounded queue drained by its own writer, so a slow or dead client never
delays the others; when a queue is full, snapshots are conflated (newest per type and symbol) and
if that is not enough the connection is closed with SLOW_CONSUMER (the client resumes by `seq`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, cast

from app.errors import GatewayError, error_event
from app.services import metrics
from app.services.archive import Archive, resume_history
from app.services.bus import EventBus, StreamReset
from app.services.events import (
    PER_SYMBOL_LIST_TYPES,
    SYMBOL_PREFIX,
    CloseCode,
    ErrorCode,
    Event,
    envelope,
)
from app.services.ratelimit import TokenBucket
from app.services.transport import WRITE_BUFFER_LIMIT, Writer, open_writer, text_frame

log = logging.getLogger(__name__)

ConflationKey = tuple[str, str | None]
HEARTBEAT_KEY: ConflationKey = ("ping", None)
HEARTBEAT_SPREAD = 0.25  # of the heartbeat interval, added at random to a first ping's delay
HEARTBEAT_TICK = 1.0  # seconds between heartbeat rounds at most
# One event for one connection: the event, its frame as text and as a WebSocket frame.
Delivery = tuple[Event, str, bytes]
# The abuse limits whose refusals are counted: connections per worker and per API key,
# subscriptions per connection, commands per second, message size, REST requests per second.
LIMITS = (
    "connections",
    "connections_per_key",
    "subscriptions",
    "command_rate",
    "message_size",
    "rest_rate",
)


# Most connections subscribe to no symbol: one shared empty set instead of one each.
_NO_SYMBOLS: frozenset[str] = frozenset()


class ConnectionLimitExceeded(Exception):
    pass


def matches(keys: set[str], event: Event) -> bool:
    """Whether a subscription to `keys` covers `event`."""
    if "all" in keys or event.topic in keys:
        return True
    return any(SYMBOL_PREFIX + symbol in keys for symbol in event.symbols)


class Connection:
    """One WebSocket client: its subscriptions, its pending frames and their writer task.

    Its `Writer` (app/services/transport.py) knows how bytes reach the socket: a socket writer
    takes frames at once while the client keeps up, and the writer task exists only while the
    client is behind; the ASGI writer sends everything from a task that lives as long as the
    connection.
    """

    __slots__ = (
        "id",
        "principal",
        "scopes",
        "remote",
        "connected_at",
        "last_seen",
        "last_ping",
        "joined_seq",
        "keys",
        "symbols",
        "sent",
        "conflated",
        "queue_high_water",
        "close_code",
        "close_reason",
        "on_slow_consumer",
        "command_bucket",
        "_out",
        "_pending",
        "_queue_size",
        "_close_timeout",
        "_writer",
        "_wakeup",
        "_handler",
        "_abort_timer",
        "_held",
        "_replay_backlog",
        "_has_through",
        "replay",
    )

    def __init__(
        self,
        writer: Writer,
        *,
        queue_size: int,
        close_timeout: float,
        principal: str = "anonymous",
        scopes: frozenset[str] = frozenset(),
        remote: str = "",
        joined_seq: int = 0,
    ) -> None:
        self.id = str(uuid.uuid4())
        self.principal = principal
        self.scopes = scopes
        self.remote = remote
        self.connected_at = time.time()
        self.last_seen = time.monotonic()
        self.last_ping = self.last_seen
        self.joined_seq = joined_seq
        self.keys: set[str] = set()  # topics and `symbol:X` entries
        self.symbols: frozenset[str] = _NO_SYMBOLS
        self.sent = 0
        self.conflated = 0
        self.queue_high_water = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self.on_slow_consumer: Callable[[Connection], None] = _ignore
        self.command_bucket: TokenBucket | None = None  # created on the first command
        self._out = writer
        self._pending: list[tuple[str, ConflationKey | None]] = []
        self._queue_size = queue_size
        self._close_timeout = close_timeout
        self._writer: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._handler: asyncio.Task[Any] | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._held: list[tuple[int, str, ConflationKey | None]] | None = None
        # Replayed frames still pending: they may exceed the bound (history is bounded itself).
        self._replay_backlog = 0
        # The client has every stream event up to this seq (it resumed from another worker
        # that was ahead of this one): those still to come here live are not sent again.
        self._has_through = 0
        self.replay: asyncio.Task[None] | None = None  # a `replay` request running

    @property
    def closing(self) -> bool:
        return self.close_code is not None

    @property
    def fast_path(self) -> bool:
        return self._out.fast

    @property
    def closed_for_size(self) -> bool:
        return self._out.closed_for_size()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    def wants(self, event: Event) -> bool:
        return matches(self.keys, event)

    def frame_for(self, event: Event) -> str:
        """The frame of `event` this connection gets: the full one, or its symbols' view."""
        if (
            event.type in PER_SYMBOL_LIST_TYPES
            and "all" not in self.keys
            and event.topic not in self.keys
        ):
            return event.view_for(self.symbols)
        return event.frame

    # -- life cycle -------------------------------------------------------------------------

    def attach(self) -> None:
        """Bind to the connection's handler task (the current one) and start sending."""
        self._handler = asyncio.current_task()
        if self._out.persistent and self._writer is None:
            self._start_writer()

    def detach(self) -> None:
        """The handler is ending: stop the writer and the close timer, and let go of the
        handler task (it refers back to this connection through its frame)."""
        if self._writer is not None:
            self._writer.cancel()
        if self.replay is not None:
            self.replay.cancel()  # the handler awaits its end
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        self._handler = None

    async def closed(self) -> None:
        """Wait until the writer has sent the close frame (or given up)."""
        if self._writer is not None:
            await asyncio.shield(self._writer)

    def close(
        self, code: int, reason: str, *, notice: str | None = None, discard_pending: bool = False
    ) -> None:
        """Send what is pending (or drop it), an optional notice, then the close frame."""
        if self.closing:
            return
        self.close_code = code
        self.close_reason = reason
        if discard_pending:
            self._pending.clear()
            self._replay_backlog = 0
        if notice is not None:
            self._pending.append((notice, None))
        self._wake()
        # A client that stopped reading blocks the writer; past the timeout the connection is
        # dropped whatever the client does.
        if self._handler is not None:
            self._abort_timer = asyncio.get_running_loop().call_later(
                self._close_timeout, self._abort
            )

    def _abort(self) -> None:
        self._out.abort()
        for task in (self._writer, self._handler):
            if task is not None:
                task.cancel()

    # -- sending ----------------------------------------------------------------------------

    def send_direct(self, frame: str) -> None:
        """A reply or notice for this connection only. Never dropped."""
        self._push(frame, None, None)

    def send_ping(self) -> None:
        # Conflated like a snapshot: a stalled client needs no pile of pings.
        self._push(envelope("ping", {}, self.id), None, HEARTBEAT_KEY)

    def deliver(self, event: Event, frame: str, wire: bytes | None) -> None:
        """Hand over one stream event: `frame` as text, `wire` the same as a WebSocket frame."""
        if self._held is not None:
            self._held.append((event.seq, frame, event.conflation_key))
        elif event.seq > self._has_through:
            self._push(frame, wire, event.conflation_key)

    def deliver_batch(self, batch: list[Delivery]) -> None:
        """Several stream events at once: one write when the client keeps up."""
        if (
            self._held is None
            and not self._pending
            and not self.closing
            and batch[0][0].seq > self._has_through
            and self._out.fast
            and self._out.write_all_now([delivery[2] for delivery in batch])
        ):
            self.sent += len(batch)
            return
        for delivery in batch:
            self.deliver(*delivery)

    def hold(self) -> None:
        """Keep live events aside while a replay is fetched, so nothing overtakes it."""
        self._held = []

    def release(self, replayed: Iterable[Event], has_through: int = 0) -> None:
        """Send the replayed events, then the live ones held meanwhile that came after them
        and after `has_through` (the client has every event up to that seq)."""
        held, self._held = self._held or [], None
        last = max(has_through, self._has_through)
        if not self.closing:
            for event in replayed:
                self._pending.append((self.frame_for(event), event.conflation_key))
                self._replay_backlog += 1
                last = event.seq
            if self._pending:
                self._wake()
        for seq, frame, key in held:
            if seq > last:
                self._push(frame, None, key)
        self._has_through = max(self._has_through, last)

    def _push(self, frame: str, wire: bytes | None, key: ConflationKey | None) -> None:
        if self.closing:
            return
        pending = self._pending
        # Nothing of ours is waiting, so writing now keeps the order.
        if (
            not pending
            and self._out.fast
            and self._out.write_now(wire or text_frame(frame.encode()))
        ):
            self.sent += 1
            return
        if len(pending) >= self._queue_size + self._replay_backlog and not self._make_room(key):
            self.on_slow_consumer(self)
            self.close(
                CloseCode.POLICY_VIOLATION,
                "SLOW_CONSUMER",
                discard_pending=True,
                notice=error_event(
                    GatewayError(
                        ErrorCode.SLOW_CONSUMER,
                        "Connection too slow",
                        f"More than {self._queue_size} events waited for this connection; "
                        "reconnect and subscribe with `since` to resume",
                    ),
                    self.id,
                ),
            )
            return
        pending.append((frame, key))
        depth = len(pending)
        if depth > self.queue_high_water:
            self.queue_high_water = depth
        if depth == 1:
            self._wake()

    def _make_room(self, key: ConflationKey | None) -> bool:
        """Conflate the full queue: keep only the newest snapshot per key, counting the one that
        is about to be added. True when there is room afterwards."""
        seen: set[ConflationKey] = set() if key is None else {key}
        kept: list[tuple[str, ConflationKey | None]] = []
        for item in reversed(self._pending):
            item_key = item[1]
            if item_key is not None:
                if item_key in seen:
                    continue
                seen.add(item_key)
            kept.append(item)
        kept.reverse()
        self.conflated += len(self._pending) - len(kept)
        self._pending[:] = kept
        return len(kept) < self._queue_size + self._replay_backlog

    def _wake(self) -> None:
        if self._writer is None:
            self._start_writer()
        elif self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _start_writer(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        """Send pending frames in order; then the close frame once closing. Unless the writer
        is persistent, the task ends as soon as nothing is pending, and is started again when
        needed."""
        out = self._out
        try:
            while True:
                if self._pending:
                    batch, self._pending = self._pending, []
                    self._replay_backlog = 0
                    self.sent += len(batch)
                    if not await out.send([frame for frame, _ in batch]):
                        return
                    continue
                if self.closing:
                    assert self.close_code is not None
                    await out.close(self.close_code, self.close_reason)
                    return
                if not out.persistent:
                    self._writer = None
                    return
                self._wakeup = asyncio.get_running_loop().create_future()
                await self._wakeup
                self._wakeup = None
        except ConnectionError:
            pass  # the client is gone; its handler ends on the disconnect
        finally:
            if self._writer is asyncio.current_task():
                self._writer = None


def _ignore(conn: Connection) -> None:
    pass


def _chunks(events: list[Event], max_bytes: int) -> Iterator[list[Event]]:
    """Consecutive runs of events whose frames add up to at most `max_bytes` (at least one).
    Each event is framed here once (`Event.wire`): every subscriber gets the same bytes."""
    chunk: list[Event] = []
    size = 0
    for event in events:
        wire = event.wire
        if not wire:
            wire = event.wire = text_frame(event.frame.encode())
        if chunk and size + len(wire) > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(event)
        size += len(wire)
    if chunk:
        yield chunk


class SubscriptionIndex:
    """Routing key (`all`, a topic, `symbol:X`) -> the connections subscribed to it."""

    def __init__(self) -> None:
        self.by_key: dict[str, set[Connection]] = {}

    def add(self, conn: Connection, keys: Iterable[str]) -> None:
        for key in keys:
            self.by_key.setdefault(key, set()).add(conn)
            conn.keys.add(key)
        conn.symbols = _symbols_of(conn.keys)

    def remove(self, conn: Connection, keys: Iterable[str]) -> None:
        for key in keys:
            members = self.by_key.get(key)
            if members is not None:
                members.discard(conn)
                if not members:
                    del self.by_key[key]
            conn.keys.discard(key)
        conn.symbols = _symbols_of(conn.keys)

    def recipients(self, event: Event) -> tuple[Iterable[Connection], Iterable[Connection]]:
        """(connections that get the whole event, connections reached only through symbols)."""
        by_key = self.by_key
        whole = [s for s in (by_key.get("all"), by_key.get(event.topic)) if s]
        by_symbol = [s for s in (by_key.get(SYMBOL_PREFIX + sym) for sym in event.symbols) if s]
        if not by_symbol:
            return (whole[0] if len(whole) == 1 else set().union(*whole)), ()
        whole_set: set[Connection] = set().union(*whole)
        return whole_set, set().union(*by_symbol) - whole_set

    def counts(self) -> dict[str, int]:
        return {key: len(members) for key, members in sorted(self.by_key.items())}


def _symbols_of(keys: Iterable[str]) -> frozenset[str]:
    return (
        frozenset(k[len(SYMBOL_PREFIX) :] for k in keys if k.startswith(SYMBOL_PREFIX))
        or _NO_SYMBOLS
    )


class ConnectionManager:
    """The spec's ConnectionManager: registry, subscriptions, direct sends and broadcasts."""

    def __init__(
        self,
        bus: EventBus,
        *,
        max_connections: int,
        queue_size: int,
        heartbeat_interval: float,
        connection_timeout: float,
        close_timeout: float,
        fast_path: bool = True,
        max_per_key: int = 0,
    ) -> None:
        self.bus = bus
        # Where a resume reaches past the hot history (set by the gateway; None: nowhere).
        self.archive: Archive | None = None
        self.max_connections = max_connections
        self.queue_size = queue_size
        self.heartbeat_interval = heartbeat_interval
        self.connection_timeout = connection_timeout
        self.close_timeout = close_timeout
        self.fast_path = fast_path
        self.max_per_key = max_per_key  # connections per API key; 0 = no limit
        self.shutdown_watch: asyncio.Task[None] | None = None
        self.index = SubscriptionIndex()
        self.connections: dict[str, Connection] = {}
        self.started = time.time()
        self.counters = {
            "connections_total": 0,
            "auth_failures": 0,
            "events_published": 0,
            "deliveries": 0,
            "replayed": 0,
            "slow_consumer_closes": 0,
            "timeouts": 0,
        }
        # Requests refused by each abuse limit (see LIMITS), for /metrics.
        self.refusals = dict.fromkeys(LIMITS, 0)
        # Totals of connections that are gone, so the stats do not go backwards.
        self._closed_sent = 0
        self._closed_conflated = 0

    # -- registry ---------------------------------------------------------------------------

    async def connect(self, websocket: Any, metadata: dict[str, Any]) -> str:
        """Register an accepted WebSocket (spec API). `metadata`: principal, scopes, remote.

        Raises ConnectionLimitExceeded when the limit is reached."""
        if len(self.connections) >= self.max_connections:
            self.refuse("connections")
            raise ConnectionLimitExceeded(
                f"The gateway serves at most {self.max_connections} connections"
            )
        principal = metadata.get("principal", "anonymous")
        if (
            principal != "anonymous"
            and self.max_per_key
            and sum(c.principal == principal for c in self.connections.values()) >= self.max_per_key
        ):
            self.refuse("connections_per_key")
            raise ConnectionLimitExceeded(
                f"An API key may hold at most {self.max_per_key} connections"
            )
        writer = open_writer(cast(dict[str, Any], websocket.scope), self.fast_path)
        shutting_down = getattr(writer, "shutting_down", None)
        if shutting_down is not None and self.shutdown_watch is None:
            self.shutdown_watch = asyncio.create_task(self._close_all_on(shutting_down()))
        conn = Connection(
            writer,
            queue_size=self.queue_size,
            close_timeout=self.close_timeout,
            principal=principal,
            scopes=frozenset(metadata.get("scopes", ())),
            remote=metadata.get("remote", ""),
            joined_seq=self.bus.head,
        )
        conn.on_slow_consumer = self._count_slow_consumer
        # The first ping comes 1 to 1 + HEARTBEAT_SPREAD intervals after connecting: clients
        # that connected together (a benchmark, a mass reconnect after a deploy) are not pinged,
        # and do not answer, all in the same instant every interval.
        conn.last_ping += random.uniform(0, HEARTBEAT_SPREAD * self.heartbeat_interval)
        self.connections[conn.id] = conn
        self.counters["connections_total"] += 1
        return conn.id

    def refuse_authentication(self) -> None:
        """Count a connection refused for its API key."""
        self.counters["auth_failures"] += 1

    def refuse(self, limit: str) -> None:
        """Count a request refused by `limit` (one of LIMITS)."""
        self.refusals[limit] += 1

    def forget(self, conn: Connection) -> None:
        """Remove a connection from the registry and every subscription (idempotent)."""
        if self.connections.pop(conn.id, None) is None:
            return
        self.index.remove(conn, list(conn.keys))
        if conn.closed_for_size:
            self.refuse("message_size")
        self._closed_sent += conn.sent
        self._closed_conflated += conn.conflated

    async def _close_all_on(self, shutting_down: Awaitable[None]) -> None:
        """When the server shuts down, tell every client and close with 1001 at once, rather
        than leaving them to be cut off after the graceful timeout."""
        await shutting_down
        self.close_all_for_shutdown()

    def close_all_for_shutdown(self) -> None:
        """Tell every client that this worker is going away, and close it with 1001."""
        log.info("shutting down: closing %d connections with 1001", len(self.connections))
        for conn in list(self.connections.values()):
            conn.close(
                CloseCode.GOING_AWAY,
                "SERVER_SHUTDOWN",
                notice=envelope(
                    "status_change",
                    {
                        "status": "shutting_down",
                        "reason": "the server is shutting down; reconnect and resume with `since`",
                    },
                    conn.id,
                ),
            )

    def close_unadmitted(self, admits: Callable[[str], bool]) -> None:
        """Close (1008, AUTHENTICATION_FAILED) every connection whose principal `admits` no
        longer lets in: keyless ones once the gateway is keyed, those of a revoked key."""
        refused = [
            c for c in self.connections.values() if not c.closing and not admits(c.principal)
        ]
        if refused:
            log.warning("API keys changed: closing %d connections no longer admitted", len(refused))
        for conn in refused:
            keyless = conn.principal == "anonymous"
            conn.close(
                CloseCode.POLICY_VIOLATION,
                ErrorCode.AUTHENTICATION_FAILED,
                notice=error_event(
                    GatewayError(
                        ErrorCode.AUTHENTICATION_FAILED,
                        "Missing API key" if keyless else "Invalid API key",
                        "This gateway now requires an API key (?api_key= or X-API-Key)"
                        if keyless
                        else "The API key was revoked",
                    ),
                    conn.id,
                ),
            )

    async def disconnect(self, connection_id: str) -> None:
        conn = self.connections.get(connection_id)
        if conn is not None:
            conn.close(1000, "disconnected by server")
            self.forget(conn)

    def _count_slow_consumer(self, conn: Connection) -> None:
        self.counters["slow_consumer_closes"] += 1
        log.warning("closing slow consumer %s (%s): queue full", conn.id, conn.remote)

    # -- subscriptions ----------------------------------------------------------------------

    async def subscribe(self, connection_id: str, topic: str) -> None:
        """Add one routing key (`market`, `symbol:BTC/USDT`, ...) to a connection."""
        self.index.add(self.connections[connection_id], [topic])

    async def unsubscribe(self, connection_id: str, topic: str) -> None:
        self.index.remove(self.connections[connection_id], [topic])

    async def subscribe_with_resume(
        self,
        conn: Connection,
        keys: list[str],
        since: int | None,
        acknowledge: Callable[[int, bool], None],
        stream_id: str | None = None,
    ) -> None:
        """Add `keys`; with `since`, replay the missed events that match the subscription and
        that this connection did not get live, then continue live: from the hot history, and
        from the archive where the hot history does not reach back to `since` or the client's
        stream (`stream_id`) is an earlier one (see `resume_history`). Without the events in
        either, nothing is replayed and recovered is false.

        Replay and live delivery meet at exactly one seq: live events are held from the moment
        this worker's head is read, and history is read up to that head, never further (the
        stream may be ahead of this worker; those events come live).

        `acknowledge(replayed, recovered)` queues the reply, so that it precedes the replay."""
        if since is None:
            self.index.add(conn, keys)
            acknowledge(0, True)
            return
        before = set(conn.keys)
        joined = conn.joined_seq
        held_from = self.bus.head
        conn.hold()
        self.index.add(conn, keys)
        try:
            history, recovered = await resume_history(
                self.archive, self.bus.history, since, held_from, stream_id, self.bus.stream_id
            )
        except BaseException:
            conn.release(())
            raise

        def missed(event: Event) -> bool:
            if not conn.wants(event):
                return False
            delivered_live = joined < event.seq <= held_from and matches(before, event)
            return not delivered_live

        replay = [e for e in history if missed(e)]
        acknowledge(len(replay), recovered)
        # The client has everything up to `since` of these keys only: on a connection that
        # already had subscriptions, live events of those must still come (a duplicate of the
        # new keys is the lesser harm; clients drop a seq they have seen).
        conn.release(replay, has_through=since if recovered and not before else 0)
        self.counters["replayed"] += len(replay)

    # -- sending ----------------------------------------------------------------------------

    async def send_to(self, connection_id: str, message: dict[str, Any]) -> bool:
        conn = self.connections.get(connection_id)
        if conn is None or conn.closing:
            return False
        conn.send_direct(
            envelope(message["type"], message.get("data"), conn.id, message.get("request_id"))
        )
        return True

    async def broadcast(self, message: dict[str, Any], topic: str | None = None) -> None:
        """Publish one event to the subscribers of `topic` (default: its type's topic)."""
        await self.bus.publish(
            [Event(message["type"], message.get("data"), topic=topic, symbol=message.get("symbol"))]
        )

    async def broadcast_to_symbols(self, symbols: list[str], message: dict[str, Any]) -> None:
        """Publish one event per symbol to `symbol:X` subscribers (and its type's topic)."""
        await self.bus.publish(
            [Event(message["type"], message.get("data"), symbol=symbol) for symbol in symbols]
        )

    def notify_all(self, type_: str, data: dict[str, Any]) -> None:
        """A notice to every connection of this worker, outside the stream (no seq): for what
        concerns this worker only, such as losing its link to Redis."""
        for conn in list(self.connections.values()):
            conn.send_direct(envelope(type_, data, conn.id))

    def stream_reset(self, reset: StreamReset) -> None:
        """Redis lost the stream and this worker moved to a new one, or a failover lost events:
        every client learns the stream's id (to resume from it) and, unless nothing was
        missed, to reload its state."""
        metrics.STREAM_RESETS.labels("true" if reset.recovered else "false").inc()
        self.notify_all(
            "stream_reset",
            {
                "stream_id": reset.stream_id,
                "last_seq": reset.last_seq,
                "recovered": reset.recovered,
                "reason": reset.reason
                or "the event stream was re-established after Redis lost its data; "
                + (
                    "no event was missed"
                    if reset.recovered
                    else f"events up to seq {reset.last_seq} may be missing: reload state over REST"
                ),
            },
        )

    def fan_out(self, events: list[Event]) -> None:
        """Hand each event to every subscribed connection, once each, in seq order.

        The frames of a batch are gathered per connection and written together: one system
        call per connection instead of one per event (when the batch is small enough that the
        joined copy per connection stays within the transport's buffer limit)."""
        if not events:
            return
        started = time.perf_counter()
        deliveries = 0
        for chunk in _chunks(events, WRITE_BUFFER_LIMIT):
            if len(chunk) == 1:
                for conn, delivery in self._deliveries(chunk[0]):
                    conn.deliver(*delivery)
                    deliveries += 1
                continue
            gathered: dict[Connection, list[Delivery]] = {}
            for event in chunk:
                for conn, delivery in self._deliveries(event):
                    deliveries += 1
                    if (batch := gathered.get(conn)) is None:
                        gathered[conn] = [delivery]
                    else:
                        batch.append(delivery)
            for conn, batch in gathered.items():
                conn.deliver_batch(batch)
        self.counters["events_published"] += len(events)
        self.counters["deliveries"] += deliveries
        metrics.FANOUT_SECONDS.observe((time.perf_counter() - started) / len(events))
        if deliveries:
            metrics.DELIVERY_LATENCY.observe(time.time() - events[0].created)

    def _deliveries(self, event: Event) -> Iterator[tuple[Connection, Delivery]]:
        whole, by_symbol = self.index.recipients(event)
        delivery: Delivery = (event, event.frame, event.wire)
        for conn in whole:
            yield conn, delivery
        if by_symbol:
            views: dict[frozenset[str], Delivery] = {}
            for conn in by_symbol:
                view = views.get(conn.symbols)
                if view is None:
                    text = conn.frame_for(event)
                    view = views[conn.symbols] = (
                        delivery
                        if text is event.frame
                        else (event, text, text_frame(text.encode()))
                    )
                yield conn, view

    # -- heartbeat --------------------------------------------------------------------------

    def heartbeat(self, now: float) -> None:
        """Ping connections that are due; close those silent for longer than the timeout."""
        for conn in list(self.connections.values()):
            if conn.closing:
                continue
            if now - conn.last_seen > self.connection_timeout:
                self.counters["timeouts"] += 1
                conn.close(
                    CloseCode.GOING_AWAY,
                    "CONNECTION_TIMEOUT",
                    notice=error_event(
                        GatewayError(
                            ErrorCode.CONNECTION_TIMEOUT,
                            "Connection timed out",
                            f"No message from the client for {self.connection_timeout:g} seconds",
                        ),
                        conn.id,
                    ),
                )
            elif now - conn.last_ping >= self.heartbeat_interval:
                conn.last_ping = now
                conn.send_ping()

    async def run_heartbeat(self) -> None:
        # Fine enough that pings go out close to each connection's own due time, not in batches.
        tick = min(HEARTBEAT_TICK, self.heartbeat_interval / 4, self.connection_timeout / 4)
        while True:
            await asyncio.sleep(tick)
            self.heartbeat(time.monotonic())

    # -- introspection ----------------------------------------------------------------------

    def get_stats(self) -> dict[str, Any]:
        conns = self.connections.values()
        depths = [c.queue_depth for c in conns]
        topic_counts = self.index.counts()
        return {
            "active_connections": len(self.connections),
            "fast_path_connections": sum(1 for c in conns if c.fast_path),
            "max_connections": self.max_connections,
            **self.counters,
            "connections_rejected": (
                self.refusals["connections"] + self.refusals["connections_per_key"]
            ),
            "messages_sent": self._closed_sent + sum(c.sent for c in conns),
            "frames_conflated": self._closed_conflated + sum(c.conflated for c in conns),
            "queue_depth_total": sum(depths),
            "queue_depth_max": max(depths, default=0),
            "last_seq": self.bus.head,
            "bus_backend": self.bus.backend,
            "subscriptions": topic_counts,
            "refusals": dict(self.refusals),
            "uptime_seconds": round(time.time() - self.started, 3),
        }

    def get_connection_info(self, connection_id: str) -> dict[str, Any] | None:
        conn = self.connections.get(connection_id)
        if conn is None:
            return None
        return {
            "connection_id": conn.id,
            "principal": conn.principal,
            "remote": conn.remote,
            "connected_at": conn.connected_at,
            "topics": sorted(k for k in conn.keys if not k.startswith(SYMBOL_PREFIX)),
            "symbols": sorted(conn.symbols),
            "messages_sent": conn.sent,
            "frames_conflated": conn.conflated,
            "queue_depth": conn.queue_depth,
            "queue_high_water": conn.queue_high_water,
            "fast_path": conn.fast_path,
        }
