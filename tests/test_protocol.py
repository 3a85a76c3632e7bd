"""The spec's Message Protocol, Subscription System and Error Handling, end to end."""

from __future__ import annotations

import pytest

from app.services.commands import COMMANDS, Command, NoArguments
from app.services.events import TOPICS


async def test_connect_sends_connected_then_system_status(server):
    async with server.client() as client:
        connected = await client.recv()
        assert connected["type"] == "connected"
        assert connected["connection_id"] == connected["data"]["connection_id"]
        assert connected["data"]["server_version"]
        assert connected["data"]["available_topics"] == list(TOPICS)
        assert connected["timestamp"].endswith("Z")
        status = await client.recv()
        assert status["type"] == "system_status"
        assert status["connection_id"] == connected["connection_id"]
        assert status["data"]["status"] == "running"
        assert status["data"]["connections"] == 1


async def test_subscribe_reply_matches_the_spec(server):
    async with server.client() as client:
        await client.greeting()
        await client.send(
            {
                "type": "subscribe",
                "data": {
                    "topics": ["proposals", "executions", "analysis"],
                    "symbols": ["BTC/USDT", "ETH/USDT"],
                },
            }
        )
        reply = await client.recv()
        assert reply["type"] == "subscribed"
        assert reply["data"] == {
            "topics": ["proposals", "executions", "analysis"],
            "symbols": ["BTC/USDT", "ETH/USDT"],
            "message": "Subscribed to 3 topics and 2 symbols",
        }
        assert "request_id" not in reply
        assert set(reply) == {"type", "data", "timestamp", "connection_id"}


async def test_topics_and_symbols_are_normalised(server):
    async with server.client() as client:
        await client.greeting()
        reply = await client.request(
            "subscribe",
            {"topics": ["MARKET", "symbol:sol/usdt", "market"], "symbols": ["btc/usdt"]},
        )
        assert reply["data"]["topics"] == ["market"]
        assert reply["data"]["symbols"] == ["SOL/USDT", "BTC/USDT"]
        subs = await client.request("get_subscriptions")
        assert subs["type"] == "subscriptions"
        assert subs["data"] == {
            "topics": ["market"],
            "symbols": ["BTC/USDT", "SOL/USDT"],
            "count": 3,
        }


@pytest.mark.parametrize(
    "message_type, reply_type",
    [
        ("subscribe", "subscribed"),
        ("unsubscribe", "unsubscribed"),
        ("ping", "pong"),
        ("get_status", "system_status"),
        ("get_subscriptions", "subscriptions"),
    ],
)
async def test_every_direct_reply_echoes_request_id(server, message_type, reply_type):
    async with server.client() as client:
        await client.greeting()
        await client.send({"type": message_type, "data": {"topics": ["alerts"]}, "request_id": 42})
        reply = await client.recv()
        assert reply["type"] == reply_type
        assert reply["request_id"] == 42
        assert reply["connection_id"]


async def test_unsubscribe_stops_delivery(server):
    async with server.subscribed(["alerts", "market"]) as client:
        reply = await client.request("unsubscribe", {"topics": ["alerts"]})
        assert reply["type"] == "unsubscribed"
        assert reply["data"] == {
            "topics": ["alerts"],
            "symbols": [],
            "message": "Unsubscribed from 1 topics and 0 symbols",
        }
        await server.publish("alert", {"level": "warning"})
        await server.publish("market_update", [{"symbol": "BTC/USDT", "price": 1.0}])
        event = await client.recv_event()
        assert event["type"] == "market_update"


async def test_ping_gets_pong_and_pong_gets_nothing(server):
    async with server.client() as client:
        await client.greeting()
        await client.send({"type": "pong"})
        await client.no_message()
        await client.send({"type": "ping"})
        reply = await client.recv()
        assert reply["type"] == "pong"


async def test_get_status_replies_with_system_status(server):
    async with server.client() as client:
        await client.greeting()
        await server.publish("alert", {"n": 1})
        reply = await client.request("get_status")
        assert reply["type"] == "system_status"
        assert reply["data"]["last_seq"] == 1
        assert reply["data"]["bus_backend"] == "memory"


async def test_command_runs_and_unknown_command_is_an_error(server):
    async with server.client() as client:
        await client.greeting()
        result = await client.request("command", {"command": "pause"})
        assert result["type"] == "command_result"
        assert result["data"]["command"] == "pause"
        assert result["data"]["success"] is True
        assert result["data"]["result"] == {"status": "paused", "changed": True}
        error = await client.request("command", {"command": "launch_rockets"})
        assert error["data"]["code"] == "MESSAGE_PROCESSING_ERROR"
        assert "launch_rockets" in error["data"]["details"]
        error = await client.request("command", {"command": "get_status", "verbose": True})
        assert error["data"]["code"] == "MESSAGE_PROCESSING_ERROR"
        assert "verbose" in error["data"]["details"]


@pytest.mark.parametrize(
    ("command", "reply_type", "field"),
    [
        ("get_status", "system_status", "status"),
        ("get_portfolio", "portfolio_update", "total_value"),
        ("get_health", "health_update", "cpu_percent"),
    ],
)
async def test_commands_that_ask_for_an_event_are_answered_with_it(
    server, command, reply_type, field
):
    """As the original SIGMAX server answers them: a direct reply (no seq) of the event type."""
    async with server.client() as client:
        connected = await client.greeting()
        reply = await client.request("command", {"command": command})
        assert reply["type"] == reply_type and field in reply["data"]
        assert reply["connection_id"] == connected["data"]["connection_id"]
        assert "seq" not in reply


BAD_MESSAGES = [
    ("not json at all", "MESSAGE_PROCESSING_ERROR", "not json"),
    ("[1, 2]", "MESSAGE_PROCESSING_ERROR", "list"),
    ('{"data": {}}', "MESSAGE_PROCESSING_ERROR", "type"),
    ('{"type": "teleport"}', "MESSAGE_PROCESSING_ERROR", "teleport"),
    ('{"type": 7}', "MESSAGE_PROCESSING_ERROR", "type"),
    ('{"type": "subscribe", "data": {"topics": "market"}}', "MESSAGE_PROCESSING_ERROR", "topics"),
    ('{"type": "subscribe", "data": {"topics": [1]}}', "MESSAGE_PROCESSING_ERROR", "topics.0"),
    ('{"type": "subscribe", "data": {"since": "5"}}', "MESSAGE_PROCESSING_ERROR", "since"),
    ('{"type": "subscribe", "data": []}', "MESSAGE_PROCESSING_ERROR", "data"),
    ('{"type": "command", "data": {}}', "MESSAGE_PROCESSING_ERROR", "command"),
    (
        '{"type": "subscribe", "data": {"topics": ["invalid_topic"]}}',
        "INVALID_TOPIC",
        "'invalid_topic'",
    ),
    ('{"type": "subscribe", "data": {"symbols": ["BTCUSDT"]}}', "INVALID_SYMBOL", "'BTCUSDT'"),
    (
        '{"type": "subscribe", "data": {"topics": ["symbol:BTC-USDT"]}}',
        "INVALID_SYMBOL",
        "'BTC-USDT'",
    ),
    ('{"type": "unsubscribe", "data": {"topics": ["nope"]}}', "INVALID_TOPIC", "'nope'"),
    (b"", "MESSAGE_PROCESSING_ERROR", "Empty"),
    (b"\xff\xfe", "MESSAGE_PROCESSING_ERROR", "Invalid JSON"),
]


@pytest.mark.parametrize("raw, code, named", BAD_MESSAGES)
async def test_bad_message_gets_error_and_connection_survives(server, raw, code, named):
    async with server.client() as client:
        await client.greeting()
        await client.send(raw)
        error = await client.recv()
        assert error["type"] == "error"
        assert error["data"]["code"] == code
        assert named in error["data"]["details"] or named in error["data"]["error"]
        assert set(error["data"]) == {"error", "code", "details"}
        pong = await client.request("ping")
        assert pong["type"] == "pong"


async def test_error_echoes_request_id_and_nothing_changes(server):
    async with server.client() as client:
        await client.greeting()
        await client.send(
            {
                "type": "subscribe",
                "request_id": "bad-1",
                "data": {"topics": ["market", "invalid_topic"]},
            }
        )
        error = await client.recv()
        assert error["data"]["code"] == "INVALID_TOPIC"
        assert error["request_id"] == "bad-1"
        subs = await client.request("get_subscriptions")
        assert subs["data"]["count"] == 0


async def test_binary_frame_with_json_is_accepted(server):
    async with server.client() as client:
        await client.greeting()
        await client.send(b'{"type": "ping", "request_id": "b"}')
        reply = await client.recv()
        assert reply["type"] == "pong"
        assert reply["request_id"] == "b"


async def test_oversized_message_is_closed_with_1009(gateway_factory):
    async with gateway_factory(WS_MAX_MESSAGE_SIZE=1024) as server:
        async with server.client() as client:
            await client.greeting()
            await client.send({"type": "ping", "data": {"pad": "x" * 2048}})
            await client.ws.wait_closed()
            assert client.ws.close_code == 1009
        async with server.client() as client:
            await client.greeting()
            assert (await client.request("ping"))["type"] == "pong"


async def test_a_failing_command_is_an_internal_error_and_the_connection_survives(
    server, monkeypatch
):
    async def broken(gateway, principal, arguments):
        raise ZeroDivisionError("bug")

    monkeypatch.setitem(COMMANDS, "broken", Command("broken", "read", NoArguments, broken))
    async with server.client() as client:
        await client.greeting()
        error = await client.request("command", {"command": "broken"})
        assert error["type"] == "error"
        assert error["data"]["code"] == "INTERNAL_ERROR"
        assert "bug" not in error["data"]["details"]
        assert (await client.request("ping"))["type"] == "pong"
