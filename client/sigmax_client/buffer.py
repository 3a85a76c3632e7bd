"""`EventBuffer`: the bounded FIFO between the connection's reader and one consumer."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from sigmax_client.events import WSEvent


def _never() -> bool:
    return False


class EventBuffer:
    """Holds at most `maxsize` events. `put` waits while it is full, so a slow consumer stops
    the reader, and TCP then pushes back on the gateway.

    Two exceptions, asked each time the reader would wait: `may_exceed()` lets an event in past
    the bound (the consumer is waiting for a reply that is behind it on the connection), and
    `drop_oldest()` makes room by dropping the oldest event (nobody will ever consume it)."""

    def __init__(
        self,
        maxsize: int,
        *,
        may_exceed: Callable[[], bool] = _never,
        drop_oldest: Callable[[], bool] = _never,
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self.dropped = 0
        self._items: deque[WSEvent] = deque()
        self._may_exceed = may_exceed
        self._drop_oldest = drop_oldest
        self._closed = False
        self._putter_waiting = False
        self._waiters: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def putter_waiting(self) -> bool:
        """True while `put` waits for room."""
        return self._putter_waiting

    async def put(self, event: WSEvent) -> None:
        """Append `event`, waiting for room; after `close()` the event is discarded."""
        while len(self._items) >= self.maxsize and not self._closed:
            if self._drop_oldest():
                self._items.popleft()
                self.dropped += 1
                break
            if self._may_exceed():
                break
            self._putter_waiting = True
            try:
                await self._changed()
            finally:
                self._putter_waiting = False
        if self._closed:
            return
        self._items.append(event)
        self._notify()

    async def get(self) -> WSEvent | None:
        """The oldest event, waiting for one; None once closed and empty."""
        while not self._items:
            if self._closed:
                return None
            await self._changed()
        event = self._items.popleft()
        self._notify()
        return event

    def close(self, *, discard: bool = False) -> None:
        """No more events: `get` returns what is left (nothing if `discard`), then None."""
        self._closed = True
        if discard:
            self._items.clear()
        self._notify()

    def wake(self) -> None:
        """Make a waiting `put` ask `may_exceed` and `drop_oldest` again."""
        self._notify()

    async def _changed(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
