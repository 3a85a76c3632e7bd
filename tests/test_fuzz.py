"""Hostile and broken input on /api/ws: every bad message gets an error event or a meaningful
close, the connection or the server keeps serving, and the event loop is not blocked."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from collections.abc import Awaitable, Callable

import pytest
import websockets

# Generous bounds: a handler that blocks the loop on hostile input (a quadratic parse, a
# recursive walk) takes seconds, a healthy one milliseconds.
LOOP_BLOCKED_AT_MOST = 0.5
# Python memory blocks a case may leave behind (caches of the interpreter and libraries); a
# leak of the hostile input or of a connection's state is orders of magnitude more.
BLOCKS_LEFT_AT_MOST = 2_000


async def assert_serving(server) -> None:
    """A fresh connection still gets its greeting and a pong, promptly."""
    started = time.monotonic()
    async with server.client() as client:
        await client.greeting()
        assert (await client.request("ping"))["type"] == "pong"
    assert time.monotonic() - started < 2.0


async def unharmed(server, case: Callable[[], Awaitable[None]]) -> None:
    """Run `case`; then the server still serves a fresh connection, its event loop was never
    blocked for long, and its memory is back at the baseline taken before the case (the case
    is a function so that what it held is gone when it returns: test and server share the
    process)."""
    await assert_serving(server)  # what a first connection allocates once is not a leak
    gc.collect()
    baseline = sys.getallocatedblocks()
    server.gateway.loop_lag.max = 0.0
    await case()
    await assert_serving(server)
    assert server.gateway.loop_lag.max < LOOP_BLOCKED_AT_MOST
    async with asyncio.timeout(5):
        while server.gateway.manager.connections:
            await asyncio.sleep(0.02)
    gc.collect()
    left = sys.getallocatedblocks() - baseline
    assert left < BLOCKS_LEFT_AT_MOST


HOSTILE = [
    pytest.param("[" * 100_000 + "]" * 100_000, "Invalid JSON", id="nesting-100k"),
    pytest.param(
        '{"type": "subscribe", "data": {"since": ' + "9" * 5000 + "}}",
        "Invalid JSON",
        id="huge-integer",
    ),
    pytest.param(
        '{"type": "subscribe", "data": {"since": -1}}', "Invalid message", id="negative-since"
    ),
    pytest.param(
        '{"type": "subscribe", "data": {"topics": [[["market"]]]}}',
        "Invalid message",
        id="nested-topic",
    ),
    pytest.param(
        '{"type": "ping", "request_id": {"a": 1}}', "Invalid message", id="object-request-id"
    ),
    pytest.param(
        '{"type": "subscribe", "data": {"topics": null}}', "Invalid message", id="null-topics"
    ),
    pytest.param(
        '{"type": "command", "data": {"command": ["get_status"]}}',
        "Invalid message",
        id="list-command",
    ),
    pytest.param('"just a string"', "Message must be a JSON object", id="string"),
    pytest.param("null", "Message must be a JSON object", id="null"),
    pytest.param("\u0000\u0001", "Invalid JSON", id="control-characters"),
    pytest.param('{"type": "' + "x" * 100_000 + '"}', "Unknown message type", id="long-type"),
]


@pytest.mark.parametrize("raw, error", HOSTILE)
async def test_hostile_message_gets_an_error_and_the_connection_survives(server, raw, error):
    async def case():
        async with server.client() as client:
            await client.greeting()
            await client.send(raw)
            reply = await client.recv()
            assert reply["type"] == "error"
            assert reply["data"]["error"] == error
            assert len(reply["data"]["details"]) < 1000  # names the value, does not echo it all
            assert (await client.request("ping"))["type"] == "pong"

    await unharmed(server, case)


# Each client message, valid, with its reply; and the JSON types each field accepts.
MESSAGES = {
    "subscribe": (
        {"topics": ["market"], "symbols": ["BTC/USDT"], "since": 0, "stream_id": "s"},
        "subscribed",
    ),
    "unsubscribe": ({"topics": ["market"], "symbols": ["BTC/USDT"]}, "unsubscribed"),
    "command": ({"command": "get_status"}, "system_status"),
    "ping": ({}, "pong"),
    "pong": ({}, None),
    "get_status": ({}, "system_status"),
    "get_subscriptions": ({}, "subscriptions"),
}
ACCEPTED = {
    "type": (str,),
    "request_id": (str, int, type(None)),
    "data": (dict, type(None)),
    "topics": (list,),
    "symbols": (list,),
    "since": (int, type(None)),
    "stream_id": (str, type(None)),
    "command": (str,),
}
WRONG_VALUES = [True, 1, 1.5, "text", None, [], ["x", 1], {}, {"a": [1]}, 10**30]


def wrong_type_cases():
    for type_, (data, _) in MESSAGES.items():
        for field in ("type", "request_id", "data", *data):
            for value in WRONG_VALUES:
                accepted = ACCEPTED[field]
                if (
                    isinstance(value, accepted)
                    and not isinstance(value, bool)
                    and not (isinstance(value, int) and value >= 2**63)
                ):
                    continue  # a right type: not this test's business
                yield pytest.param(type_, field, value, id=f"{type_}-{field}-{value!r:.12}")


async def test_a_wrong_type_in_any_field_of_any_message_is_an_error_event(server):
    """Every field of every message, each wrong JSON type: an `error` event (with the
    request_id when it was usable), and the same connection goes on serving."""
    cases = list(wrong_type_cases())
    assert len(cases) > 150

    async def case():
        async with server.client() as client:
            await client.greeting()
            for case in cases:
                type_, field, value = case.values
                data = dict(MESSAGES[type_][0])
                message = {"type": type_, "request_id": "case", "data": data}
                if field in message:
                    message[field] = value
                else:
                    data[field] = value
                await client.send(message)
                reply = await client.recv_event()
                assert reply["type"] == "error", (case.id, reply)
                assert reply["data"]["code"] == "MESSAGE_PROCESSING_ERROR", (case.id, reply)
                if field != "request_id":
                    assert reply["request_id"] == "case", case.id
            for type_, (data, reply_type) in MESSAGES.items():  # still serving every message
                if reply_type is not None:
                    reply = await client.request(type_, data)
                    assert reply["type"] == reply_type, reply

    await unharmed(server, case)


@pytest.mark.parametrize("count", [10_000, 100_000])
async def test_subscribing_to_thousands_of_topics_at_once(server, count):
    async def case():
        async with server.client() as client:
            await client.greeting()
            valid = await client.request("subscribe", {"topics": ["market"] * count})
            assert valid["data"]["topics"] == ["market"]
            refused = await client.request(
                "subscribe", {"symbols": [f"S{n}/USDT" for n in range(10_000)]}
            )
            assert refused["data"]["code"] == "TOO_MANY_SUBSCRIPTIONS"
            subscriptions = await client.request("get_subscriptions")
            assert subscriptions["data"]["count"] == 1

    await unharmed(server, case)


async def test_messages_at_the_size_limit_are_served_and_over_it_closed(gateway_factory):
    async with gateway_factory(WS_MAX_MESSAGE_SIZE=4096) as server:

        async def case():
            async with server.client() as client:
                await client.greeting()
                message = {"type": "ping", "request_id": "at-limit", "data": {"pad": ""}}
                message["data"]["pad"] = "x" * (4096 - len(json.dumps(message)))
                assert len(json.dumps(message)) == 4096
                await client.send(message)
                assert (await client.recv())["request_id"] == "at-limit"
                message["data"]["pad"] += "x"
                await client.send(message)
                await client.ws.wait_closed()
                assert client.ws.close_code == 1009

        await unharmed(server, case)


async def test_invalid_utf8_in_a_binary_message_is_an_error_event(server):
    async def case():
        async with server.client() as client:
            await client.greeting()
            await client.send(b'{"type": "ping", "request_id": "\xff\xfe"}')
            reply = await client.recv()
            assert (reply["type"], reply["data"]["error"]) == ("error", "Invalid JSON")

    await unharmed(server, case)


async def test_binary_and_empty_frames(server):
    async def case():
        async with server.client() as client:
            await client.greeting()
            for frame in (b"", b"\x00\xff", "", b'{"type": "get_subscriptions"}'):
                await client.send(frame)
            replies = [await client.recv() for _ in range(4)]
            assert [r["type"] for r in replies] == ["error", "error", "error", "subscriptions"]

    await unharmed(server, case)


async def test_a_flood_of_subscribe_and_unsubscribe(server):
    async def case():
        async with server.client() as client:
            await client.greeting()
            for n in range(1000):
                kind = "subscribe" if n % 2 == 0 else "unsubscribe"
                await client.send(
                    {
                        "type": kind,
                        "data": {"topics": ["market", "alerts"], "symbols": ["BTC/USDT"]},
                    }
                )
            replies = [await client.recv(timeout=10) for _ in range(1000)]
            assert [r["type"] for r in replies] == ["subscribed", "unsubscribed"] * 500
            assert (await client.request("get_subscriptions"))["data"]["count"] == 0

    await unharmed(server, case)
    assert server.gateway.manager.index.by_key == {}


async def test_hundreds_of_connections_at_once(gateway_factory):
    async with gateway_factory(WS_MAX_CONNECTIONS=400) as server:

        async def connect_and_greet():
            ws = await websockets.connect(server.url, open_timeout=20)
            first = json.loads(await asyncio.wait_for(ws.recv(), 20))
            return ws, first

        async def case():
            opened = await asyncio.gather(*(connect_and_greet() for _ in range(300)))
            try:
                assert all(first["type"] == "connected" for _, first in opened)
                assert server.gateway.manager.get_stats()["active_connections"] == 300
                await assert_serving(server)
            finally:
                await asyncio.gather(*(ws.close() for ws, _ in opened))

        await unharmed(server, case)
