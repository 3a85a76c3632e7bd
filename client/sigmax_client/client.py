"""`SigmaxWebSocketClient` and `connect_sigmax`: the SIGMAX WebSocket API for strategies.

One connection at a time, owned by a supervisor task: a reader task parses every message
(replies are matched to their request by `request_id`, events go to `listen()` and to the
callbacks), a heartbeat task pings and declares the connection dead when nothing answers. When the
connection is lost the supervisor reconnects with exponential backoff and jitter and subscribes
again with `since` = the last seq seen, so the application gets every event once, in order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import itertools
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as open_websocket
from websockets.exceptions import ConnectionClosed, InvalidURI, WebSocketException

from sigmax_client.buffer import EventBuffer
from sigmax_client.errors import (
    AuthenticationError,
    InvalidSubscriptionError,
    RequestError,
    RequestTimeoutError,
    SigmaxConnectionError,
    SigmaxError,
)
from sigmax_client.events import RESYNC_REQUIRED, WSEvent, utc_now

log = logging.getLogger("sigmax_client")

DEFAULT_URL = "ws://localhost:8000/api/ws"

EventCallback = Callable[[WSEvent], Awaitable[None] | None]

# Replies to requests: consumed by the client, never handed to the application.
REPLY_TYPES = frozenset(
    {"connected", "subscribed", "unsubscribed", "subscriptions", "command_result", "pong"}
)
# Event types that are also direct replies (to get_status and the commands that ask for them).
DIRECT_REPLY_TYPES = frozenset({"error", "system_status", "portfolio_update", "health_update"})
# Error codes that make a subscribe or unsubscribe a ValueError (the request itself is wrong).
SUBSCRIPTION_ERROR_CODES = frozenset(
    {
        "INVALID_TOPIC",
        "INVALID_SYMBOL",
        "TOO_MANY_SUBSCRIPTIONS",
        "MESSAGE_PROCESSING_ERROR",
        "INVALID_POSITION",  # a replay's since or until
    }
)
# Replayed events read but not yet taken by the `replay()` iterator; past it the reader waits,
# and so the gateway slows the replay down.
REPLAY_BUFFER = 1000
# A connection that stayed up this long starts the next reconnect from the shortest delay.
STABLE_AFTER = 10.0
CLOSE_TIMEOUT = 2.0


def backoff_delay(
    attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before reconnect `attempt` (0 first): exponential up to `cap`, with
    "equal jitter" (between half and all of it) so that clients cut off together do not all
    come back at the same instant."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 32))
    return ceiling / 2 + rand() * ceiling / 2


def tls_context(
    ssl_context: ssl.SSLContext | None = None, ca_file: str | None = None
) -> ssl.SSLContext | None:
    """The TLS context of wss:// and https:// connections: `ssl_context` as given, else one that
    trusts the certificates of `ca_file` (a private CA's, or a self-signed gateway's); None:
    the system's trusted CAs."""
    if ssl_context is not None:
        return ssl_context
    return ssl.create_default_context(cafile=ca_file) if ca_file else None


def _names(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


class SigmaxWebSocketClient:
    """A client of the SIGMAX WebSocket API.

    `auto_reconnect`: reconnect when the connection is lost (backoff from `reconnect_delay` up
    to `max_reconnect_delay` seconds), restore the subscriptions and resume after the last seq.
    `ping_interval`, `ping_timeout`: a ping every `ping_interval` seconds; no traffic within
    `ping_timeout` after it means the connection is dead. `request_timeout`: how long
    `subscribe`, `get_status`, `command`, ... wait for their reply. `queue_size`: events that
    may wait for `listen()` and for the callbacks before the client stops reading.
    `ssl_context` or `ca_file`: whom a wss:// gateway's certificate must come from (default: the
    system's trusted CAs). The API key travels in the X-API-Key header, never in the URL.
    """

    def __init__(
        self,
        auto_reconnect: bool = True,
        max_reconnect_delay: float = 60.0,
        ping_interval: float = 30.0,
        ping_timeout: float = 10.0,
        *,
        reconnect_delay: float = 0.5,
        request_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        queue_size: int = 1000,
        max_message_size: int | None = 16 * 1024 * 1024,
        ssl_context: ssl.SSLContext | None = None,
        ca_file: str | None = None,
    ) -> None:
        for name, value in (
            ("max_reconnect_delay", max_reconnect_delay),
            ("ping_interval", ping_interval),
            ("ping_timeout", ping_timeout),
            ("reconnect_delay", reconnect_delay),
            ("request_timeout", request_timeout),
            ("connect_timeout", connect_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, not {value!r}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, not {queue_size!r}")
        self.auto_reconnect = auto_reconnect
        self.max_reconnect_delay = max_reconnect_delay
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.reconnect_delay = reconnect_delay
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.queue_size = queue_size
        self.max_message_size = max_message_size
        self._tls = tls_context(ssl_context, ca_file)

        self.url: str | None = None
        self.connection_id: str | None = None
        self.reconnects = 0
        self.duplicates_dropped = 0

        self._api_key: str | None = None
        self._callbacks: list[EventCallback] = []
        self._ws: ClientConnection | None = None
        self._ready = asyncio.Event()  # set: connected and resumed, or stopped for good
        self._supervisor: asyncio.Task[None] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._events: EventBuffer | None = None
        self._callback_events: EventBuffer | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._resume_since: dict[str, int] = {}  # request_id of a subscribe with since -> since
        self._replays: dict[str, _ReplayInbox] = {}  # request_id of a running replay -> inbox
        self._request_ids = itertools.count(1)
        self._waiting_callers = 0
        self._topics: list[str] = []
        self._symbols: list[str] = []
        self._last_seq: int | None = None
        self._resume_from: int | None = None  # where to resume before any event was seen
        self._server_head: int | None = None  # the gateway's last seq when this connection opened
        self._server_stream: str | None = None  # the stream this connection serves
        # The stream that _last_seq / _resume_from count in: a seq means nothing in another one
        # (a gateway restarted without its history), and the gateway says so when told.
        self._position_stream: str | None = None
        self._greeting_status_due = False
        self._listen_called = False
        self._closing = False
        self._failure: SigmaxConnectionError | None = None
        self._last_received = 0.0
        self._lost_reason = ""

    # -- public API ---------------------------------------------------------------------------

    async def connect(self, url: str = DEFAULT_URL, api_key: str | None = None) -> None:
        """Connect to the gateway (`api_key` is sent as the X-API-Key header).

        Raises RuntimeError (SigmaxConnectionError) when the gateway cannot be reached or
        refuses the connection. Once connected, the connection is kept until `disconnect()`."""
        if self._supervisor is not None and not self._supervisor.done():
            raise SigmaxConnectionError(f"already connected to {self.url}; disconnect() first")
        await self._stop()  # what a failed connection may have left
        self._events = self._callback_events = None
        self.url, self._api_key = url, api_key
        self._closing, self._failure = False, None
        self._topics, self._symbols = [], []
        self._last_seq = self._resume_from = self._position_stream = None
        self._listen_called = False
        self._ready = asyncio.Event()
        ws = await self._open()
        self._ws = ws
        self._ready.set()
        self._events = EventBuffer(
            self.queue_size, may_exceed=self._caller_waits, drop_oldest=self._nobody_listens
        )
        self._callback_events = EventBuffer(self.queue_size, may_exceed=self._caller_waits)
        self._dispatcher = asyncio.create_task(
            self._dispatch(self._callback_events), name="sigmax-client-callbacks"
        )
        self._supervisor = asyncio.create_task(self._supervise(ws), name="sigmax-client")

    async def disconnect(self) -> None:
        """Close the connection: `listen()` ends, callbacks stop, no task is left running."""
        self._closing = True
        await self._stop()

    async def subscribe(
        self,
        topics: str | Iterable[str] | None = None,
        symbols: str | Iterable[str] | None = None,
        *,
        since: int | None = None,
    ) -> dict[str, Any]:
        """Subscribe to `topics` (`proposals`, `market`, ... or `all`) and `symbols`
        (`BTC/USDT`); returns the gateway's `subscribed` data. Kept across reconnects.

        `since`: also replay the stream's events after that seq that match (a position the
        application kept); if history does not reach back, a `resync_required` event says so.
        Raises ValueError (InvalidSubscriptionError) for a topic or symbol the gateway rejects."""
        data: dict[str, Any] = {"topics": _names(topics), "symbols": _names(symbols)}
        if since is not None:
            data["since"] = since
        reply = await self._request("subscribe", data, retry=True, resume_since=since)
        confirmed: dict[str, Any] = reply.get("data") or {}
        for topic in confirmed.get("topics", data["topics"]):
            if topic not in self._topics:
                self._topics.append(topic)
        for symbol in confirmed.get("symbols", data["symbols"]):
            if symbol not in self._symbols:
                self._symbols.append(symbol)
        if self._last_seq is None and self._resume_from is None:
            # Nothing seen yet: a reconnect resumes from where this subscription started.
            self._resume_from = since if since is not None else self._server_head
            self._position_stream = None if since is not None else self._server_stream
        return confirmed

    async def unsubscribe(
        self, topics: str | Iterable[str] | None = None, symbols: str | Iterable[str] | None = None
    ) -> dict[str, Any]:
        """Stop receiving `topics` and `symbols`; returns the `unsubscribed` data."""
        data = {"topics": _names(topics), "symbols": _names(symbols)}
        reply = await self._request("unsubscribe", data, retry=True)
        confirmed: dict[str, Any] = reply.get("data") or {}
        for topic in confirmed.get("topics", data["topics"]):
            if topic in self._topics:
                self._topics.remove(topic)
        for symbol in confirmed.get("symbols", data["symbols"]):
            if symbol in self._symbols:
                self._symbols.remove(symbol)
        return confirmed

    async def get_status(self) -> dict[str, Any]:
        """The gateway's system status: the `system_status` reply to this very request."""
        reply = await self._request("get_status", retry=True)
        status: dict[str, Any] = reply.get("data") or {}
        return status

    async def get_subscriptions(self) -> dict[str, Any]:
        """What the gateway holds for this connection: `{topics, symbols, count}`."""
        reply = await self._request("get_subscriptions", retry=True)
        subscriptions: dict[str, Any] = reply.get("data") or {}
        return subscriptions

    async def command(self, name: str, /, **args: Any) -> Any:
        """Run a gateway command (`get_portfolio`, `approve_proposal`, ...) and return its
        result. Raises RequestError (a RuntimeError) with the gateway's code when it refuses.
        Not sent again after a lost connection: whether it ran is then unknown."""
        reply = await self._request("command", {"command": name, **args}, retry=False)
        if reply.get("type") != "command_result":
            # get_status, get_portfolio, get_health answer with the event they ask for
            return reply.get("data")
        data = reply.get("data") or {}
        if data.get("success") is False:
            raise RequestError(f"command {name!r} failed: {data.get('result')!r}")
        return data.get("result")

    async def replay(
        self,
        since: int | str | None = None,
        until: int | str | None = None,
        *,
        topics: str | Iterable[str] = (),
        symbols: str | Iterable[str] = (),
        speed: float = 0,
    ) -> AsyncIterator[WSEvent]:
        """Archived events, oldest first, with their original seq and timestamps: after
        `since` up to `until` (each a seq or an RFC 3339 time; default: the whole archive), of
        `topics` and carrying one of `symbols` (default: all), paced at `speed` times their
        original spacing (0: as fast as they are read). Apart from the live subscriptions;
        the iterator ends at the replay's end. A replay cut by a lost connection goes on
        after the last event given, on the next connection.

            async for event in client.replay(since="2026-12-03T09:00:00Z", speed=10):
                ...
        """
        position = since
        loop = asyncio.get_running_loop()
        while True:
            ws = await self._connection(loop.time() + self.request_timeout)
            request_id = str(next(self._request_ids))
            inbox = self._replays[request_id] = _ReplayInbox(ws)
            data: dict[str, Any] = {
                "topics": _names(topics),
                "symbols": _names(symbols),
                "speed": speed,
            }
            data.update({k: v for k, v in (("since", position), ("until", until)) if v is not None})
            try:
                with contextlib.suppress(ConnectionClosed):  # then the inbox says it is lost
                    await ws.send(
                        json.dumps({"type": "replay", "request_id": request_id, "data": data})
                    )
                while (message := await inbox.get()) is not None:
                    kind = message.get("type")
                    if kind == "replay_complete":
                        return
                    if kind == "error":
                        raise _error_reply("replay", message)
                    event = WSEvent.from_message(message)
                    position = event.seq
                    yield event
            finally:
                self._replays.pop(request_id, None)
            if not self.auto_reconnect or self._closing:
                raise SigmaxConnectionError(f"connection lost during a replay: {self._lost_reason}")

    def listen(self) -> AsyncIterator[WSEvent]:
        """The events, in order, each once, across reconnects. Ends after `disconnect()`;
        raises RuntimeError when the connection is lost for good (auto_reconnect off, or the
        API key refused on reconnect)."""
        if self._events is None:
            raise SigmaxConnectionError("not connected: call connect() first")
        self._listen_called = True
        return _EventStream(self, self._events)

    def on_event(self, callback: EventCallback) -> EventCallback:
        """Call `callback(event)` for every event (a function or a coroutine function), in
        order, from a task of the client; usable as a decorator."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {callback!r}")
        self._callbacks.append(callback)
        return callback

    def is_connected(self) -> bool:
        """True while connected and subscribed (False while reconnecting)."""
        return self._ws is not None and self._ready.is_set() and not self._closing

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(self._topics)

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(self._symbols)

    @property
    def last_seq(self) -> int | None:
        """The seq of the last stream event received: where a reconnect resumes."""
        return self._last_seq

    @property
    def buffered_events(self) -> int:
        """Events waiting for `listen()`."""
        return len(self._events) if self._events is not None else 0

    async def __aenter__(self) -> SigmaxWebSocketClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.disconnect()

    # -- requests -----------------------------------------------------------------------------

    def _caller_waits(self) -> bool:
        return self._waiting_callers > 0

    def _nobody_listens(self) -> bool:
        # An application that only uses callbacks must not stall when the listen() buffer fills.
        return bool(self._callbacks) and not self._listen_called

    def _wake_buffers(self) -> None:
        for buffer in (self._events, self._callback_events):
            if buffer is not None:
                buffer.wake()

    async def _request(
        self,
        message_type: str,
        data: dict[str, Any] | None = None,
        *,
        retry: bool,
        resume_since: int | None = None,
    ) -> dict[str, Any]:
        """Send a request once connected and return its reply; `retry`: send it again when the
        connection is lost before the reply (for requests that may safely run twice)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        # The reply may sit behind events the application has not read yet: while somebody
        # waits for a reply, the reader may go past the buffers' bound.
        self._waiting_callers += 1
        self._wake_buffers()
        try:
            while True:
                ws = await self._connection(deadline)
                try:
                    return await self._exchange(
                        ws, message_type, data, deadline=deadline, resume_since=resume_since
                    )
                except SigmaxConnectionError:
                    if not (retry and self.auto_reconnect) or self._closing:
                        raise
                    if loop.time() >= deadline:
                        raise
        finally:
            self._waiting_callers -= 1

    async def _connection(self, deadline: float) -> ClientConnection:
        """The open connection, waiting for a reconnect until `deadline`."""
        loop = asyncio.get_running_loop()
        while True:
            if self._failure is not None:
                raise SigmaxConnectionError(str(self._failure)) from self._failure
            if self._closing:
                raise SigmaxConnectionError("disconnected")
            if self._supervisor is None or self._supervisor.done():
                raise SigmaxConnectionError("not connected: call connect() first")
            if self._ws is not None and self._ready.is_set():
                return self._ws
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    await self._ready.wait()
            except TimeoutError:
                raise SigmaxConnectionError(
                    f"not connected to {self.url} (reconnecting after: {self._lost_reason})"
                ) from None

    async def _exchange(
        self,
        ws: ClientConnection,
        message_type: str,
        data: dict[str, Any] | None,
        *,
        deadline: float,
        resume_since: int | None = None,
    ) -> dict[str, Any]:
        """Send one request on `ws` and return the reply that echoes its request_id, by
        `deadline` (the loop's clock)."""
        request_id = str(next(self._request_ids))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        if resume_since is not None:
            self._resume_since[request_id] = resume_since
        message: dict[str, Any] = {"type": message_type, "request_id": request_id}
        if data is not None:
            message["data"] = data
        try:
            async with asyncio.timeout_at(deadline):
                await ws.send(json.dumps(message))
                reply = await future
        except ConnectionClosed as error:
            self._forget(ws)  # so that a retry waits for the next connection
            raise SigmaxConnectionError(
                f"connection lost before the reply to {message_type}: {error}"
            ) from error
        except TimeoutError:
            raise RequestTimeoutError(
                f"no reply to {message_type} within {self.request_timeout:g} s"
            ) from None
        finally:
            self._pending.pop(request_id, None)
            self._resume_since.pop(request_id, None)
        if reply.get("type") == "error":
            raise _error_reply(message_type, reply)
        return reply

    # -- the connection -----------------------------------------------------------------------

    async def _open(self) -> ClientConnection:
        """Open a connection and read its greeting (`connected`, or the reason for refusal)."""
        url = self.url or DEFAULT_URL
        headers = {"X-API-Key": self._api_key} if self._api_key else None
        # websockets refuses an SSL context for a ws:// URL.
        tls: dict[str, Any] = {"ssl": self._tls} if url.startswith("wss:") and self._tls else {}
        try:
            ws = await open_websocket(
                url,
                additional_headers=headers,
                open_timeout=self.connect_timeout,
                ping_interval=None,  # the JSON heartbeat replaces it
                # The gateway frames each event once, uncompressed, for every subscriber:
                # permessage-deflate would compress nothing and cost 42 KB of zlib state per
                # connection on the gateway.
                compression=None,
                close_timeout=CLOSE_TIMEOUT,
                max_size=self.max_message_size,
                **tls,
            )
        except InvalidURI as error:
            raise SigmaxConnectionError(f"invalid gateway URL {url!r}: {error}") from error
        except (OSError, TimeoutError, WebSocketException) as error:
            raise SigmaxConnectionError(
                f"cannot connect to {url}: {error or type(error).__name__}"
            ) from error
        try:
            data = await self._greeting(ws, url)
        except BaseException:
            ws.transport.abort()
            raise
        connection_id = data.get("connection_id")
        head = data.get("last_seq")
        self.connection_id = connection_id if isinstance(connection_id, str) else None
        self._server_head = head if isinstance(head, int) else None
        stream = data.get("stream_id")
        self._server_stream = stream if isinstance(stream, str) else None
        self._greeting_status_due = True
        log.info("connected to %s (connection %s)", url, self.connection_id)
        return ws

    async def _greeting(self, ws: ClientConnection, url: str) -> dict[str, Any]:
        """The data of the `connected` greeting; raises with the gateway's reason otherwise."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                greeting = _decode(await ws.recv())
        except ConnectionClosed as error:
            raise SigmaxConnectionError(f"{url} closed the connection at once: {error}") from error
        except TimeoutError:
            raise SigmaxConnectionError(
                f"{url} sent no greeting within {self.connect_timeout:g} s"
            ) from None
        kind = greeting.get("type") if greeting else None
        data = (greeting or {}).get("data")
        data = data if isinstance(data, dict) else {}
        if kind == "connected":
            return data
        if kind == "error":
            code = data.get("code")
            error_class = (
                AuthenticationError if code == "AUTHENTICATION_FAILED" else SigmaxConnectionError
            )
            raise error_class(
                f"{url} refused the connection: {data.get('error')} "
                f"[{code}]: {data.get('details')}",
                code=code,
                details=data.get("details"),
            )
        raise SigmaxConnectionError(
            f"{url} is not a SIGMAX gateway: its first message was {str(greeting)[:80]!r}"
        )

    async def _supervise(self, ws: ClientConnection) -> None:
        """Serve the connection; when it is lost, reconnect with backoff and resume, until
        `disconnect()` (or the first loss, with auto_reconnect off)."""
        attempt = 0
        resuming = False
        session: asyncio.Task[None] | None = None
        try:
            while True:
                session = asyncio.create_task(self._serve(ws), name="sigmax-client-reader")
                up_since = time.monotonic()
                try:
                    if resuming:
                        await self._resume(ws)
                except SigmaxError as error:
                    self._lost_reason = f"resuming failed: {error}"
                    ws.transport.abort()
                else:
                    self._ws = ws
                    self._ready.set()
                await session
                if self._closing:
                    return
                if not self.auto_reconnect:
                    raise SigmaxConnectionError(
                        f"connection to {self.url} lost: {self._lost_reason}"
                    )
                if time.monotonic() - up_since >= STABLE_AFTER:
                    attempt = 0
                ws, attempt = await self._reconnect(attempt)
                resuming = True
        except SigmaxConnectionError as error:
            self._failure = error
            log.error("%s", error)
        finally:
            if session is not None and not session.done():
                session.cancel()
                await asyncio.wait([session])
            self._ws = None
            self._ready.set()  # callers waiting for a connection see that there is none
            for buffer in (self._events, self._callback_events):
                if buffer is not None:
                    buffer.close(discard=self._closing)

    async def _reconnect(self, attempt: int) -> tuple[ClientConnection, int]:
        """A new connection, after a backoff delay before each try."""
        for tries in itertools.count():
            delay = backoff_delay(attempt, self.reconnect_delay, self.max_reconnect_delay)
            log.warning(
                "%s (%s); reconnecting in %.1f s",
                f"connection to {self.url} lost" if tries == 0 else "reconnect failed",
                self._lost_reason,
                delay,
            )
            await asyncio.sleep(delay)
            attempt += 1
            try:
                ws = await self._open()
            except AuthenticationError:
                raise
            except SigmaxConnectionError as error:
                self._lost_reason = str(error)
                continue
            self.reconnects += 1
            return ws, attempt
        raise AssertionError("unreachable")

    async def _resume(self, ws: ClientConnection) -> None:
        """Subscribe again to everything, from the last seq seen."""
        if not (self._topics or self._symbols):
            return
        since = self._last_seq if self._last_seq is not None else self._resume_from
        data: dict[str, Any] = {"topics": list(self._topics), "symbols": list(self._symbols)}
        if since is not None:
            data["since"] = since
            if self._position_stream is not None:
                data["stream_id"] = self._position_stream
        deadline = asyncio.get_running_loop().time() + self.request_timeout
        reply = await self._exchange(ws, "subscribe", data, deadline=deadline, resume_since=since)
        confirmed = reply.get("data") or {}
        log.info(
            "resubscribed to %s from seq %s: %s events replayed",
            ", ".join(self._topics + self._symbols),
            since,
            confirmed.get("replayed", 0),
        )

    async def _serve(self, ws: ClientConnection) -> None:
        """Read `ws` until it closes, with the heartbeat beside it."""
        self._lost_reason = ""
        self._last_received = time.monotonic()
        heartbeat = asyncio.create_task(self._heartbeat(ws), name="sigmax-client-heartbeat")
        try:
            async for raw in ws:
                self._last_received = time.monotonic()
                await self._handle(ws, raw)
            self._lost_reason = self._lost_reason or _close_text(ws)
        except ConnectionClosed:
            self._lost_reason = self._lost_reason or _close_text(ws)
        finally:
            heartbeat.cancel()
            await asyncio.wait([heartbeat])
            ws.transport.abort()  # a no-op once closed; frees it when the session is cancelled
            self._forget(ws)
            lost = f"connection lost: {self._lost_reason or 'closed'}"
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(SigmaxConnectionError(lost))
            for inbox in self._replays.values():
                if inbox.ws is ws:
                    inbox.lost()

    async def _heartbeat(self, ws: ClientConnection) -> None:
        """Ping every ping_interval; with no traffic within ping_timeout after a ping, abort
        the connection, which ends the reader and makes the supervisor reconnect."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.ping_interval)
            sent_at = time.monotonic()
            request_id = str(next(self._request_ids))
            pong: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._pending[request_id] = pong
            try:
                async with asyncio.timeout(self.ping_timeout):
                    await ws.send(json.dumps({"type": "ping", "request_id": request_id}))
                    await pong
                continue
            except TimeoutError:
                pass
            except (ConnectionClosed, SigmaxConnectionError):
                return
            finally:
                self._pending.pop(request_id, None)
            # Traffic behind a late pong still proves the connection alive, and so does a
            # reader that the application holds (it is not reading, so it cannot know).
            if self._last_received > sent_at or self._reader_held():
                continue
            self._lost_reason = f"no reply to a ping within {self.ping_timeout:g} s"
            log.warning("connection to %s is dead: %s", self.url, self._lost_reason)
            ws.transport.abort()
            return

    def _forget(self, ws: ClientConnection) -> None:
        """`ws` is no longer usable: requests wait for the next connection."""
        if self._ws is ws:
            self._ws = None
            self._ready.clear()

    def _reader_held(self) -> bool:
        return any(
            buffer is not None and buffer.putter_waiting
            for buffer in (self._events, self._callback_events)
        )

    async def _handle(self, ws: ClientConnection, raw: str | bytes) -> None:
        """One message from the gateway: a reply, a heartbeat, or an event."""
        message = _decode(raw)
        if message is None:
            log.warning("ignored a message that is not a JSON object: %.80r", raw)
            return
        kind = message.get("type")
        request_id = message.get("request_id")
        if request_id is not None:
            inbox = self._replays.get(str(request_id))
            if inbox is not None:
                await inbox.put(message)
                return
            future = self._pending.get(str(request_id))
            if future is not None:
                since = self._resume_since.get(str(request_id))
                if not future.done():
                    future.set_result(message)
                if since is not None and kind == "subscribed":
                    # Before reading on: the replayed events follow this reply.
                    await self._check_recovered(since, message.get("data"))
                return
            if kind in REPLY_TYPES or kind in DIRECT_REPLY_TYPES:
                return  # the reply to a request that gave up waiting
        seq = message.get("seq")
        if seq is None:
            if kind == "ping":
                await ws.send(json.dumps({"type": "pong"}))
                return
            if kind in REPLY_TYPES:
                return
            if kind == "stream_reset":
                await self._stream_reset(message.get("data"))
                return
            if kind == "system_status" and self._greeting_status_due:
                # Part of the greeting, not an event the application subscribed to.
                self._greeting_status_due = False
                return
        self._greeting_status_due = False
        event = WSEvent.from_message(message)
        if event.seq is not None:
            if self._last_seq is not None and event.seq <= self._last_seq:
                self.duplicates_dropped += 1
                return
            self._last_seq = event.seq
            self._position_stream = self._server_stream
        if kind == "error":
            data = event.data if isinstance(event.data, dict) else {}
            log.warning("gateway error %s: %s", data.get("code"), data.get("details"))
        await self._deliver(event)

    async def _check_recovered(self, since: int, data: Any) -> None:
        """After a subscribe with `since`: when history did not reach back, tell the
        application (before any replayed event) and accept the stream from here on."""
        data = data if isinstance(data, dict) else {}
        if data.get("recovered") is not False:
            return
        log.warning("the gateway's history does not reach back to seq %s: resync required", since)
        # The gateway may have restarted its sequence: what follows is new whatever its seq.
        self._last_seq = None
        self._resume_from = self._server_head
        self._position_stream = self._server_stream
        await self._require_resync(
            f"events after seq {since} are no longer available; reload state over REST",
            since,
            data.get("replayed", 0),
            data.get("topics", list(self._topics)),
            data.get("symbols", list(self._symbols)),
        )

    async def _stream_reset(self, data: Any) -> None:
        """Redis lost the gateway's stream and the worker moved to a new one, or a failover
        lost events (the same stream): resume in that one from now on; when events may be
        missing, tell the application (resync)."""
        data = data if isinstance(data, dict) else {}
        stream = data.get("stream_id")
        if not isinstance(stream, str):
            return
        self._server_stream = self._position_stream = stream
        if data.get("recovered") is not False:
            return
        since = self._last_seq if self._last_seq is not None else self._resume_from
        last_seq = data.get("last_seq")
        log.warning(
            "the gateway's event stream was reset: events after seq %s may be "
            "missing, resync required",
            since,
        )
        self._last_seq = None
        self._resume_from = last_seq if isinstance(last_seq, int) else None
        await self._require_resync(
            str(data.get("reason") or f"events after seq {since} may be missing"),
            since,
            0,
            list(self._topics),
            list(self._symbols),
        )

    async def _require_resync(
        self, reason: str, since: int | None, replayed: Any, topics: Any, symbols: Any
    ) -> None:
        await self._deliver(
            WSEvent(
                RESYNC_REQUIRED,
                {
                    "reason": reason,
                    "since": since,
                    "replayed": replayed,
                    "topics": topics,
                    "symbols": symbols,
                },
                utc_now(),
            )
        )

    async def _deliver(self, event: WSEvent) -> None:
        if self._callbacks and self._callback_events is not None:
            await self._callback_events.put(event)
        if self._events is not None:
            await self._events.put(event)

    async def _dispatch(self, buffer: EventBuffer) -> None:
        """Run the callbacks, one event after the other; a failing callback is logged."""
        while (event := await buffer.get()) is not None:
            for callback in tuple(self._callbacks):
                try:
                    result = callback(event)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("event callback %r failed on a %s event", callback, event.type)

    async def _stop(self) -> None:
        """Close the connection and end every task of the client."""
        for buffer in (self._events, self._callback_events):
            if buffer is not None:
                buffer.close(discard=True)
        ws = self._ws
        if ws is not None:
            try:
                await ws.close()
            except Exception:  # closing a broken connection: it is gone either way
                ws.transport.abort()
        current = asyncio.current_task()
        tasks = [
            task
            for task in (self._supervisor, self._dispatcher)
            if task is not None and task is not current and not task.done()
        ]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._ws = None


class _EventStream:
    """What `listen()` returns: an async iterator over the client's event buffer."""

    def __init__(self, client: SigmaxWebSocketClient, buffer: EventBuffer) -> None:
        self._client = client
        self._buffer = buffer

    def __aiter__(self) -> _EventStream:
        return self

    async def __anext__(self) -> WSEvent:
        event = await self._buffer.get()
        if event is not None:
            return event
        failure = self._client._failure
        if failure is not None and not self._client._closing:
            raise SigmaxConnectionError(str(failure), code=failure.code) from failure
        raise StopAsyncIteration


def _decode(raw: str | bytes) -> dict[str, Any] | None:
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _close_text(ws: ClientConnection) -> str:
    if ws.close_code is None:
        return "connection closed"
    reason = f" {ws.close_reason}" if ws.close_reason else ""
    return f"connection closed with code {ws.close_code}{reason}"


class _ReplayInbox:
    """What the reader hands a running replay: its messages, at most REPLAY_BUFFER waiting
    (then the reader waits), and None once its connection is lost."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._messages: collections.deque[dict[str, Any] | None] = collections.deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    async def put(self, message: dict[str, Any]) -> None:
        await self._room.wait()
        self._messages.append(message)
        self._arrived.set()
        if len(self._messages) >= REPLAY_BUFFER:
            self._room.clear()

    def lost(self) -> None:
        self._messages.append(None)
        self._arrived.set()

    async def get(self) -> dict[str, Any] | None:
        while not self._messages:
            self._arrived.clear()
            await self._arrived.wait()
        message = self._messages.popleft()
        if len(self._messages) < REPLAY_BUFFER:
            self._room.set()
        return message


def _error_reply(message_type: str, reply: dict[str, Any]) -> SigmaxError:
    data = reply.get("data")
    data = data if isinstance(data, dict) else {}
    code, details = data.get("code"), data.get("details")
    text = f"{data.get('error', 'error')} [{code}]: {details}"
    if message_type in ("subscribe", "unsubscribe", "replay") and code in SUBSCRIPTION_ERROR_CODES:
        return InvalidSubscriptionError(text, code=code, details=details)
    return RequestError(f"{message_type}: {text}", code=code, details=details)


async def connect_sigmax(
    url: str = DEFAULT_URL,
    topics: str | Iterable[str] | None = None,
    symbols: str | Iterable[str] | None = None,
    *,
    api_key: str | None = None,
    since: int | None = None,
    **options: Any,
) -> SigmaxWebSocketClient:
    """Connect and subscribe in one call; `options` are SigmaxWebSocketClient's
    (auto_reconnect, ping_interval, ...). Raises as `connect` and `subscribe` do."""
    client = SigmaxWebSocketClient(**options)
    await client.connect(url, api_key=api_key)
    try:
        if topics or symbols or since is not None:
            await client.subscribe(topics, symbols, since=since)
    except BaseException:
        await client.disconnect()
        raise
    return client
