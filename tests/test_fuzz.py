"""Hostile and broken input on /api/ws: every bad message gets an error event or a meaningful
close, the connection or the server keeps serving, and the event loop is not blocked."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets


async def assert_serving(server) -> None:
    """A fresh connection still gets its greeting and a pong, promptly."""
    started = time.monotonic()
    async with server.client() as client:
        await client.greeting()
        assert (await client.request("ping"))["type"] == "pong"
    assert time.monotonic() - started < 2.0


HOSTILE = [
    pytest.param("[" * 100_000 + "]" * 100_000, "Invalid JSON", id="nesting-100k"),
    pytest.param('{"type": "subscribe", "data": {"since": ' + "9" * 5000 + "}}",
                 "Invalid JSON", id="huge-integer"),
    pytest.param('{"type": "subscribe", "data": {"since": -1}}', "Invalid message",
                 id="negative-since"),
    pytest.param('{"type": "subscribe", "data": {"topics": [[["market"]]]}}',
                 "Invalid message", id="nested-topic"),
    pytest.param('{"type": "ping", "request_id": {"a": 1}}', "Invalid message",
                 id="object-request-id"),
    pytest.param('{"type": "subscribe", "data": {"topics": null}}', "Invalid message",
                 id="null-topics"),
    pytest.param('{"type": "command", "data": {"command": ["get_status"]}}',
                 "Invalid message", id="list-command"),
    pytest.param('"just a string"', "Message must be a JSON object", id="string"),
    pytest.param("null", "Message must be a JSON object", id="null"),
    pytest.param("\u0000\u0001", "Invalid JSON", id="control-characters"),
    pytest.param('{"type": "' + "x" * 100_000 + '"}', "Unknown message type",
                 id="long-type"),
]


@pytest.mark.parametrize("raw, error", HOSTILE)
async def test_hostile_message_gets_an_error_and_the_connection_survives(server, raw, error):
    async with server.client() as client:
        await client.greeting()
        await client.send(raw)
        reply = await client.recv()
        assert reply["type"] == "error"
        assert reply["data"]["error"] == error
        assert len(reply["data"]["details"]) < 1000  # names the value, does not echo it all
        assert (await client.request("ping"))["type"] == "pong"
    await assert_serving(server)


@pytest.mark.parametrize("count", [10_000, 100_000])
async def test_subscribing_to_thousands_of_topics_at_once(server, count):
    async with server.client() as client:
        await client.greeting()
        valid = await client.request("subscribe", {"topics": ["market"] * count})
        assert valid["data"]["topics"] == ["market"]
        symbols = [f"S{n}/USDT" for n in range(10_000)]
        refused = await client.request("subscribe", {"symbols": symbols})
        assert refused["data"]["code"] == "TOO_MANY_SUBSCRIPTIONS"
        subscriptions = await client.request("get_subscriptions")
        assert subscriptions["data"]["count"] == 1
    await assert_serving(server)


async def test_messages_at_the_size_limit_are_served_and_over_it_closed(gateway_factory):
    async with gateway_factory(WS_MAX_MESSAGE_SIZE=4096) as server:
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
        await assert_serving(server)


async def test_binary_and_empty_frames(server):
    async with server.client() as client:
        await client.greeting()
        for frame in (b"", b"\x00\xff", "", b'{"type": "get_subscriptions"}'):
            await client.send(frame)
        replies = [await client.recv() for _ in range(4)]
        assert [r["type"] for r in replies] == ["error", "error", "error", "subscriptions"]
    await assert_serving(server)


async def test_a_flood_of_subscribe_and_unsubscribe(server):
    async with server.client() as client:
        await client.greeting()
        for n in range(1000):
            kind = "subscribe" if n % 2 == 0 else "unsubscribe"
            await client.send({"type": kind, "data": {"topics": ["market", "alerts"],
                                                      "symbols": ["BTC/USDT"]}})
        replies = [await client.recv(timeout=10) for _ in range(1000)]
        assert [r["type"] for r in replies] == ["subscribed", "unsubscribed"] * 500
        assert (await client.request("get_subscriptions"))["data"]["count"] == 0
    assert server.gateway.manager.index.by_key == {}
    await assert_serving(server)


async def test_hundreds_of_connections_at_once(gateway_factory):
    async with gateway_factory(WS_MAX_CONNECTIONS=400) as server:
        async def connect_and_greet():
            ws = await websockets.connect(server.url, open_timeout=20)
            first = json.loads(await asyncio.wait_for(ws.recv(), 20))
            return ws, first

        opened = await asyncio.gather(*(connect_and_greet() for _ in range(300)))
        try:
            assert all(first["type"] == "connected" for _, first in opened)
            assert server.gateway.manager.get_stats()["active_connections"] == 300
            await assert_serving(server)
        finally:
            await asyncio.gather(*(ws.close() for ws, _ in opened))
        async with asyncio.timeout(10):
            while server.gateway.manager.connections:
                await asyncio.sleep(0.05)
