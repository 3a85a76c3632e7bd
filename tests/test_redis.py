"""Scale-out through Redis: several gateways (workers) share one event stream. Real Redis, real
connections; fault tests start a redis-server of their own on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import urllib.request
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import websockets

from tests.helpers import (
    connect_when_up,
    free_port,
    migrate_with_cli,
    own_redis,
    reader_paused,
    running_gateway,
    start_host,
    stop_host,
)


@asynccontextmanager
async def workers(count, redis, database_url, **settings):
    """`count` gateways on one Redis stream and one database, like the workers of a host."""
    url, prefix = redis
    async with AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(
                running_gateway(
                    REDIS_URL=url, REDIS_PREFIX=prefix, DATABASE_URL=database_url, **settings
                )
            )
            for _ in range(count)
        ]
        yield servers


@pytest.fixture
async def sqlite_url(tmp_path):
    from app.services.database import migrate

    url = f"sqlite:///{tmp_path}/shared.db"
    await migrate(url)
    return url


async def publish_alerts(server, first, count):
    events = [
        {
            "type": "alert",
            "symbol": "BTC/USDT" if n % 2 else None,
            "data": {"level": "info", "message": "m", "n": n},
        }
        for n in range(first, first + count)
    ]
    for event in events:
        if event["symbol"] is None:
            del event["symbol"]
    response = await server.app.test_client().post("/api/events", json={"events": events})
    assert response.status_code == 202, await response.get_json()
    return await response.get_json()


async def receive_n(client, count, timeout=20.0):
    received = []
    async with asyncio.timeout(timeout):
        while len(received) < count:
            event = await client.recv_event()
            if "seq" in event:
                received.append(event)
    return received


async def test_every_worker_delivers_every_event_once_in_order(redis_prefix, sqlite_url):
    async with workers(2, redis_prefix, sqlite_url) as (a, b):
        async with (
            a.subscribed(["alerts"]) as on_a,
            b.subscribed(["alerts", "all"], ["BTC/USDT"]) as on_b,
            b.subscribed(symbols=["BTC/USDT"]) as on_b_symbol,
        ):
            total = 0
            for batch in range(20):  # through both workers, alternately
                publisher = a if batch % 2 else b
                result = await publish_alerts(publisher, total, 100)
                assert result["accepted"] == 100
                total += 100
            first = await receive_n(on_a, total)
            seqs = [e["seq"] for e in first]
            assert seqs == list(range(seqs[0], seqs[0] + total))  # gap-free, once each
            assert [e["data"]["n"] for e in first] == list(range(total))
            assert [e["seq"] for e in await receive_n(on_b, total)] == seqs
            by_symbol = await receive_n(on_b_symbol, total // 2)
            assert [e["data"]["n"] for e in by_symbol] == list(range(1, total, 2))
            for client in (on_a, on_b, on_b_symbol):
                await client.no_message(0.3)
            assert a.gateway.bus.head == b.gateway.bus.head == seqs[-1]


async def test_resume_on_another_worker_without_gap_or_duplicate(redis_prefix, sqlite_url):
    async with workers(2, redis_prefix, sqlite_url) as (a, b):
        async with a.subscribed(["alerts"]) as client:
            seen = await receive_n_after(client, a, 0, 50)
        last = seen[-1]["seq"]
        await publish_alerts(a, 50, 30)  # missed while away
        async with b.client() as client:
            await client.greeting()
            reply = await client.request("subscribe", {"topics": ["alerts"], "since": last})
            assert reply["data"]["recovered"] is True
            assert reply["data"]["replayed"] == 30
            await publish_alerts(b, 80, 20)  # live after the replay
            resumed = await receive_n(client, 50)
            assert [e["seq"] for e in resumed] == list(range(last + 1, last + 51))
            assert [e["data"]["n"] for e in resumed] == list(range(50, 100))
            await client.no_message(0.3)


async def receive_n_after(client, server, first, count):
    await publish_alerts(server, first, count)
    return await receive_n(client, count)


async def test_resume_ahead_of_a_lagging_worker_skips_what_the_client_has(redis_prefix, sqlite_url):
    async with workers(1, redis_prefix, sqlite_url) as (a,):
        result = await publish_alerts(a, 0, 10)
        async with a.client() as client:
            await client.greeting()
            # A client that saw up to seq 7 elsewhere: it gets 8..10 once, nothing before.
            reply = await client.request(
                "subscribe", {"topics": ["alerts"], "since": result["last_seq"] - 3}
            )
            assert reply["data"]["recovered"] is True
            events = await receive_n(client, 3)
            assert [e["seq"] for e in events] == list(
                range(result["last_seq"] - 2, result["last_seq"] + 1)
            )
            await client.no_message(0.3)


async def test_exactly_one_leader_and_failover(redis_prefix, sqlite_url):
    settings = dict(
        SIMULATION=True,
        LEADER_TTL=1.0,
        MARKET_INTERVAL=0.1,
        ANALYSIS_INTERVAL=5,
        PORTFOLIO_INTERVAL=5,
        STATUS_INTERVAL=5,
        HEALTH_INTERVAL=5,
    )
    url, prefix = redis_prefix
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            running_gateway(REDIS_URL=url, REDIS_PREFIX=prefix, DATABASE_URL=sqlite_url, **settings)
        )
        second_stack = AsyncExitStack()
        second = await second_stack.enter_async_context(
            running_gateway(REDIS_URL=url, REDIS_PREFIX=prefix, DATABASE_URL=sqlite_url, **settings)
        )
        try:
            async with asyncio.timeout(5):
                while not (first.gateway.is_leader or second.gateway.is_leader):
                    await asyncio.sleep(0.05)
            assert first.gateway.is_leader != second.gateway.is_leader
            leader, follower = (first, second) if first.gateway.is_leader else (second, first)
            async with follower.subscribed(["market"]) as client:
                before = await receive_n(client, 3)
                assert all(e["type"] == "market_update" for e in before)
                # the leader goes away
                if leader is second:
                    await second_stack.aclose()
                else:
                    await stack.aclose()
                async with asyncio.timeout(5):
                    while not follower.gateway.is_leader:
                        await asyncio.sleep(0.05)
                after = await receive_n(client, 3, timeout=10)
                seqs = [e["seq"] for e in before + after]
                assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        finally:
            await second_stack.aclose()


async def test_redis_restart_is_survived_without_repeating_seq(sqlite_url):
    async with own_redis() as redis:
        url = f"redis://127.0.0.1:{redis.port}/0"
        async with running_gateway(REDIS_URL=url, DATABASE_URL=sqlite_url) as server:
            async with server.subscribed(["alerts"]) as client:
                before = await receive_n_after(client, server, 0, 5)
                old_stream = server.gateway.bus.stream_id
                redis.stop()  # it keeps nothing: the stream and the counter are gone
                notice = await client.next_of("status_change", timeout=10)
                assert notice["data"]["status"] == "degraded"
                response = await server.app.test_client().get("/api/health")
                assert response.status_code == 503
                assert (await response.get_json())["redis_connected"] is False
                failed = await server.app.test_client().post(
                    "/api/events",
                    json={
                        "events": [
                            {"type": "alert", "data": {"level": "info", "message": "not published"}}
                        ]
                    },
                )
                assert failed.status_code == 503
                assert (await failed.get_json())["code"] == "BUS_UNAVAILABLE"
                await redis.start()
                notice = await client.next_of("status_change", timeout=15)
                assert notice["data"]["status"] == "running"
                # The new stream settles before anyone may publish: refused, with Retry-After.
                settling = await server.app.test_client().post(
                    "/api/events",
                    json={
                        "events": [
                            {"type": "alert", "data": {"level": "info", "message": "too early"}}
                        ]
                    },
                )
                assert settling.status_code == 503
                assert int(settling.headers["Retry-After"]) >= 1
                reset = await client.next_of("stream_reset", timeout=10)
                assert reset["data"]["recovered"] is True
                assert reset["data"]["last_seq"] == before[-1]["seq"]
                assert reset["data"]["stream_id"] not in ("", old_stream)
                assert reset["data"]["stream_id"] == server.gateway.bus.stream_id
                after = await receive_n_after(client, server, 5, 5)
                assert after[0]["seq"] == before[-1]["seq"] + 1  # no seq is used twice
                assert [e["data"]["n"] for e in after] == list(range(5, 10))
                health = await server.app.test_client().get("/api/health")
                assert health.status_code == 200
            # A client that kept its place resumes in the new stream without a gap.
            async with server.client() as again:
                await again.greeting()
                reply = await again.request(
                    "subscribe",
                    {
                        "topics": ["alerts"],
                        "since": before[-1]["seq"],
                        "stream_id": reset["data"]["stream_id"],
                    },
                )
                assert (reply["data"]["recovered"], reply["data"]["replayed"]) == (True, 5)


# -- real Hypercorn processes -------------------------------------------------------------------


def post_alerts(port: int, first: int, count: int) -> None:
    body = json.dumps(
        {
            "events": [
                {"type": "alert", "data": {"level": "info", "message": "m", "n": n}}
                for n in range(first, first + count)
            ]
        }
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/events",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202


async def open_client(port: int, since: int | None = None):
    client = await connect_when_up(port)
    connected = await client.greeting()
    data = {"topics": ["alerts"]}
    if since is not None:
        data["since"] = since
    reply = await client.request("subscribe", data)
    assert reply["type"] == "subscribed"
    return client, connected["data"]["worker"]


async def test_hypercorn_workers_and_hosts_survive_a_killed_worker(redis_prefix, tmp_path):
    url, prefix = redis_prefix
    database = f"sqlite:///{tmp_path}/hosts.db"
    env = {
        "REDIS_URL": url,
        "REDIS_PREFIX": prefix,
        "DATABASE_URL": database,
        "SIMULATION": "false",
        "LOG_LEVEL": "WARNING",
    }
    migrate_with_cli(env)
    ports = [free_port(), free_port()]
    host_a = start_host(ports[0], 2, env)
    host_b = start_host(ports[1], 1, env)
    clients = []
    try:
        on_a = []
        workers_seen = set()
        # Bounded: until both workers of host A serve clients (the second may still be
        # starting while the first takes every connection).
        for _ in range(200):
            client, worker = await open_client(ports[0])
            on_a.append((client, worker))
            workers_seen.add(worker)
            if len(workers_seen) == 2 and len(on_a) >= 6:
                break
            await asyncio.sleep(0.1)
        assert len(workers_seen) == 2, "host A's two workers should both take connections"
        on_b = [(await open_client(ports[1])) for _ in range(2)]
        clients = [c for c, _ in on_a + on_b]

        for batch in range(6):
            await asyncio.to_thread(post_alerts, ports[batch % 2], batch * 50, 50)
        first_seqs = None
        for client in clients:
            events = await receive_n(client, 300)
            seqs = [e["seq"] for e in events]
            assert [e["data"]["n"] for e in events] == list(range(300))
            first_seqs = first_seqs or seqs
            assert seqs == first_seqs == list(range(seqs[0], seqs[0] + 300))
        last_seen = first_seqs[-1]

        # SIGKILL one worker of host A: Hypercorn then stops that whole host, so its clients
        # reconnect to host B and resume from the last seq they saw.
        victim_worker = next(iter(workers_seen))
        os.kill(int(victim_worker.rsplit(":", 1)[1]), signal.SIGKILL)
        # The sibling the master stops is told, and closes its clients with 1001 (not 1006).
        for client, worker in on_a:
            if worker != victim_worker:
                notice = await client.next_of("status_change", timeout=10)
                assert notice["data"]["status"] == "shutting_down"
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await client.next_of("never", timeout=10)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        await asyncio.to_thread(post_alerts, ports[1], 300, 50)  # while they are away
        resumed = []
        for client, _ in on_a:
            with contextlib.suppress(Exception):
                await client.ws.close()
            again, _ = await open_client(ports[1], since=last_seen)
            resumed.append(again)
        await asyncio.to_thread(post_alerts, ports[1], 350, 50)
        for client in resumed + [c for c, _ in on_b]:
            events = await receive_n(client, 100)
            assert [e["seq"] for e in events] == list(range(last_seen + 1, last_seen + 101))
            assert [e["data"]["n"] for e in events] == list(range(300, 400))
            await client.no_message(0.2)
        clients += resumed
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.ws.close()
        stop_host(host_a)
        stop_host(host_b)


async def test_a_deaf_worker_is_reported_unhealthy(redis_prefix, sqlite_url):
    async with workers(2, redis_prefix, sqlite_url, REDIS_DEAF_AFTER=0.5) as (a, b):
        reader = b.gateway.bus._tasks[0]  # stands for a reader stuck in a bad state
        reader.cancel()
        await publish_alerts(a, 0, 3)
        async with asyncio.timeout(10):
            while True:
                response = await b.app.test_client().get("/api/health")
                if response.status_code == 503:
                    break
                await asyncio.sleep(0.2)
        health = await response.get_json()
        assert health["receiving"] is False and health["stream_lag"] == 3
        assert health["reason"] == "not receiving the event stream"
        assert (await a.app.test_client().get("/api/health")).status_code == 200


async def test_replay_on_a_lagging_worker_meets_live_delivery_at_one_seq(redis_prefix, sqlite_url):
    async with workers(2, redis_prefix, sqlite_url) as (a, b):
        result = await publish_alerts(a, 0, 10)
        async with asyncio.timeout(5):
            while b.gateway.bus.head < result["last_seq"]:
                await asyncio.sleep(0.01)
        async with b.client() as client:
            await client.greeting()
            async with reader_paused(b):
                await publish_alerts(a, 10, 10)  # in the stream, not yet read by worker b
                reply = await client.request(
                    "subscribe", {"topics": ["alerts"], "since": result["last_seq"] - 5}
                )
                # History ends at b's head; the ten it has not read come live, once.
                assert (reply["data"]["recovered"], reply["data"]["replayed"]) == (True, 5)
            events = await receive_n(client, 15)
            assert [e["seq"] for e in events] == list(
                range(result["last_seq"] - 4, result["last_seq"] + 11)
            )
            await client.no_message(0.3)


async def test_a_client_ahead_of_a_lagging_worker_gets_nothing_twice(redis_prefix, sqlite_url):
    async with workers(2, redis_prefix, sqlite_url) as (a, b):
        async with b.client() as client:
            await client.greeting()
            async with reader_paused(b):
                result = await publish_alerts(a, 0, 10)
                # Seen up to seq 7 on worker a: b has read none of it yet.
                reply = await client.request(
                    "subscribe", {"topics": ["alerts"], "since": result["last_seq"] - 3}
                )
                assert (reply["data"]["recovered"], reply["data"]["replayed"]) == (True, 0)
            events = await receive_n(client, 3)
            assert [e["seq"] for e in events] == list(
                range(result["last_seq"] - 2, result["last_seq"] + 1)
            )
            await client.no_message(0.3)
            # A position the stream has not reached is not a position of this stream.
            reply = await client.request(
                "subscribe", {"topics": ["alerts"], "since": result["last_seq"] + 100}
            )
            assert reply["data"]["recovered"] is False


async def test_a_resume_ahead_of_the_worker_keeps_the_other_subscriptions_live(
    redis_prefix, sqlite_url
):
    """`since` speaks for the keys of its subscribe only: live events of the topics the
    connection already had are still delivered."""
    async with workers(2, redis_prefix, sqlite_url) as (a, b):
        async with b.subscribed(["status"]) as client:
            async with reader_paused(b):
                await a.publish("status_change", {"status": "running", "n": 1})
                result = await publish_alerts(a, 0, 3)
                reply = await client.request(
                    "subscribe", {"topics": ["alerts"], "since": result["last_seq"]}
                )
                assert reply["data"]["recovered"] is True
            status = await client.next_of("status_change", timeout=10)
            assert status["data"]["n"] == 1


async def test_a_lease_names_its_role_when_won_and_lost(redis_prefix, caplog):
    """The archivist's lease says it is the archivist's, not the producers' leader's."""
    from app.services.leader import LeaderLease
    from app.services.redis_client import RedisTarget

    url, prefix = redis_prefix
    lease = LeaderLease(RedisTarget(url), f"{prefix}:archivist", 3.0, role="archivist")
    elected = asyncio.Event()

    async def won() -> None:
        elected.set()

    async def lost() -> None:
        pass

    caplog.set_level(logging.INFO, logger="app.services.leader")
    holding = asyncio.create_task(lease.run(won, lost))
    await asyncio.wait_for(elected.wait(), 5)
    holding.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await holding
    assert f"holds the archivist lease ({prefix}:archivist)" in caplog.text
    assert "producers" not in caplog.text


async def test_a_producer_whose_bus_is_away_logs_one_line_without_a_traceback(caplog):
    """During a Redis outage every tick of every producer fails to publish: one WARNING per
    outage, no traceback, and one INFO when it publishes again."""
    from app.services.redis_bus import BusUnavailable
    from app.services.simulation import _periodic

    failures = 5
    ticks = 0

    async def publish() -> None:
        nonlocal ticks
        ticks += 1
        if ticks <= failures:
            raise BusUnavailable("Redis: Connection refused")

    stopping = asyncio.Event()
    caplog.set_level(logging.INFO, logger="app.services.simulation")
    loop = asyncio.create_task(_periodic(0.01, publish, "market", stopping)())
    async with asyncio.timeout(5):
        while ticks <= failures + 1:
            await asyncio.sleep(0.01)
    stopping.set()
    await loop
    assert [record.levelname for record in caplog.records] == ["WARNING", "INFO"]
    assert "market producer paused: Redis: Connection refused" in caplog.messages[0]
    assert not any(record.exc_info for record in caplog.records)
