"""The Redis backend of the event bus: one Redis Stream shared by every worker and host.

Publishing is one atomic script: a counter gives each event the next `seq` (deployment-wide, gap
free) and the event is appended to the stream with the id `<seq>-0`, trimmed to a bounded length.
Every worker, the publishing one included, reads the stream in order and hands each event to its
listener once: the origin worker never delivers locally, so nobody gets an event twice.

If Redis goes away, workers keep their connections, report degraded, reconnect with backoff and
read on from the last seq they delivered.

If Redis comes back empty (restarted without persistence, a failover to an empty replica,
FLUSHALL), its counter would start again at 1. The stream has an id (`stream-id`) that every
publish names: a publish for a stream that is gone is refused, never given a seq. The first worker
to see the loss starts a new stream and, for SETTLE_SECONDS, nobody may publish: meanwhile every
worker raises the counter above every seq it saw or gave (each does so at least once a second),
so no seq is ever used twice. Each worker then moves its clients to the new stream and tells them
its id and whether they missed anything (`StreamReset`).

If Redis fails over (Sentinel or a cluster promotes a replica, or it restarts from a snapshot),
the server that answers may lack the newest writes: its counter and stream can be behind what
workers saw or gave. Every script names the server it runs on (its run id) and compares it with
the one the stream was last confirmed on (`epoch`): on another server it settles the stream as
above, with the same stream id, before anyone publishes. Events that only the old server had are
skipped, never numbered again; a worker whose reader finds such a gap tells its clients what
they missed (`StreamReset`, same stream, `recovered: false`), never silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

from redis.exceptions import RedisError

from app.errors import GatewayError
from app.services import metrics
from app.services.bus import (
    IdempotencyConflict,
    Listener,
    Published,
    StreamReset,
    batch_fingerprint,
)
from app.services.events import Event
from app.services.redis_client import RedisTarget, Script

log = logging.getLogger(__name__)

# Whether this script runs on another server than the stream was last confirmed on (a promoted
# replica, a restart from a snapshot): then the stream settles, and the server is confirmed.
# KEYS[5]: the epoch (that server's run id); settles for `settle_ms`. KEYS[6]: since when this
# Redis remembers every idempotency key (a server that may lack writes may lack keys too).
_FENCE = """
local function forgot_keys()
  redis.call('SET', KEYS[6], redis.call('TIME')[1])
end
local function fence(settle_ms)
  local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
  local epoch = redis.call('GET', KEYS[5])
  if epoch == run_id then
    return false
  end
  redis.call('SET', KEYS[5], run_id)
  if epoch and redis.call('EXISTS', KEYS[3]) == 1 then
    redis.call('SET', KEYS[4], '1', 'PX', settle_ms)
    forgot_keys()
    return true
  end
  return false
end
"""

# KEYS: stream, counter, stream id, settling flag, epoch, keys since[, idempotency key].
# ARGV: the stream id the worker publishes to, its floor (no seq at or below it may be given),
# the stream's length bound, the batch's fingerprint, the idempotency key's lifetime in ms, how
# long a fenced stream settles (ms), then (routing, data) per event.
_PUBLISH = (
    _FENCE
    + """
local stream_id = redis.call('GET', KEYS[3])
if stream_id ~= ARGV[1] then
  return {'moved', stream_id or ''}
end
fence(ARGV[6])
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {'settling', redis.call('PTTL', KEYS[4])}
end
if KEYS[7] then
  local earlier = redis.call('GET', KEYS[7])
  if earlier then
    return {'repeated', earlier}
  end
end
local count = (#ARGV - 6) / 2
local last = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), tonumber(ARGV[2])) + count
redis.call('SET', KEYS[2], last)
for i = 1, count do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], (last - count + i) .. '-0',
             'm', ARGV[5 + 2 * i], 'd', ARGV[6 + 2 * i], 's', ARGV[1])
end
if KEYS[7] then
  redis.call('SET', KEYS[7], (last - count + 1) .. ' ' .. last .. ' ' .. ARGV[4], 'PX', ARGV[5])
end
return {'ok', last}
"""
)

# KEYS: stream, counter, stream id, settling flag, epoch, keys since. ARGV: the worker's floor,
# a new stream id to use if the stream is gone, how long a new stream settles (ms; 0 for a
# deployment's first start), how long a fenced one settles. Returns the stream id, the counter
# (raised to the floor), the settling time left (ms, <= 0 when settled), whether this call
# started the stream, the stream's first seq (0: none), and since when idempotency keys are
# remembered (0: ever).
_SYNC = (
    _FENCE
    + """
fence(ARGV[4])
local stream_id = redis.call('GET', KEYS[3])
local created = 0
if not stream_id then
  stream_id = ARGV[2]
  created = 1
  redis.call('SET', KEYS[3], stream_id)
  if tonumber(ARGV[3]) > 0 then
    redis.call('SET', KEYS[4], '1', 'PX', ARGV[3])
    forgot_keys()
  end
end
local counter = tonumber(redis.call('GET', KEYS[2]) or '0')
if counter < tonumber(ARGV[1]) then
  counter = tonumber(ARGV[1])
  redis.call('SET', KEYS[2], ARGV[1])
end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local first_seq = 0
if #first > 0 then
  first_seq = tonumber(string.match(first[1][1], '^%d+'))
end
local keys_since = tonumber(redis.call('GET', KEYS[6]) or '0')
return {stream_id, counter, redis.call('PTTL', KEYS[4]), created, first_seq, keys_since}
"""
)

READ_BLOCK_MS = 1000
READ_COUNT = 1000
WATCH_INTERVAL = 1.0
# A new stream waits this long before the first publish: every live worker syncs once a second.
SETTLE_SECONDS = 3 * WATCH_INTERVAL
RECONNECT_DELAYS = (0.1, 5.0)  # the reader's backoff, first and longest


class BusUnavailable(GatewayError):
    """Publishing failed: Redis cannot be reached, or its stream is being re-established."""

    def __init__(self, details: str, retry_after: float = 1.0) -> None:
        super().__init__(
            "BUS_UNAVAILABLE", "Event stream unavailable", details, retry_after=retry_after
        )


class RedisBus:
    backend = "redis"

    def __init__(
        self,
        target: RedisTarget,
        *,
        prefix: str,
        history_size: int,
        history_max_age: float,
        deaf_after: float = 10.0,
    ) -> None:
        self.mode = target.mode
        self._redis = target.connect(
            socket_timeout=READ_BLOCK_MS / 1000 + 5,
            socket_connect_timeout=5,
            health_check_interval=10,
        )
        prefix = target.key_prefix(prefix)
        self._prefix = prefix
        self._stream = f"{prefix}:events"
        self._counter = f"{prefix}:seq"
        self._stream_key = f"{prefix}:stream-id"
        self._settling_key = f"{prefix}:stream-settling"
        # Every script's first keys, in this order (see _FENCE).
        self._keys = [
            self._stream,
            self._counter,
            self._stream_key,
            self._settling_key,
            f"{prefix}:epoch",
            f"{prefix}:keys-since",
        ]
        self.keys_remembered_since = time.time()  # until the first sync says
        self.stream_id = ""
        self._history_size = history_size
        self._history_max_age = history_max_age
        self._publish = Script(self._redis, _PUBLISH)
        self._sync_script = Script(self._redis, _SYNC)
        self._listeners: list[Listener] = []
        self._head = 0
        # The highest seq this worker gave an event: part of its floor, with what it read.
        self._last_given = 0
        self._tasks: list[asyncio.Task[None]] = []
        # A worker whose head stays behind the stream's this long is not receiving: unhealthy.
        self._deaf_after = deaf_after
        self._link: bool | None = None  # unknown until the first attempt
        self.last_error: str | None = None
        self.stream_head = 0  # the counter as last seen in Redis
        self._behind_since: float | None = None
        # The stream that replaces ours while it settles, and whether we saw it settle (if not,
        # events may have been given seqs we had seen: our clients are told they lost some).
        self._next_stream: str | None = None
        self._saw_settling = False
        self._retry_now = asyncio.Event()
        self._sync_lock = asyncio.Lock()
        self.on_link_change: Callable[[bool, str], None] | None = None
        self.on_stream_reset: Callable[[StreamReset], None] | None = None

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
        return (
            self._behind_since is not None
            and time.monotonic() - self._behind_since > self._deaf_after
        )

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def raise_floor(self, seq: int) -> None:
        # Part of the floor every sync raises the counter to: a Redis that lost its data
        # does not number again what the archive holds.
        self._last_given = max(self._last_given, seq)

    async def start(self) -> None:
        try:
            await self._sync()
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

    async def publish(self, events: list[Event], idempotency_key: str | None = None) -> Published:
        if not events:
            return Published(None, None)
        keys = list(self._keys)
        if idempotency_key is not None:
            keys.append(f"{self._prefix}:published:{idempotency_key}")
        fingerprint = batch_fingerprint(events) if idempotency_key is not None else ""
        parts = [part for event in events for part in event.encode()]
        for attempt in range(2):
            args: list[str | int | bytes] = [
                self.stream_id,
                self._floor(),
                self._history_size,
                fingerprint,
                int(self._history_max_age * 1000),
                int(SETTLE_SECONDS * 1000),
                *parts,
            ]
            try:
                outcome, value = await self._publish(keys=keys, args=args)
            except RedisError as error:
                raise BusUnavailable(f"Redis: {error}") from error
            if outcome == b"ok":
                break
            if outcome == b"repeated":
                first, last, earlier_fingerprint = value.decode().split(" ")
                if earlier_fingerprint != fingerprint:
                    raise IdempotencyConflict(idempotency_key or "")
                return Published(int(first), int(last), repeated=True)
            if outcome == b"settling":
                raise BusUnavailable(
                    "the event stream is being re-established after Redis lost its data or "
                    "failed over",
                    retry_after=max(int(value), 0) / 1000,
                )
            # moved: Redis lost the stream, or another worker replaced it before we knew
            with contextlib.suppress(RedisError, OSError):
                await self._sync()
            if self._next_stream is not None or attempt:
                raise BusUnavailable(
                    "the event stream is being re-established after Redis lost its data",
                    retry_after=SETTLE_SECONDS,
                )
        last = int(value)
        self._last_given = max(self._last_given, last)
        for offset, event in enumerate(events):
            event.stamp(last - len(events) + 1 + offset)
        metrics.count_published(events)
        if not self.connected:
            self._retry_now.set()  # Redis is back: the reader need not wait out its backoff
        return Published(events[0].seq, last)

    async def history(self, since: int, until: int) -> tuple[list[Event], bool]:
        if since == until:
            return [], True
        try:
            if since > until:
                # Another worker was ahead: fine if the stream has come that far.
                return [], since <= int(await self._redis.get(self._counter) or 0)
            entries = await self._redis.xrange(self._stream, f"{since + 1}-0", f"{until}-0")
        except RedisError:
            return [], False
        events = [self._event(entry_id, fields) for entry_id, fields in entries]
        cutoff = time.time() - self._history_max_age
        fresh = [e for e in events if e.created >= cutoff]
        # Gap free from since to until: a failover can leave a hole, or lose the newest.
        recovered = bool(fresh) and fresh[0].seq == since + 1 and len(fresh) == until - since
        return fresh, recovered

    # -- the stream's identity ----------------------------------------------------------------

    def _floor(self) -> int:
        """No seq at or below this may be given again: every seq this worker saw or gave."""
        return max(self._head, self.stream_head, self._last_given)

    async def _sync(self) -> None:
        """Raise the counter to our floor, and follow the stream: adopt the deployment's stream
        at start, or move to the one that replaced ours once it has settled. One at a time (the
        watcher, the reader and the publish path all call it): a reply never applies after a
        newer one."""
        async with self._sync_lock:
            await self._sync_once()

    async def _sync_once(self) -> None:
        known = bool(self.stream_id) or self._floor() > 0
        settle_ms = int(SETTLE_SECONDS * 1000)
        stream_id, counter, settling_ms, created, first_seq, keys_since = await self._sync_script(
            keys=self._keys,
            args=[self._floor(), uuid.uuid4().hex, settle_ms if known else 0, settle_ms],
        )
        stream_id, counter = stream_id.decode(), int(counter)
        self.stream_head = counter
        self.keys_remembered_since = float(keys_since)
        if stream_id == self.stream_id:
            return
        if not self.stream_id:  # starting: nothing delivered yet, nobody to tell
            self.stream_id, self._head = stream_id, counter
            return
        if stream_id != self._next_stream:
            self._next_stream = stream_id
            self._saw_settling = settling_ms > 0 or bool(created)
            log.warning(
                "Redis lost the event stream %s (new stream %s): publishing waits "
                "%.0f ms for every worker to raise the counter",
                self.stream_id,
                stream_id,
                max(settling_ms, 0),
            )
        if settling_ms > 0:
            return
        # Where the new stream starts: before its first event (events may have been published
        # in it since it settled), else where its counter is.
        base = int(first_seq) - 1 if first_seq else counter
        recovered = self._saw_settling and base == self._head
        log.warning(
            "moved to the event stream %s after seq %d (%s)",
            stream_id,
            base,
            "nothing missed" if recovered else f"events after seq {self._head} were lost",
        )
        self.stream_id, self._next_stream = stream_id, None
        self._head = max(self._head, base)
        if self.on_stream_reset is not None:
            self.on_stream_reset(StreamReset(stream_id, base, recovered))

    # -- consuming ----------------------------------------------------------------------------

    async def _consume(self) -> None:
        delay = RECONNECT_DELAYS[0]
        while True:
            try:
                if not self.connected:
                    await self._reconnect()
                    delay = RECONNECT_DELAYS[0]
                await self._read_once()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as error:
                self._set_link(False, str(error))
                self._retry_now.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._retry_now.wait(), delay)
                delay = min(delay * 2, RECONNECT_DELAYS[1])

    async def _reconnect(self) -> None:
        await self._redis.ping()  # type: ignore[misc]  # redis-py types sync and async alike
        await self._sync()
        self._set_link(True, "")

    async def _read_once(self) -> None:
        head = self._head
        reply = await self._redis.xread(
            {self._stream: f"{head}-0"}, count=READ_COUNT, block=READ_BLOCK_MS
        )
        if not reply:
            return
        entries = reply[0][1]
        stream_id = entries[0][1].get(b"s")
        if stream_id is not None and stream_id.decode() != self.stream_id:
            # Events of a stream that replaced ours: the clients are told first.
            await self._sync()
            if self._next_stream is not None:
                await asyncio.sleep(WATCH_INTERVAL / 10)
                return
        events = [self._event(entry_id, fields) for entry_id, fields in entries]
        if self._head != head:  # moved to a new stream meanwhile, after its first seq
            events = [e for e in events if e.seq > self._head]
        if events and events[0].seq > self._head + 1:
            self._gap(events[0].seq)
        if events:
            self._head = events[-1].seq
            for listener in self._listeners:
                listener(events)

    def _gap(self, next_seq: int) -> None:
        """The stream goes on after a gap: the seqs between this worker's head and `next_seq`
        will never come (a failover to a server without them, or trimmed before this worker
        read them). Its clients are told before they get the events after it."""
        missing = f"{self._head + 1}" + (
            f"-{next_seq - 1}" if next_seq - 1 > self._head + 1 else ""
        )
        log.warning(
            "the event stream goes on at seq %d: events %s never reached this worker "
            "(Redis failed over to a server without them, or trimmed them first)",
            next_seq,
            missing,
        )
        if self.on_stream_reset is not None:
            self.on_stream_reset(
                StreamReset(
                    self.stream_id,
                    next_seq - 1,
                    False,
                    f"events {missing} were lost when Redis failed over: reload state over REST",
                )
            )

    async def _watch(self) -> None:
        """Compare this worker's head with the stream's, apart from the reading itself: a
        reader that is stuck, or reads nothing while the stream grows, is a deaf worker. The
        same call keeps the counter above our floor and sees a replaced stream."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                await self._sync()
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
