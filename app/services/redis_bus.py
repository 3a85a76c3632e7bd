"""The Redis backend of the event bus: one Redis Stream shared by every worker and host.

Publishing is one atomic script: a counter gives each event the next `seq` (deployment-wide, gap
free) and the event is appended to the stream with the id `<seq>-0`, trimmed to a bounded length.
Every worker, the publishing one included, reads the stream in order and hands each event to its
listener once: the origin worker never delivers locally, so nobody gets an event twice.

If Redis goes away, workers keep their connections, report degraded, reconnect with backoff and
read on from the last seq they delivered. Redis restarted empty (no persistence) would restart the
counter at 1; a reconnecting worker raises it back above what it has seen, so seq never repeats.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.errors import APIError
from app.services.bus import Listener
from app.services.events import Event

log = logging.getLogger(__name__)

# ARGV: the stream's length bound, then (routing fields, data) for each event.
_PUBLISH = """
local count = (#ARGV - 1) / 2
local last = redis.call('INCRBY', KEYS[2], count)
for i = 1, count do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], (last - count + i) .. '-0',
             'm', ARGV[2 * i], 'd', ARGV[2 * i + 1])
end
return last
"""

_RAISE_COUNTER = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return tonumber(ARGV[1])
end
return current
"""

READ_BLOCK_MS = 1000
READ_COUNT = 1000
WATCH_INTERVAL = 1.0


class BusUnavailable(APIError):
    """Publishing failed: Redis cannot be reached."""

    def __init__(self, details: str) -> None:
        super().__init__(503, "BUS_UNAVAILABLE", "Event stream unavailable", details)


class RedisBus:
    backend = "redis"

    def __init__(self, url: str, *, prefix: str, history_size: int, history_max_age: float,
                 deaf_after: float = 10.0) -> None:
        self._redis = aioredis.from_url(url, socket_timeout=READ_BLOCK_MS / 1000 + 5,
                                        socket_connect_timeout=5, health_check_interval=10)
        self._stream = f"{prefix}:events"
        self._counter = f"{prefix}:seq"
        self._stream_key = f"{prefix}:stream-id"
        self.stream_id = ""
        self._history_size = history_size
        self._history_max_age = history_max_age
        self._publish = self._redis.register_script(_PUBLISH)
        self._raise_counter = self._redis.register_script(_RAISE_COUNTER)
        self._listener: Listener = lambda events: None
        self._head = 0
        self._tasks: list[asyncio.Task[None]] = []
        # A worker whose head stays behind the stream's this long is not receiving: unhealthy.
        self._deaf_after = deaf_after
        self._link: bool | None = None  # unknown until the first attempt
        self.last_error: str | None = None
        self.stream_head = 0  # the counter as last seen in Redis
        self._behind_since: float | None = None
        self.on_link_change: Any = None  # callable(connected: bool, reason: str)

    @property
    def head(self) -> int:
        return self._head

    @property
    def connected(self) -> bool:
        return bool(self._link)

    @property
    def lag(self) -> int:
        return max(0, self.stream_head - self._head)

    @property
    def deaf(self) -> bool:
        return (self._behind_since is not None
                and time.monotonic() - self._behind_since > self._deaf_after)

    def set_listener(self, listener: Listener) -> None:
        self._listener = listener

    async def start(self) -> None:
        try:
            self._head = int(await self._redis.get(self._counter) or 0)
            self.stream_head = self._head
            await self._read_stream_id()
            self._set_link(True, "")
        except RedisError as error:
            # Start anyway: the consumer keeps trying, and the worker reports degraded.
            self._set_link(False, str(error))
        self._tasks = [asyncio.create_task(self._consume()), asyncio.create_task(self._watch())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._redis.aclose()

    async def publish(self, events: list[Event]) -> None:
        if not events:
            return
        try:
            last = int(await self._publish(
                keys=[self._stream, self._counter],
                args=[self._history_size, *(part for e in events for part in e.encode())]))
        except RedisError as error:
            raise BusUnavailable(f"Redis: {error}") from error
        for offset, event in enumerate(events):
            event.stamp(last - len(events) + 1 + offset)

    async def history_since(self, since: int) -> tuple[list[Event], bool]:
        known = max(self._head, self.stream_head)
        if since >= known:
            return [], since == known
        try:
            entries = await self._redis.xrange(self._stream, f"{since + 1}-0", "+")
        except RedisError:
            return [], False
        events = [self._event(entry_id, fields) for entry_id, fields in entries]
        cutoff = time.time() - self._history_max_age
        fresh = [e for e in events if e.created >= cutoff]
        recovered = bool(fresh) and fresh[0].seq == since + 1
        return fresh, recovered

    # -- consuming ----------------------------------------------------------------------------

    async def _consume(self) -> None:
        delay = 0.1
        while True:
            try:
                if not self.connected:
                    await self._reconnect()
                    delay = 0.1
                await self._read_once()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as error:
                self._set_link(False, str(error))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _reconnect(self) -> None:
        await self._redis.ping()  # type: ignore[misc]  # redis-py types sync and async alike
        self.stream_head = int(await self._raise_counter(keys=[self._counter],
                                                          args=[self._head]))
        await self._read_stream_id()
        self._set_link(True, "")

    async def _read_stream_id(self) -> None:
        """The deployment's stream id, created by whichever worker comes first; a Redis that
        restarted empty gets a new one (its history is gone)."""
        await self._redis.set(self._stream_key, uuid.uuid4().hex, nx=True)
        self.stream_id = (await self._redis.get(self._stream_key) or b"").decode()

    async def _read_once(self) -> None:
        reply = await self._redis.xread({self._stream: f"{self._head}-0"}, count=READ_COUNT,
                                        block=READ_BLOCK_MS)
        if reply:
            entries = reply[0][1]
            events = [self._event(entry_id, fields) for entry_id, fields in entries]
            self._head = events[-1].seq
            self._listener(events)

    async def _watch(self) -> None:
        """Compare this worker's head with the stream's, apart from the reading itself: a
        reader that is stuck, or reads nothing while the stream grows, is a deaf worker."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                self.stream_head = int(await self._redis.get(self._counter) or 0)
            except (RedisError, OSError):
                continue  # the reader reports the link
            if self.stream_head > self._head:
                self._behind_since = self._behind_since or time.monotonic()
            else:
                self._behind_since = None

    def _event(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
        event = Event.decode(fields[b"m"], fields[b"d"])
        event.stamp(int(entry_id.split(b"-", 1)[0]))
        return event

    def _set_link(self, connected: bool, reason: str) -> None:
        if connected == self._link:
            return  # logged once per change, not once per retry
        self._link = connected
        self.last_error = None if connected else reason
        if connected:
            log.info("Redis event stream connected (head %d)", self._head)
        else:
            log.warning("Redis event stream unavailable (%s); retrying with backoff", reason)
        if self.on_link_change is not None:
            self.on_link_change(connected, reason)
