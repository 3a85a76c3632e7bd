"""REST: ingest, health, stats, metrics, docs."""

from __future__ import annotations

import pytest

from tests.helpers import metric_families, metric_value


async def post_events(server, events, **headers):
    client = server.app.test_client()
    return await client.post("/api/events", json={"events": events}, headers=headers)


async def test_ingest_delivers_data_exactly_as_sent(server):
    data = [
        {
            "symbol": "S07/USDT",
            "price": 1.5,
            "volume_24h": 10.0,
            "change_24h": -0.5,
            "ts_us": 1732500000123456,
            "seq": 9,
            "nested": {"extra": [1, "two", None]},
        }
    ]
    async with (
        server.subscribed(symbols=["S07/USDT"]) as by_symbol,
        server.subscribed(["market"]) as by_topic,
    ):
        response = await post_events(
            server,
            [
                {"type": "market_update", "symbol": "S07/USDT", "data": data},
                {"type": "market_update", "topic": "market", "data": data},
            ],
        )
        assert response.status_code == 202
        assert await response.get_json() == {
            "accepted": 2,
            "first_seq": 1,
            "last_seq": 2,
            "repeated": False,
        }
        for client, seqs in ((by_symbol, [1, 2]), (by_topic, [1, 2])):
            for seq in seqs:
                event = await client.recv_event()
                assert (event["seq"], event["data"]) == (seq, data)


async def test_ingest_with_an_idempotency_key_publishes_a_retry_once(server):
    alert = {"type": "alert", "data": {"level": "info", "message": "once"}}
    async with server.subscribed(["alerts"]) as client:
        first = await post_events(server, [alert, alert], **{"Idempotency-Key": "k-1"})
        retry = await post_events(server, [alert, alert], **{"Idempotency-Key": "k-1"})
        assert (first.status_code, retry.status_code) == (202, 202)
        assert await retry.get_json() == {**await first.get_json(), "repeated": True}
        other = await post_events(server, [alert], **{"Idempotency-Key": "k-1"})
        assert other.status_code == 409
        assert (await other.get_json())["code"] == "IDEMPOTENCY_KEY_REUSED"
        for bad in ("", "a b", "x" * 201):
            refused = await post_events(server, [alert], **{"Idempotency-Key": bad})
            assert refused.status_code == 400, bad
            assert "idempotency_key" in (await refused.get_json())["details"]
        assert [(await client.recv_event())["seq"] for _ in range(2)] == [1, 2]
        await client.no_message()


# The original SIGMAX engine's events, as its protocol module gives them.
ORIGINAL_EVENTS = [
    {
        "type": "analysis_update",
        "data": {
            "symbol": "BTC/USDT",
            "decision": "buy",
            "confidence": 0.75,
            "bull_score": 0.8,
            "bear_score": 0.4,
            "reasoning": "Strong upward momentum",
        },
    },
    {
        "type": "proposal_created",
        "data": {
            "proposal_id": "prop_1",
            "symbol": "BTC/USDT",
            "action": "buy",
            "size": 0.001,
            "reason": "Agent consensus",
        },
    },
    {
        "type": "proposal_approved",
        "data": {
            "proposal_id": "prop_1",
            "approved_by": "user",
            "approved_at": "2025-12-21T10:30:00Z",
        },
    },
    {
        "type": "trade_executed",
        "data": {
            "proposal_id": "prop_1",
            "symbol": "BTC/USDT",
            "action": "buy",
            "size": 0.001,
            "filled_price": 95000.0,
            "order_id": "order_1",
            "status": "filled",
        },
    },
    {
        "type": "status_change",
        "data": {
            "previous_status": "running",
            "current_status": "paused",
            "reason": "manual pause",
        },
    },
    {
        "type": "market_update",
        "data": [
            {"symbol": "BTC/USDT", "price": 95000.0},
            {"symbol": "ETH/USDT", "price": 3500.0, "volume_24h": 500000},
        ],
    },
    {
        "type": "portfolio_update",
        "data": {
            "total_value": 100000.0,
            "available_cash": 50000.0,
            "positions": [{"symbol": "BTC/USDT", "size": 0.5, "value": 47500.0}],
            "total_pnl": 2500.0,
            "total_pnl_percent": 2.5,
        },
    },
    {
        "type": "health_update",
        "data": {
            "cpu_percent": 25.5,
            "memory_percent": 45.2,
            "disk_percent": 60.0,
            "process_count": 150,
        },
    },
    {
        "type": "alert",
        "data": {
            "severity": "high",
            "message": "Drawdown limit near",
            "action_required": True,
            "engine_extra": {"kept": [1, "two"]},
        },
    },
    {"type": "alert", "data": {"level": "warning", "message": "level is a synonym"}},
    {"type": "warning", "data": {"severity": "medium", "message": "Spread widening"}},
]


async def test_reject_takes_an_optional_body(server):
    await server.gateway.simulation.tick_market()
    client = server.app.test_client()
    ids = []
    for _ in range(3):
        created = await client.post(
            "/api/proposals", json={"symbol": "BTC/USDT", "action": "buy", "size": 0.01}
        )
        ids.append((await created.get_json())["proposal_id"])
    bare = await client.post(f"/api/proposals/{ids[0]}/reject")
    assert bare.status_code == 200
    assert (await bare.get_json())["proposal"]["status"] == "rejected"
    reasoned = await client.post(f"/api/proposals/{ids[1]}/reject", json={"reason": "no"})
    assert (await reasoned.get_json())["proposal"]["status_reason"] == "no"
    wrong = await client.post(f"/api/proposals/{ids[2]}/reject", json={"reason": 5})
    assert wrong.status_code == 400
    assert "Decision" not in (await wrong.get_json())["details"]


async def test_the_original_engines_events_are_relayed_intact(server):
    async with (
        server.subscribed(["all"]) as everything,
        server.subscribed(symbols=["BTC/USDT"]) as by_symbol,
    ):
        response = await post_events(server, ORIGINAL_EVENTS)
        assert response.status_code == 202, await response.get_json()
        received = [await everything.recv_event() for _ in ORIGINAL_EVENTS]
        assert [(e["type"], e["data"]) for e in received] == [
            (e["type"], e["data"]) for e in ORIGINAL_EVENTS
        ]
        assert received[-1]["seq"] == (await response.get_json())["last_seq"]
        # An event whose data names a symbol reaches that symbol's subscribers.
        symbol_types = [(await by_symbol.recv_event())["type"] for _ in range(4)]
        assert symbol_types == [
            "analysis_update",
            "proposal_created",
            "trade_executed",
            "market_update",
        ]
        await by_symbol.no_message()


async def test_ingest_routes_to_topic_and_symbol_once(server):
    async with server.subscribed(["alerts"], ["BTC/USDT"]) as client:
        response = await post_events(
            server,
            [
                {
                    "type": "alert",
                    "symbol": "btc/usdt",
                    "data": {"level": "warning", "message": "drawdown"},
                }
            ],
        )
        assert response.status_code == 202
        event = await client.recv_event()
        assert event["data"] == {"level": "warning", "message": "drawdown"}
        await client.no_message()


@pytest.mark.parametrize(
    "bad, named",
    [
        ({"type": "nonsense", "data": {}}, "nonsense"),
        ({"type": "alert", "topic": "weather", "data": {}}, "weather"),
        ({"type": "alert", "topic": "market", "data": {}}, "market"),
        ({"type": "alert", "topic": "all", "data": {}}, "all"),
        ({"type": "alert", "symbol": "BTCUSDT", "data": {}}, "BTCUSDT"),
        ({"type": "market_update", "data": {"symbol": "BTC/USDT"}}, "list"),
        ({"type": "market_update", "data": [{"price": 1}]}, "symbol"),
        ({"type": "market_update", "data": [{"symbol": "btc/usdt"}]}, "btc/usdt"),
        ({"type": "alert", "data": [1, 2]}, "object"),
        ({"type": "alert", "data": {"level": "info", "message": "m", "n": 2**70}}, "serialized"),
        (
            {"type": "trade_executed", "data": {"proposal_id": "p", "filled_price": "95000"}},
            "filled_price",
        ),
        ({"type": "alert", "data": {"severity": 3}}, "severity"),
        ({"type": "proposal_created", "data": {"symbol": "BTCUSDT"}}, "symbol"),
        (
            {
                "type": "analysis_update",
                "data": {
                    "symbol": "BTC/USDT",
                    "decision": "maybe",
                    "confidence": 1,
                    "bull_score": 1,
                    "bear_score": 0,
                    "reasoning": "r",
                },
            },
            "decision",
        ),
        (
            {
                "type": "market_update",
                "data": [{"symbol": "BTC/USDT", "price": True, "volume_24h": 1, "change_24h": 0}],
            },
            "price",
        ),
    ],
)
async def test_bad_event_refuses_the_whole_batch(server, bad, named):
    good = {"type": "alert", "data": {"level": "info", "message": "ok"}}
    response = await post_events(server, [good, bad, good])
    assert response.status_code == 400
    body = await response.get_json()
    assert body["code"] == "INVALID_EVENT"
    assert "events[1]" in body["error"]
    assert named in body["details"]
    assert server.gateway.bus.head == 0


@pytest.mark.parametrize(
    "body",
    [
        {"events": [{"type": "alert"}]},
        {"events": [{"type": 5, "data": {}}]},
        {"events": [{"type": "alert", "data": {}, "colour": "red"}]},
        {"events": "alert"},
        {},
    ],
)
async def test_malformed_batch_is_a_json_400(server, body):
    response = await server.app.test_client().post("/api/events", json=body)
    assert response.status_code == 400
    assert (await response.get_json())["code"] == "VALIDATION_ERROR"


async def test_body_that_is_not_json_is_a_json_400(server):
    response = await server.app.test_client().post(
        "/api/events", data="{nope", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert (await response.get_json())["code"] == "BAD_REQUEST"


async def test_ingest_needs_a_publish_key_when_keys_are_configured(gateway_factory):
    async with gateway_factory(API_KEYS=("reader:read", "engine:publish")) as server:
        client = server.app.test_client()
        event = {"events": [{"type": "alert", "data": {"level": "info", "message": "m"}}]}
        missing = await client.post("/api/events", json=event)
        assert (missing.status_code, (await missing.get_json())["error"]) == (
            401,
            "Missing API key",
        )
        wrong = await client.post("/api/events", json=event, headers={"X-API-Key": "nope"})
        assert (wrong.status_code, (await wrong.get_json())["error"]) == (401, "Invalid API key")
        forbidden = await client.post("/api/events", json=event, headers={"X-API-Key": "reader"})
        assert forbidden.status_code == 403
        ok = await client.post("/api/events", json=event, headers={"X-API-Key": "engine"})
        assert ok.status_code == 202
        assert (await client.get("/api/ws/stats")).status_code == 401
        stats = await client.get("/api/ws/stats", headers={"X-API-Key": "reader"})
        assert stats.status_code == 200


async def test_health_and_stats_report_the_gateway(server):
    client = server.app.test_client()

    async def scrape() -> dict:
        return metric_families(await (await client.get("/metrics")).get_data(as_text=True))

    before = await scrape()
    async with server.subscribed(["market"], ["BTC/USDT"]):
        await server.publish("market_update", [{"symbol": "BTC/USDT", "price": 1.0}])
        health = await (await client.get("/api/health")).get_json()
        assert health["status"] == "ok"
        assert health["connections"] == 1
        assert health["last_seq"] == 1
        stats = await (await client.get("/api/ws/stats")).get_json()
        assert stats["active_connections"] == 1
        assert stats["subscriptions"] == {"market": 1, "symbol:BTC/USDT": 1}
        assert stats["events_published"] == 1
        assert stats["deliveries"] == 1
        # The metrics are the test process's (shared by its gateways): gauges as they are,
        # counters by their increase.
        after = await scrape()
        assert metric_value(after, "sigmax_ws_connections") == 1
        assert metric_value(after, "sigmax_ws_topic_subscribers", topic="market") == 1
        deliveries = "sigmax_ws_deliveries", "sigmax_ws_deliveries_total"
        assert metric_value(after, *deliveries) - metric_value(before, *deliveries) == 1


async def test_openapi_and_asyncapi_documents(server):
    client = server.app.test_client()
    openapi = await (await client.get("/openapi.json")).get_json()
    assert {"/api/events", "/api/health", "/api/ws/stats"} <= set(openapi["paths"])
    assert (await client.get("/docs")).status_code == 200
    asyncapi = await (await client.get("/asyncapi.json")).get_json()
    messages = asyncapi["components"]["messages"]
    assert {"subscribed", "error", "market_update", "trade_executed"} <= set(messages)
    assert "INVALID_TOPIC" in asyncapi["info"]["description"]


async def test_cors_allows_configured_origins_only(server):
    client = server.app.test_client()
    allowed = await client.get("/api/health", headers={"Origin": "http://localhost:3000"})
    assert allowed.headers.get("Access-Control-Allow-Origin") == "http://localhost:3000"
    foreign = await client.get("/api/health", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in foreign.headers


async def test_rest_responses_carry_security_headers(server):
    response = await server.app.test_client().get("/api/health")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Cache-Control"] == "no-store"


async def test_rest_is_rate_limited_per_client_with_retry_after(gateway_factory):
    async with gateway_factory(REST_RATE_LIMIT=3) as server:
        client = server.app.test_client()
        statuses = [(await client.get("/openapi.json")).status_code for _ in range(5)]
        assert statuses[:3] == [200, 200, 200] and statuses[-1] == 429
        limited = await client.get("/openapi.json")
        assert limited.status_code == 429
        assert int(limited.headers["Retry-After"]) >= 0
        assert (await limited.get_json())["code"] == "TOO_MANY_REQUESTS"
        event = {"events": [{"type": "alert", "data": {"level": "info", "message": "m"}}]}
        for _ in range(5):  # the engine's ingest path is not limited
            assert (await client.post("/api/events", json=event)).status_code == 202
        for path in ("/api/health", "/api/health/live"):  # nor are probes: a 429 takes a
            for _ in range(5):  # healthy worker out of its load balancer
                assert (await client.get(path)).status_code == 200


async def test_a_body_that_is_not_utf8_is_a_json_400(server):
    response = await server.app.test_client().post(
        "/api/proposals", data=b"a\xfb5", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert (await response.get_json())["code"] == "BAD_REQUEST"
