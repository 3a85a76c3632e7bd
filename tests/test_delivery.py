"""Fan-out: who receives what, once, in seq order; resume from history."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import orjson

from app import create_app
from app.services.database import migrate
from config import Config

MARKET = [
    {"symbol": "BTC/USDT", "price": 95000.0, "volume_24h": 1000000, "change_24h": 2.5},
    {"symbol": "ETH/USDT", "price": 3500.0, "volume_24h": 500000, "change_24h": 1.8},
]


async def test_overlapping_subscriptions_get_each_event_once(server):
    async with server.subscribed(["all", "market", "analysis"], ["BTC/USDT"]) as client:
        await server.publish("market_update", MARKET)
        await server.publish(
            "analysis_update", {"symbol": "BTC/USDT", "decision": "buy"}, symbol="BTC/USDT"
        )
        await server.publish("health_update", {"cpu_percent": 1.0})
        received = [await client.recv_event() for _ in range(3)]
        assert [m["type"] for m in received] == [
            "market_update",
            "analysis_update",
            "health_update",
        ]
        assert [m["seq"] for m in received] == [1, 2, 3]
        await client.no_message()


async def test_stream_event_envelope(server):
    async with server.subscribed(["market"]) as client:
        await server.publish("market_update", MARKET)
        event = await client.recv_event()
        assert event == {
            "type": "market_update",
            "data": MARKET,
            "timestamp": event["timestamp"],
            "connection_id": None,
            "seq": 1,
        }
        assert event["timestamp"].endswith("Z")


async def test_topic_and_symbol_routing(server):
    async with (
        server.subscribed(["proposals"]) as proposals,
        server.subscribed(symbols=["ETH/USDT"]) as eth,
        server.subscribed(["all"]) as everything,
        server.subscribed(["alerts"]) as alerts,
    ):
        await server.publish(
            "proposal_created", {"proposal_id": "p1", "symbol": "ETH/USDT"}, symbol="ETH/USDT"
        )
        await server.publish("analysis_update", {"symbol": "BTC/USDT"}, symbol="BTC/USDT")
        await server.publish("analysis_update", {"symbol": "ETH/USDT"}, symbol="ETH/USDT")
        assert (await proposals.recv_event())["seq"] == 1
        assert [(await eth.recv_event())["seq"] for _ in range(2)] == [1, 3]
        assert [(await everything.recv_event())["seq"] for _ in range(3)] == [1, 2, 3]
        for client in (proposals, eth, everything, alerts):
            await client.no_message(0.1)


async def test_symbol_only_subscriber_gets_its_entries_of_market_updates(server):
    async with (
        server.subscribed(symbols=["ETH/USDT"]) as eth,
        server.subscribed(["market"]) as market,
        server.subscribed(["market"], ["ETH/USDT"]) as both,
    ):
        await server.publish("market_update", MARKET)
        assert (await eth.recv_event())["data"] == [MARKET[1]]
        assert (await market.recv_event())["data"] == MARKET
        assert (await both.recv_event())["data"] == MARKET


async def test_broadcast_helpers_of_the_connection_manager(server):
    manager = server.gateway.manager
    async with server.subscribed(["alerts"]) as alerts, server.subscribed() as sol:
        await manager.subscribe(list(manager.connections)[1], "symbol:SOL/USDT")
        await manager.broadcast({"type": "alert", "data": {"message": "hello"}})
        await manager.broadcast_to_symbols(
            ["SOL/USDT"], {"type": "analysis_update", "data": {"symbol": "SOL/USDT"}}
        )
        assert (await alerts.recv_event())["data"] == {"message": "hello"}
        assert (await sol.recv_event())["data"] == {"symbol": "SOL/USDT"}
        connection_id = next(iter(manager.connections))
        assert await manager.send_to(connection_id, {"type": "alert", "data": {"direct": 1}})
        direct = await alerts.recv_event()
        assert direct["data"] == {"direct": 1}
        assert direct["connection_id"] == connection_id
        assert "seq" not in direct
        assert not await manager.send_to("no-such-connection", {"type": "alert", "data": {}})
        info = manager.get_connection_info(connection_id)
        assert info is not None and info["connection_id"] == connection_id


async def test_resume_replays_missed_events_then_goes_live(server):
    for n in range(1, 6):
        await server.publish("alert", {"n": n})
    await server.publish("market_update", MARKET)  # seq 6, not subscribed
    async with server.client() as client:
        await client.greeting()
        reply = await client.request("subscribe", {"topics": ["alerts"], "since": 2})
        assert reply["data"]["recovered"] is True
        assert reply["data"]["replayed"] == 3
        replayed = [await client.recv_event() for _ in range(3)]
        assert [(e["seq"], e["data"]["n"]) for e in replayed] == [(3, 3), (4, 4), (5, 5)]
        await server.publish("alert", {"n": 7})
        live = await client.recv_event()
        assert live["seq"] == 7
        await client.no_message()


async def test_resume_beyond_history_says_not_recovered(gateway_factory):
    async with gateway_factory(EVENT_HISTORY_SIZE=3) as server:
        for n in range(1, 7):
            await server.publish("alert", {"n": n})
        async with server.client() as client:
            await client.greeting()
            reply = await client.request("subscribe", {"topics": ["alerts"], "since": 1})
            assert reply["data"]["recovered"] is False
            assert reply["data"]["replayed"] == 3
            assert [(await client.recv_event())["seq"] for _ in range(3)] == [4, 5, 6]


async def test_resume_at_head_and_from_the_future(server):
    await server.publish("alert", {"n": 1})
    async with server.client() as client:
        await client.greeting()
        at_head = await client.request("subscribe", {"topics": ["alerts"], "since": 1})
        assert (at_head["data"]["recovered"], at_head["data"]["replayed"]) == (True, 0)
        future = await client.request("subscribe", {"topics": ["alerts"], "since": 99})
        assert (future["data"]["recovered"], future["data"]["replayed"]) == (False, 0)


async def test_resume_never_repeats_what_the_connection_already_got(server):
    async with server.subscribed(["market"]) as client:
        await server.publish("market_update", MARKET)  # 1, delivered live
        await server.publish("alert", {"n": 2})  # 2, missed
        assert (await client.recv_event())["seq"] == 1
        reply = await client.request("subscribe", {"topics": ["alerts"], "since": 0})
        assert reply["data"]["replayed"] == 1
        assert (await client.recv_event())["seq"] == 2
        await client.no_message()


async def test_many_events_arrive_in_order_without_loss(server):
    async with server.subscribed(["alerts"]) as a, server.subscribed(["all"]) as b:
        for n in range(500):
            await server.publish("alert", {"n": n})
            if n % 50 == 0:
                await asyncio.sleep(0)
        for client in (a, b):
            seqs = [(await client.recv_event())["seq"] for _ in range(500)]
            assert seqs == list(range(1, 501))


async def test_a_mixed_batch_reaches_each_client_once_in_order(server):
    symbols = ["BTC/USDT", "ETH/USDT", "SOL/USDT"]
    events = []
    for n in range(60):
        symbol = symbols[n % 3]
        if n % 4 == 0:
            events.append(
                {
                    "type": "market_update",
                    "topic": "market",
                    "data": [
                        {"symbol": s, "price": 1.0, "volume_24h": 1.0, "change_24h": 0.0, "n": n}
                        for s in symbols
                    ],
                }
            )
        else:
            events.append(
                {
                    "type": "analysis_update",
                    "symbol": symbol,
                    "data": {
                        "symbol": symbol,
                        "decision": "hold",
                        "confidence": 0.5,
                        "bull_score": 0.5,
                        "bear_score": 0.5,
                        "reasoning": "flat",
                        "n": n,
                    },
                }
            )
    async with (
        server.subscribed(["market"]) as market,
        server.subscribed(symbols=["ETH/USDT"]) as eth,
        server.subscribed(["analysis"], ["SOL/USDT"]) as analysis_sol,
    ):
        response = await server.app.test_client().post("/api/events", json={"events": events})
        assert response.status_code == 202
        expected_market = [n + 1 for n in range(60) if n % 4 == 0]
        expected_eth = [n + 1 for n in range(60) if n % 4 == 0 or symbols[n % 3] == "ETH/USDT"]
        expected_analysis = list(range(1, 61))
        received = {}
        for name, client, expected in (
            ("market", market, expected_market),
            ("eth", eth, expected_eth),
            ("sol", analysis_sol, expected_analysis),
        ):
            received[name] = [await client.recv_event() for _ in expected]
            assert [e["seq"] for e in received[name]] == expected
            await client.no_message(0.1)
        for name, symbol in (("eth", "ETH/USDT"), ("sol", "SOL/USDT")):
            views = [e for e in received[name] if e["type"] == "market_update"]
            assert len(views) == len(expected_market)
            assert all(
                [(d["symbol"], d["n"]) for d in e["data"]] == [(symbol, e["seq"] - 1)]
                for e in views
            )
        assert all(len(e["data"]) == 3 for e in received["market"])


async def test_resume_from_another_stream_is_not_recovered(server):
    for n in range(1, 6):
        await server.publish("alert", {"n": n})
    async with server.client() as client:
        connected = await client.greeting()
        stream_id = connected["data"]["stream_id"]
        other = await client.request(
            "subscribe",
            {"topics": ["alerts"], "since": 2, "stream_id": "a-stream-before-a-restart"},
        )
        assert (other["data"]["recovered"], other["data"]["replayed"]) == (False, 0)
        await client.no_message()
        same = await client.request(
            "subscribe", {"topics": ["alerts"], "since": 2, "stream_id": stream_id}
        )
        assert (same["data"]["recovered"], same["data"]["replayed"]) == (True, 3)


async def test_quart_test_client_speaks_to_the_asgi_level_route(tmp_path):
    """`/api/ws` is served below Quart, but Quart's own test client (which sends no
    `websocket.connect`) still reaches it, as teams used to Flask test their apps."""
    url = f"sqlite:///{tmp_path}/gateway.db"
    await migrate(url)
    app = create_app(replace(Config(), DATABASE_URL=url, SIMULATION=False))
    async with app.test_app() as test_app:
        async with test_app.test_client().websocket("/api/ws") as ws:
            assert orjson.loads(await ws.receive())["type"] == "connected"
            assert orjson.loads(await ws.receive())["type"] == "system_status"
            await ws.send('{"type": "ping", "request_id": 7}')
            pong = orjson.loads(await ws.receive())
            assert (pong["type"], pong["request_id"]) == ("pong", 7)
