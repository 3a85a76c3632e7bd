"""How frames reach a client's socket: the one place that knows. A `Connection` holds a writer:

- `SocketWriter`, the fast path: pre-framed WebSocket messages written straight to the TCP
  transport;
- `AsgiWriter`, the fallback: each message through the server's ASGI `send`.

The fast path:

Hypercorn's ASGI `send` frames every message with wsproto, then writes it under a lock and waits
for `drain()`: most of the cost of a fan-out. An event is the same bytes for every subscriber, so
the gateway frames it once (RFC 6455, unmasked, uncompressed: valid also when permessage-deflate
was negotiated, since only frames with RSV1 are compressed) and writes the bytes to each
connection's transport. Whole frames only, so they never interleave with Hypercorn's own writes.

Reaching the transport reads Hypercorn internals (asyncio worker, HTTP/1.1 WebSockets). Anything
else (HTTP/2, the trio worker, another server, another Hypercorn version) is detected per
connection, and that connection uses the ASGI `send` instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import struct
import sys
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any, Protocol
from urllib.parse import parse_qs

_TEXT = 0x81  # FIN + text opcode


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented WebSocket text frame (server to client)."""
    size = len(payload)
    if size < 126:
        return bytes((_TEXT, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", _TEXT, 126, size) + payload
    return struct.pack("!BBQ", _TEXT, 127, size) + payload


def _hypercorn_classes() -> tuple[Any, Any, Any, Any] | None:
    try:
        from hypercorn.asyncio.tcp_server import TCPServer
        from hypercorn.protocol.h11 import H11Protocol, H11WSConnection
        from hypercorn.protocol.ws_stream import WSStream
    except ImportError:
        return None
    return WSStream, H11Protocol, TCPServer, H11WSConnection


_CLASSES = _hypercorn_classes()
try:
    from wsproto.connection import ConnectionState

    # The state of a WebSocket that may still be written to: `websocket.state is
    # OPEN` (compared inline on the hot path).
    OPEN: Any = ConnectionState.OPEN
except ImportError:
    OPEN = None


def _closed_for_size(asgi_send: Any) -> bool:
    """Whether Hypercorn closed this WebSocket with 1009 because a client message went over
    `websocket_max_message_size`. Hypercorn does not tell the app (its ASGI disconnect says
    1006); its message buffer is left holding more than the limit."""
    buffer = getattr(getattr(asgi_send, "__self__", None), "buffer", None)
    limit = getattr(buffer, "max_length", None)
    return isinstance(limit, int) and getattr(buffer, "length", 0) > limit


ASGISend = Callable[[dict[str, Any]], Awaitable[None]]
ASGIReceive = Callable[[], Awaitable[dict[str, Any]]]
# Where the app's ASGI middleware (`serve_asgi_websockets`) puts each WebSocket's raw ASGI `send`.
ASGI_SEND_KEY = "sigmax.asgi_send"
# Bytes a transport may hold unsent before frames wait in the connection's own queue instead
# (asyncio's default high-water mark).
WRITE_BUFFER_LIMIT = 64 * 1024


# Where a blueprint's ASGI-level WebSocket routes are collected: app.extensions[ASGI_ROUTES].
ASGI_ROUTES = "sigmax.asgi_websockets"


class Disconnected(Exception):
    """The client went away (`websocket.disconnect`)."""


class WebSocket:
    """One WebSocket as the server's ASGI scope, `receive` and `send` give it: what a handler
    served at the ASGI level reads and answers with. Nothing is parsed until asked for."""

    __slots__ = ("scope", "_receive", "_send", "_accepted")

    def __init__(
        self,
        scope: dict[str, Any],
        receive: ASGIReceive,
        send: ASGISend,
        accepted: Callable[[], None] | None = None,
    ) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self._accepted = accepted  # called once the handshake is answered

    def header(self, name: str) -> str | None:
        """The first value of header `name` (lowercase), or None."""
        key = name.encode()
        for header, value in self.scope["headers"]:
            if header == key:
                return str(value.decode("latin-1"))
        return None

    def query(self, name: str) -> str | None:
        """The first value of query parameter `name`, or None."""
        raw = self.scope.get("query_string") or b""
        if not raw:
            return None
        values = parse_qs(raw.decode("latin-1")).get(name)
        return values[0] if values else None

    @property
    def remote_addr(self) -> str:
        client = self.scope.get("client")
        return str(client[0]) if client else ""

    async def accept(self) -> None:
        """Accept the handshake. The server's `websocket.connect` is not awaited first (Quart's
        test client sends none); `receive` passes over it."""
        await self._send({"type": "websocket.accept"})
        if self._accepted is not None:
            self._accepted()

    async def receive(self) -> str | bytes | None:
        """The next client message (None for an empty binary frame); Disconnected once the
        client is gone."""
        while True:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.receive":
                return message.get("text") or message.get("bytes")
            if kind != "websocket.connect":
                raise Disconnected

    async def reject(self, status: int, body: str) -> None:
        """Refuse the handshake with an HTTP response (a plain 403 where the server cannot)."""
        if "websocket.http.response" in (self.scope.get("extensions") or {}):
            await self._send(
                {
                    "type": "websocket.http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                }
            )
            await self._send({"type": "websocket.http.response.body", "body": body.encode()})
        else:
            await self._send({"type": "websocket.close", "code": 1008})


WebSocketHandler = Callable[[Any, WebSocket], Awaitable[None]]


def asgi_websocket(blueprint: Any, rule: str) -> Callable[[WebSocketHandler], WebSocketHandler]:
    """Declare a WebSocket route of `blueprint` that is served at the ASGI level: `handler(app,
    socket)` is called by `serve_asgi_websockets` for that path, without Quart's per-connection
    machinery (its websocket object, receive queue, two tasks and contexts: 13 KB and about
    75 GC-tracked objects a connection, see benchmarks/README.md)."""

    def register(handler: WebSocketHandler) -> WebSocketHandler:
        def record(state: Any) -> None:
            path = (state.url_prefix or "").rstrip("/") + rule
            state.app.extensions.setdefault(ASGI_ROUTES, {})[path] = handler

        blueprint.record_once(record)
        return handler

    return register


def serve_asgi_websockets(app: Any) -> Any:
    """The app's ASGI callable, wrapped: WebSockets on the ASGI-level routes go straight to
    their handlers; everything else to Quart. Each WebSocket's ASGI `send` is put in its scope:
    the gateway writes frames with it (or with the transport under it)."""
    asgi_app = app.asgi_app
    routes: dict[str, WebSocketHandler] = app.extensions.get(ASGI_ROUTES, {})

    def app_with_websockets(scope: dict[str, Any], receive: Any, send: Any) -> Awaitable[None]:
        if scope["type"] == "websocket":
            # The server builds a scope per connection; adding a key in place saves a copy of
            # it, and returning the inner coroutine saves a frame, for every connection.
            scope[ASGI_SEND_KEY] = send
            parts = _hypercorn_connection(send)
            if parts is not None:
                release_when_closed(parts)
            handler = routes.get(scope["path"])
            if handler is not None:
                accepted = None
                if parts is not None:
                    receive = _take_inbox(parts[0], receive)
                    accepted = partial(_after_handshake, parts)
                return handler(app, WebSocket(scope, receive, send, accepted))
        return asgi_app(scope, receive, send)

    return app_with_websockets


class AsgiWriter:
    """Every message through the ASGI `send`, from the connection's writer task, which lives as
    long as the connection."""

    __slots__ = ("_send",)
    fast = False
    persistent = True

    def __init__(self, send: ASGISend) -> None:
        self._send = send

    def write_now(self, frame: bytes) -> bool:
        """Write `frame` at once if the client keeps up; False: queue it for the writer task
        (always, here). True also when the socket is closed and the frame is dropped."""
        return False

    def write_all_now(self, frames: Iterable[bytes]) -> bool:
        return False

    async def send(self, frames: list[str]) -> bool:
        """Send queued frames, in order, waiting for the socket; False once it is closed."""
        for frame in frames:
            await self._send({"type": "websocket.send", "text": frame})
        return True

    async def close(self, code: int, reason: str) -> None:
        await self._send({"type": "websocket.close", "code": code, "reason": reason})

    def abort(self) -> None:
        """Drop the connection whatever the client does (the tasks are cancelled too)."""

    def closed_for_size(self) -> bool:
        return _closed_for_size(self._send)

    async def refuse(self, notice: str, code: int, reason: str) -> None:
        """The refusal `notice`, then the close."""
        await self.send([notice])
        await self.close(code, reason)


class SocketWriter(AsgiWriter):
    """Pre-framed messages written straight to the TCP transport: at once while the client
    keeps up (its socket buffer within WRITE_BUFFER_LIMIT), else by the connection's writer
    task, which then exists only while the client is behind."""

    __slots__ = ("_transport", "_drain", "_websocket", "shutting_down")
    fast = True
    persistent = False

    def __init__(
        self,
        send: ASGISend,
        writer: asyncio.StreamWriter,
        websocket: Any,
        shutting_down: Callable[[], Awaitable[None]] | None,
    ) -> None:
        super().__init__(send)
        self._transport = writer.transport
        self._drain = writer.drain
        # wsproto's connection: Hypercorn closes some WebSockets by itself (1009, protocol
        # errors) without telling the app, and no frame may follow a close frame.
        self._websocket = websocket
        # Returns when the Hypercorn worker starts shutting down (None when that cannot be seen).
        self.shutting_down = shutting_down

    def write_now(self, frame: bytes) -> bool:
        transport = self._transport
        if transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            return False
        if self._websocket.state is OPEN and not transport.is_closing():
            transport.write(frame)
        return True

    def write_all_now(self, frames: Iterable[bytes]) -> bool:
        transport = self._transport
        if transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            return False
        if self._websocket.state is OPEN and not transport.is_closing():
            transport.write(b"".join(frames))
        return True

    async def send(self, frames: list[str]) -> bool:
        if self._websocket.state is not OPEN or self._transport.is_closing():
            return False
        self._transport.write(b"".join(text_frame(frame.encode()) for frame in frames))
        await self._drain()  # returns once the client has taken most of it
        return True

    def abort(self) -> None:
        self._transport.abort()

    async def refuse(self, notice: str, code: int, reason: str) -> None:
        # Uncompressed: a client that inflates in the background (Node's built-in WebSocket)
        # drops a compressed message that arrives right before the close, and sees only 1006.
        self._transport.write(text_frame(notice.encode()))
        await self.close(code, reason)


class Writer(Protocol):
    """What a `Connection` writes with."""

    fast: bool  # frames may be written at once, outside the writer task
    persistent: bool  # the connection's writer task lives as long as the connection

    def write_now(self, frame: bytes) -> bool: ...

    def write_all_now(self, frames: Iterable[bytes]) -> bool: ...

    async def send(self, frames: list[str]) -> bool: ...

    async def close(self, code: int, reason: str) -> None: ...

    def abort(self) -> None: ...

    def closed_for_size(self) -> bool: ...

    async def refuse(self, notice: str, code: int, reason: str) -> None: ...


def _hypercorn_connection(send: ASGISend) -> tuple[Any, Any, Any, asyncio.StreamWriter] | None:
    """The stream, protocol, server and stream writer under a WebSocket's ASGI `send` when it
    is served by Hypercorn's asyncio worker over HTTP/1.1; None otherwise."""
    if _CLASSES is None:
        return None
    ws_stream_class, h11_class, tcp_server_class, _ = _CLASSES
    stream = getattr(send, "__self__", None)
    if not isinstance(stream, ws_stream_class):
        return None
    protocol = getattr(getattr(stream, "send", None), "__self__", None)
    if not isinstance(protocol, h11_class):
        return None
    server = getattr(getattr(protocol, "send", None), "__self__", None)
    if not isinstance(server, tcp_server_class):
        return None
    writer = getattr(server, "writer", None)
    if not isinstance(writer, asyncio.StreamWriter) or writer.transport is None:
        return None
    return stream, protocol, server, writer


def open_writer(scope: dict[str, Any], fast_path: bool = True) -> Writer:
    """The writer of the WebSocket of `scope`: straight to the socket when it is served by
    Hypercorn's asyncio worker over HTTP/1.1 (and `fast_path`), else the ASGI `send`."""
    send = scope[ASGI_SEND_KEY]
    parts = _hypercorn_connection(send) if fast_path else None
    if parts is None:
        return AsgiWriter(send)
    stream, _, server, writer = parts
    websocket = getattr(stream, "connection", None)
    if getattr(websocket, "state", None) is not OPEN:
        return AsgiWriter(send)
    terminated = getattr(getattr(server, "context", None), "terminated", None)
    return SocketWriter(send, writer, websocket, getattr(terminated, "wait", None))


# The context `_break_cycles` runs in: it reads no context variable, and one shared context
# saves a copy per connection.
_CALLBACK_CONTEXT = contextvars.Context()


def release_when_closed(parts: tuple[Any, Any, Any, asyncio.StreamWriter]) -> None:
    """Break the reference cycles of a Hypercorn connection (`_hypercorn_connection`) once its
    task has ended."""
    stream, protocol, server, writer = parts
    connection_task = getattr(writer.transport.get_protocol(), "_task", None)
    if isinstance(connection_task, asyncio.Task):
        wrapper = getattr(server, "protocol", None)  # the ProtocolWrapper around `protocol`
        objects = tuple(o for o in (server, wrapper, protocol, stream) if o is not None)
        connection_task.add_done_callback(
            partial(_break_cycles, writer.transport, objects),
            context=_CALLBACK_CONTEXT,
        )


def _break_cycles(
    transport: asyncio.WriteTransport, parts: tuple[Any, ...], connection_task: asyncio.Task[None]
) -> None:
    """Once Hypercorn is done with a connection (its task has ended), empty its server,
    protocol and stream objects: they refer to each other through bound methods, so without
    this every closed connection would leave ~60 objects that only a full collection, which
    stops the worker, can free. Refcounting frees them at once instead. The closed transport
    keeps its own read callback, a bound method of itself (asyncio's selector transport)."""
    for part in parts:
        vars(part).clear()
    if transport.is_closing() and getattr(transport, "_read_ready_cb", None) is not None:
        transport._read_ready_cb = None  # type: ignore[attr-defined]


class Inbox:
    """The client messages of one WebSocket on their way from Hypercorn to its handler, in
    place of the asyncio.Queue Hypercorn makes per connection: four deques and an Event, 3.2 KB
    for a queue that is nearly always empty; this is an empty list. One producer (the
    connection's read loop) and one consumer (the handler); at most `limit` messages wait, and
    the producer is held while it is full, so Hypercorn stops reading the socket."""

    __slots__ = ("_messages", "_limit", "_waiter")

    def __init__(self, limit: int) -> None:
        self._messages: list[dict[str, Any]] = []
        self._limit = limit if limit > 0 else sys.maxsize  # asyncio.Queue(0) is unbounded
        # The side that waits: the consumer while it is empty, the producer while it is full.
        self._waiter: asyncio.Future[None] | None = None

    async def put(self, message: dict[str, Any]) -> None:
        while len(self._messages) >= self._limit:
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:  # not yet the other side's
                    self._waiter = None
        self._messages.append(message)
        self._wake()

    async def get(self) -> dict[str, Any]:
        # Waits inline, not in a helper coroutine: an idle connection keeps this frame only.
        while not self._messages:
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:  # not yet the other side's
                    self._waiter = None
        message = self._messages.pop(0)
        self._wake()
        return message

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _take_inbox(stream: Any, receive: ASGIReceive) -> ASGIReceive:
    """Give Hypercorn's WebSocket `stream` an `Inbox` instead of its app queue, the messages
    already queued (the `websocket.connect`) moved over; the handler's `receive` reads it. The
    queue is emptied: nothing but the handler, which no longer reads it, refers to it."""
    queue = getattr(receive, "__self__", None)
    if not isinstance(queue, asyncio.Queue) or stream.app_put != queue.put or queue.full():
        return receive
    inbox = Inbox(queue.maxsize)
    while not queue.empty():
        inbox._messages.append(queue.get_nowait())
    stream.app_put = inbox.put
    vars(queue).clear()
    return inbox.get


class _NeverPaused:
    """h11's read pause (`H11Protocol.can_read`) once its connection is a WebSocket: h11 no
    longer parses that connection, so Hypercorn only ever sets it. One for every connection,
    instead of an asyncio.Event each (0.9 KB)."""

    async def set(self) -> None:
        pass

    async def clear(self) -> None:
        pass

    async def wait(self) -> None:
        pass


_NEVER_PAUSED = _NeverPaused()


def _after_handshake(parts: tuple[Any, Any, Any, asyncio.StreamWriter]) -> None:
    """Once Hypercorn has answered a WebSocket handshake, let go of what only HTTP needed: the
    h11 parser under its pass-through connection (1.7 KB; it framed the 101 response and sends
    nothing more) and h11's read pause. The stream's drain waiters (a deque, 0.8 KB, holding
    a future only while the client is behind) become a list, which does all asyncio asks of it
    (append, remove, iterate)."""
    assert _CLASSES is not None  # `parts` came from `_hypercorn_connection`
    _, protocol, _, writer = parts
    connection = getattr(protocol, "connection", None)
    if isinstance(connection, _CLASSES[3]):
        connection.h11_connection = None
        protocol.can_read = _NEVER_PAUSED
    flow = writer.transport.get_protocol()
    waiters = getattr(flow, "_drain_waiters", None)
    if isinstance(waiters, collections.deque) and not waiters:
        flow._drain_waiters = []  # type: ignore[attr-defined]
