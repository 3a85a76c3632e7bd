"""What an open WebSocket holds on the server side, and the inbox between Hypercorn and it."""

from __future__ import annotations

import asyncio
import gc
import json

import pytest
from hypercorn.protocol.ws_stream import WSStream

from app.services.transport import Inbox


async def test_inbox_keeps_order_and_holds_the_producer_while_full():
    inbox = Inbox(2)
    await inbox.put({"n": 1})
    await inbox.put({"n": 2})
    third = asyncio.ensure_future(inbox.put({"n": 3}))
    await asyncio.sleep(0.01)
    assert not third.done()  # full: the producer waits
    assert await inbox.get() == {"n": 1}
    await asyncio.wait_for(third, 1)
    assert [await inbox.get(), await inbox.get()] == [{"n": 2}, {"n": 3}]
    reader = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0.01)
    assert not reader.done()  # empty: the consumer waits
    await inbox.put({"n": 4})
    assert await asyncio.wait_for(reader, 1) == {"n": 4}


async def test_a_cancelled_wait_leaves_the_inbox_usable():
    inbox = Inbox(1)
    reader = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0.01)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    await inbox.put({"n": 1})
    assert await asyncio.wait_for(inbox.get(), 1) == {"n": 1}


async def test_an_open_websocket_holds_no_app_queue_or_http_parser(gateway_factory):
    """Served by Hypercorn, each /api/ws connection reads its messages through an `Inbox` and
    has let go of h11 once the handshake was answered, and its messages still arrive, in
    order, past the inbox's limit (Hypercorn's max_app_queue_size, 10)."""
    async with gateway_factory() as server:
        async with server.client() as client:
            await client.greeting()
            for n in range(40):  # sent at once: the inbox fills and holds Hypercorn's reader
                await client.send({"type": "ping", "request_id": f"r{n}"})
            replies = [json.loads(await asyncio.wait_for(client.ws.recv(), 5)) for _ in range(40)]
            assert [r["request_id"] for r in replies] == [f"r{n}" for n in range(40)]
            assert {r["type"] for r in replies} == {"pong"}

            streams = [o for o in gc.get_objects() if isinstance(o, WSStream) and not o.closed]
            assert len(streams) == 1
            stream = streams[0]
            assert isinstance(stream.app_put.__self__, Inbox)
            protocol = stream.send.__self__
            assert protocol.connection.h11_connection is None
            flow = protocol.send.__self__.writer.transport.get_protocol()
            assert isinstance(flow._drain_waiters, list)
