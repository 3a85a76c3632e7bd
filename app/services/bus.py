"""The event bus: publish an event once, give it its `seq`, keep bounded history, deliver it.

One small interface with an in-memory backend (one process, the default). A Redis backend
implements the same interface to link every worker and host.
"""
from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Protocol

from app.services.events import Event

Listener = Callable[[list[Event]], None]


class EventBus(Protocol):
    backend: str
    # Names this stream: a `since` from another stream (a restarted in-memory gateway, a Redis
    # emptied by a restart) means nothing here.
    stream_id: str

    @property
    def head(self) -> int:
        """The seq of the newest event delivered to this process's listener (0 before any)."""

    def set_listener(self, listener: Listener) -> None:
        """Receive every published event, in seq order, exactly once, in batches."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, events: list[Event]) -> None:
        """Stamp each event with the next seq and deliver it to every process."""

    async def history_since(self, since: int) -> tuple[list[Event], bool]:
        """Events with seq > since up to `head`, oldest first, and whether history reached back
        to `since` (False: some events after `since` are gone, or `since` is unknown)."""


class MemoryBus:
    """Single-process bus. Publishing stamps, records and delivers synchronously, so a listener
    never sees events out of order and history never misses a delivered event."""

    backend = "memory"

    def __init__(self, history_size: int, history_max_age: float) -> None:
        self.stream_id = uuid.uuid4().hex
        self._history: deque[Event] = deque(maxlen=history_size)
        self._history_max_age = history_max_age
        self._seq = 0
        self._listener: Listener = lambda events: None

    @property
    def head(self) -> int:
        return self._seq

    def set_listener(self, listener: Listener) -> None:
        self._listener = listener

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def publish(self, events: list[Event]) -> None:
        for event in events:
            self._seq += 1
            event.stamp(self._seq)
        self._history.extend(events)
        self._expire(time.time())
        self._listener(events)

    async def history_since(self, since: int) -> tuple[list[Event], bool]:
        self._expire(time.time())
        return history_after(self._history, since, self._seq)

    def _expire(self, now: float) -> None:
        cutoff = now - self._history_max_age
        history = self._history
        while history and history[0].created < cutoff:
            history.popleft()


def history_after(history: deque[Event], since: int, head: int) -> tuple[list[Event], bool]:
    """The events of a gap-free `history` after `since`; see `EventBus.history_since`."""
    if since >= head:
        return [], since == head
    if not history or history[0].seq > since + 1:
        return list(history), False
    return list(islice(history, since + 1 - history[0].seq, None)), True
