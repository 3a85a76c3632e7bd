"""Every abuse limit refuses with its own error and is counted by name in the stats and in
/metrics, so an operator sees which limit clients run into."""

from __future__ import annotations

import asyncio

import websockets

from tests.helpers import metric_families, metric_value

LIMITED = dict(
    API_KEYS=("bot-key",),
    WS_MAX_CONNECTIONS=3,
    WS_MAX_CONNECTIONS_PER_KEY=2,
    WS_MAX_SUBSCRIPTIONS=2,
    WS_COMMAND_RATE=0.01,
    WS_COMMAND_BURST=1,
    WS_MAX_MESSAGE_SIZE=1024,
    REST_RATE_LIMIT=2,
)


LIMITS = (
    "connections_per_key",
    "subscriptions",
    "command_rate",
    "message_size",
    "rest_rate",
    "connections",
)


async def refusals(server) -> dict[str, int]:
    response = await server.app.test_client().get("/api/ws/stats", headers={"X-API-Key": "bot-key"})
    return (await response.get_json())["refusals"]


async def refusals_scraped(server) -> dict[str, float]:
    """/metrics' refusals by limit (the metrics are the test process's, shared by its gateways)."""
    response = await server.app.test_client().get("/metrics", headers={"X-API-Key": "bot-key"})
    families = metric_families(await response.get_data(as_text=True))
    return {
        limit: metric_value(
            families, "sigmax_limit_refusals", "sigmax_limit_refusals_total", limit=limit
        )
        for limit in LIMITS
    }


async def test_each_limit_refuses_and_counts_by_name(gateway_factory):
    async with gateway_factory(**LIMITED) as server:
        assert set((await refusals(server)).values()) == {0}
        scraped_before = await refusals_scraped(server)
        key = "?api_key=bot-key"
        async with server.client(key) as first, server.client(key) as second:
            await first.greeting()
            await second.greeting()
            async with server.client(key) as third:  # the key's third connection
                assert (await third.recv())["data"]["code"] == "MAX_CONNECTIONS_EXCEEDED"
            refused = await first.request(
                "subscribe", {"topics": ["market", "alerts", "executions"]}
            )
            assert refused["data"]["code"] == "TOO_MANY_SUBSCRIPTIONS"
            assert (await first.command("get_status"))["type"] == "system_status"
            assert (await first.command("get_status"))["data"]["code"] == "RATE_LIMITED"

        async with server.client(key) as big:
            await big.greeting()
            await big.send("x" * 2000)
            await big.ws.wait_closed()
            assert big.ws.close_code == 1009

        rest = server.app.test_client()
        statuses = [(await rest.get("/openapi.json")).status_code for _ in range(4)]
        assert 429 in statuses

        expected = {
            "connections_per_key": 1,
            "subscriptions": 1,
            "command_rate": 1,
            "message_size": 1,
            "rest_rate": statuses.count(429),
            "connections": 0,
        }
        async with asyncio.timeout(5):  # the oversized connection is forgotten once closed
            while await refusals(server) != expected:
                await asyncio.sleep(0.05)

        scraped_after = await refusals_scraped(server)
        assert {limit: scraped_after[limit] - scraped_before[limit] for limit in LIMITS} == expected


async def test_the_connection_limit_is_counted_apart_from_the_key_limit(gateway_factory):
    async with gateway_factory(WS_MAX_CONNECTIONS=1) as server:
        async with server.client() as first:
            await first.greeting()
            async with websockets.connect(server.url) as second:
                await second.wait_closed()
                assert second.close_code == 1013
        stats = server.gateway.stats()
        assert stats["refusals"]["connections"] == 1
        assert stats["refusals"]["connections_per_key"] == 0
        assert stats["connections_rejected"] == 1
