"""The event bus: publish an event once, give it its `seq`, keep bounded history, deliver it.

One small interface with an in-memory backend (one process, the default). A Redis backend
implements the same interface to link every worker and host.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

from app.errors import GatewayError
from app.services import metrics
from app.services.events import Event, HistoryEntry

Listener = Callable[[list[Event]], None]


@dataclass(frozen=True)
class Published:
    """What a publish gave the batch: its seq range (None when empty). `repeated`: the
    idempotency key was used before, and this is that publish's result (nothing new was
    published)."""

    first_seq: int | None
    last_seq: int | None
    repeated: bool = False

    @property
    def accepted(self) -> int:
        return (
            0
            if self.first_seq is None or self.last_seq is None
            else (self.last_seq - self.first_seq + 1)
        )


@dataclass(frozen=True)
class StreamReset:
    """The stream this worker delivered was replaced (Redis lost its data), or goes on after a
    gap (a failover lost its newest events): the stream's id, the seq it continues after,
    whether this worker's clients missed nothing, and why."""

    stream_id: str
    last_seq: int
    recovered: bool
    reason: str = ""


class IdempotencyConflict(GatewayError):
    def __init__(self, key: str) -> None:
        super().__init__(
            "IDEMPOTENCY_KEY_REUSED",
            "Idempotency key reused",
            f"Idempotency-Key {key[:80]!r} was used for a different batch of "
            "events; a retry must send the same batch",
        )


def batch_fingerprint(events: list[Event]) -> str:
    """What a retry must repeat: each event's type, routing and data (not its creation time)."""
    digest = hashlib.blake2b(digest_size=16)
    for event in events:
        digest.update(f"{event.type}\0{event.topic}\0{event.symbol}\0".encode())
        digest.update(event.data_json.encode())
        digest.update(b"\1")
    return digest.hexdigest()


class EventBus(Protocol):
    backend: str
    # Names this stream: a `since` from another stream (a restarted in-memory gateway, a Redis
    # emptied by a restart) means nothing here.
    stream_id: str
    # Since when (epoch seconds; 0: ever) the bus remembers every idempotency key it was given:
    # a bus that started, or a Redis that lost data, since then has forgotten earlier ones.
    keys_remembered_since: float

    @property
    def head(self) -> int:
        """The seq of the newest event delivered to this process's listener (0 before any)."""

    def add_listener(self, listener: Listener) -> None:
        """Receive every published event, in seq order, exactly once, in batches."""

    def raise_floor(self, seq: int) -> None:
        """Before start: no event is given `seq` or a lower one (they are archived)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, events: list[Event], idempotency_key: str | None = None) -> Published:
        """Stamp each event with the next seq and deliver it to every process. With an
        `idempotency_key` used before (within the history's age), publish nothing and answer
        that publish's result; IdempotencyConflict if that was another batch."""

    async def history(self, since: int, until: int) -> tuple[list[Event], bool]:
        """The events with since < seq <= until (`until`: this process's head when asked, so
        that history ends exactly where live delivery goes on), oldest first, and whether
        `since` is a position of this stream that history still reaches back to. A `since`
        beyond `until` but within the stream (another worker is ahead) is recovered, with no
        events: they are still to come live."""


class MemoryBus:
    """Single-process bus. Publishing stamps, records and delivers synchronously, so a listener
    never sees events out of order and history never misses a delivered event."""

    backend = "memory"

    def __init__(self, history_size: int, history_max_age: float) -> None:
        self.stream_id = uuid.uuid4().hex
        self.keys_remembered_since = 0.0
        self._history: deque[HistoryEntry] = deque(maxlen=history_size)
        self._history_max_age = history_max_age
        self._seq = 0
        self._listeners: list[Listener] = []
        # Idempotency key -> (result, batch fingerprint, expiry), oldest first; bounded like
        # the history: a key is remembered at most as long as its events could be replayed.
        self._published: OrderedDict[str, tuple[Published, str, float]] = OrderedDict()
        self._published_max = history_size

    @property
    def head(self) -> int:
        return self._seq

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def raise_floor(self, seq: int) -> None:
        self._seq = max(self._seq, seq)
        if seq:  # a restart: the keys given before it are forgotten
            self.keys_remembered_since = time.time()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def publish(self, events: list[Event], idempotency_key: str | None = None) -> Published:
        now = time.time()
        self._expire(now)
        fingerprint = ""
        if idempotency_key is not None:
            fingerprint = batch_fingerprint(events)
            earlier = self._published.get(idempotency_key)
            if earlier is not None:
                if earlier[1] != fingerprint:
                    raise IdempotencyConflict(idempotency_key)
                return earlier[0]
        for event in events:
            self._seq += 1
            event.stamp(self._seq)
        published = Published(events[0].seq, events[-1].seq) if events else Published(None, None)
        if idempotency_key is not None:
            self._published[idempotency_key] = (
                Published(published.first_seq, published.last_seq, repeated=True),
                fingerprint,
                now + self._history_max_age,
            )
            if len(self._published) > self._published_max:
                self._published.popitem(last=False)
        self._history.extend(event.to_history() for event in events)
        metrics.count_published(events)
        for listener in self._listeners:
            listener(events)
        return published

    async def history(self, since: int, until: int) -> tuple[list[Event], bool]:
        self._expire(time.time())
        if since > until:
            return [], since <= self._seq
        return history_between(self._history, since, until)

    def _expire(self, now: float) -> None:
        cutoff = now - self._history_max_age
        history = self._history
        while history and history[0][1] < cutoff:
            history.popleft()
        published = self._published
        while published and next(iter(published.values()))[2] < now:
            published.popitem(last=False)


def history_between(
    history: deque[HistoryEntry], since: int, until: int
) -> tuple[list[Event], bool]:
    """The events of a gap-free `history` with since < seq <= until; see `EventBus.history`."""
    if since == until:
        return [], True
    if not history or history[0][0] > since + 1:
        return [Event.from_history(e) for e in history if e[0] <= until], False
    start = since + 1 - history[0][0]
    return [Event.from_history(e) for e in islice(history, start, start + until - since)], True
