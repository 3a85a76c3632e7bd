"""The fast write path: pre-framed WebSocket messages written straight to the TCP transport.

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
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

_TEXT = 0x81  # FIN + text opcode


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented WebSocket text frame (server to client)."""
    size = len(payload)
    if size < 126:
        return bytes((_TEXT, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", _TEXT, 126, size) + payload
    return struct.pack("!BBQ", _TEXT, 127, size) + payload


@dataclass(frozen=True)
class RawTransport:
    transport: asyncio.WriteTransport
    drain: Callable[[], Awaitable[None]]
    # wsproto's connection: Hypercorn closes some WebSockets by itself (1009, protocol errors)
    # without telling the app, and no frame may follow a close frame (see `open`).
    websocket: Any
    # Returns when the Hypercorn worker starts shutting down (None when that cannot be seen).
    shutting_down: Callable[[], Awaitable[None]] | None = None


def _hypercorn_classes() -> tuple[type, type, type] | None:
    try:
        from hypercorn.asyncio.tcp_server import TCPServer
        from hypercorn.protocol.h11 import H11Protocol
        from hypercorn.protocol.ws_stream import WSStream
    except ImportError:
        return None
    return WSStream, H11Protocol, TCPServer


_CLASSES = _hypercorn_classes()
try:
    from wsproto.connection import ConnectionState
    # The state of a WebSocket that may still be written to: `RawTransport.websocket.state is
    # OPEN` (compared inline on the hot path).
    OPEN: Any = ConnectionState.OPEN
except ImportError:
    OPEN = None


def raw_transport(asgi_send: Any) -> RawTransport | None:
    """The TCP transport under a Hypercorn asyncio HTTP/1.1 WebSocket, or None."""
    if _CLASSES is None:
        return None
    ws_stream_class, h11_class, tcp_server_class = _CLASSES
    stream = getattr(asgi_send, "__self__", None)
    if not isinstance(stream, ws_stream_class):
        return None
    protocol = getattr(getattr(stream, "send", None), "__self__", None)
    if not isinstance(protocol, h11_class):
        return None
    server = getattr(getattr(protocol, "send", None), "__self__", None)
    if not isinstance(server, tcp_server_class):
        return None
    writer = getattr(server, "writer", None)
    transport = getattr(writer, "transport", None)
    if not isinstance(writer, asyncio.StreamWriter) or transport is None:
        return None
    websocket = getattr(stream, "connection", None)
    if getattr(websocket, "state", None) is not OPEN:
        return None
    terminated = getattr(getattr(server, "context", None), "terminated", None)
    return RawTransport(transport, writer.drain, websocket, getattr(terminated, "wait", None))


def closed_for_size(asgi_send: Any) -> bool:
    """Whether Hypercorn closed this WebSocket with 1009 because a client message went over
    `websocket_max_message_size`. Hypercorn does not tell the app (its ASGI disconnect says
    1006); its message buffer is left holding more than the limit."""
    buffer = getattr(getattr(asgi_send, "__self__", None), "buffer", None)
    limit = getattr(buffer, "max_length", None)
    return isinstance(limit, int) and getattr(buffer, "length", 0) > limit
