"""The event archive: every stream event in the database (SQLite and PostgreSQL), a resume that
reaches past the hot history (and across a restart of the gateway or of Redis) with no gap and
no duplicate at either seam, and the NDJSON export."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import tracemalloc
import urllib.request
from typing import Any

from app.services.archive import EventFilter
from app.services.database import migrate
from app.services.events import Event
from tests.helpers import own_redis, running_gateway

SMALL_HISTORY = dict(EVENT_HISTORY_SIZE=20)


async def publish_alerts(server, first: int, count: int, batch: int = 1) -> None:
    for start in range(first, first + count, batch):
        await server.gateway.bus.publish(
            [
                Event("alert", {"level": "info", "message": "m", "n": n})
                for n in range(start, min(start + batch, first + count))
            ]
        )


async def archived_through(server, seq: int, timeout: float = 10) -> None:
    """Until the archive holds every event up to `seq`."""
    async with asyncio.timeout(timeout):
        while await server.gateway.archive.head() < seq:
            await asyncio.sleep(0.05)


async def receive_seqs(client, count: int, timeout: float = 10) -> list[int]:
    seqs = []
    async with asyncio.timeout(timeout):
        while len(seqs) < count:
            message = await client.recv_event(timeout)
            if "seq" in message:
                seqs.append(message["seq"])
    return seqs


async def test_every_event_is_archived_once_with_its_routing(database_url):
    async with running_gateway(DATABASE_URL=database_url) as server:
        await server.publish("market_update", [{"symbol": "BTC/USDT", "price": 1.5}])
        await server.publish("alert", {"level": "warning", "message": "m"}, symbol="ETH/USDT")
        await archived_through(server, 2)
        events = await server.gateway.archive.read(EventFilter())
        assert [(e.seq, e.type, e.topic, e.symbol, e.symbols) for e in events] == [
            (1, "market_update", "market", None, ("BTC/USDT",)),
            (2, "alert", "alerts", "ETH/USDT", ("ETH/USDT",)),
        ]
        assert json.loads(events[0].frame) == {
            "type": "market_update",
            "data": [{"symbol": "BTC/USDT", "price": 1.5}],
            "timestamp": events[0].timestamp,
            "connection_id": None,
            "seq": 1,
        }
    # A restarted gateway numbers on after the archive: a seq names one event for good.
    async with running_gateway(DATABASE_URL=database_url) as server:
        assert server.gateway.bus.head == 2
        await server.publish("alert", {"level": "info", "message": "after"})
        await archived_through(server, 3)
        async with server.gateway.db.connection() as connection:
            rows = await connection.fetch_all("SELECT seq, stream_id FROM events ORDER BY seq")
        assert [row["seq"] for row in rows] == [1, 2, 3]
        assert rows[2]["stream_id"] == server.gateway.bus.stream_id != rows[0]["stream_id"]


async def test_retention_drops_the_oldest_by_age_and_by_count(database_url):
    async with running_gateway(
        DATABASE_URL=database_url, EVENT_ARCHIVE_MAX_AGE=0.5, EVENT_ARCHIVE_MAX_EVENTS=4
    ) as server:
        archive = server.gateway.archive
        await publish_alerts(server, 0, 3)
        await archived_through(server, 3)
        await asyncio.sleep(0.6)  # older than the age now
        await publish_alerts(server, 3, 6)
        await archived_through(server, 9)
        await archive.prune()
        # 1-3 by age; of 4-9, the newest 4 are kept.
        assert [e.seq for e in await archive.read(EventFilter())] == [6, 7, 8, 9]


async def subscribe_since(client, since: int, stream_id: str | None = None) -> dict[str, Any]:
    await client.greeting()
    data: dict[str, Any] = {"topics": ["alerts"], "since": since}
    if stream_id is not None:
        data["stream_id"] = stream_id
    reply = await client.request("subscribe", data)
    assert reply["type"] == "subscribed", reply
    return reply["data"]


async def resume_while_publishing(publisher, resumes) -> None:
    """Each (since, server) of `resumes` in turn, while `publisher` publishes 200 alerts/s after
    the first 200: each resume is recovered and its seqs run on from `since`, archive, hot
    history and live alike, each once."""
    stop = asyncio.Event()

    async def publish_meanwhile() -> None:  # bounded: until the resumes are done, 30 s at most
        deadline = time.monotonic() + 30
        n = 200
        while not stop.is_set() and time.monotonic() < deadline:
            await publish_alerts(publisher, n, 10, batch=10)
            n += 10
            await asyncio.sleep(0.05)

    publishing = asyncio.create_task(publish_meanwhile())
    try:
        for since, server in resumes:
            # (close_timeout: a client that stopped reading a flowing stream closes at once)
            async with server.client(close_timeout=0.2) as client:
                reply = await subscribe_since(client, since)
                assert reply["recovered"] is True
                seqs = await receive_seqs(client, reply["replayed"] + 20)
                assert seqs == list(range(since + 1, since + 1 + len(seqs)))
                assert reply["replayed"] >= 200 - since  # the archive's part at least
    finally:
        stop.set()
        await publishing


async def test_resume_runs_from_the_archive_through_the_hot_history_into_live(gateway_factory):
    async with gateway_factory(**SMALL_HISTORY) as server:
        await publish_alerts(server, 0, 200, batch=10)
        await archived_through(server, 200)
        await resume_while_publishing(server, [(since, server) for since in (10, 60, 120, 190)])


async def test_resume_across_a_restart_of_the_gateway(tmp_path):
    url = f"sqlite:///{tmp_path}/gateway.db"
    await migrate(url)
    async with running_gateway(DATABASE_URL=url, **SMALL_HISTORY) as server:
        old_stream = server.gateway.bus.stream_id
        await publish_alerts(server, 0, 30)
    # What was not archived yet is written as the gateway stops.
    async with running_gateway(DATABASE_URL=url, **SMALL_HISTORY) as server:
        assert server.gateway.bus.stream_id != old_stream
        await publish_alerts(server, 30, 5)
        async with server.client() as client:
            reply = await subscribe_since(client, 10, old_stream)
            assert (reply["recovered"], reply["replayed"]) == (True, 25)
            assert await receive_seqs(client, 25) == list(range(11, 36))
        # A position of a stream the archive does not know is not resumed.
        async with server.client() as client:
            reply = await subscribe_since(client, 10, "another-stream")
            assert (reply["recovered"], reply["replayed"]) == (False, 0)


async def test_resume_after_redis_lost_its_data(tmp_path):
    url = f"sqlite:///{tmp_path}/gateway.db"
    await migrate(url)
    async with own_redis() as redis:
        redis_url = f"redis://127.0.0.1:{redis.port}/0"
        async with running_gateway(
            REDIS_URL=redis_url, DATABASE_URL=url, LEADER_TTL=1.0, **SMALL_HISTORY
        ) as server:
            async with server.subscribed(["alerts"]) as watcher:
                await publish_alerts(server, 0, 30)
                assert await receive_seqs(watcher, 30) == list(range(1, 31))
                await archived_through(server, 30)
                old_stream = server.gateway.bus.stream_id
                redis.stop()  # it keeps nothing: the stream, the counter and the leases are gone
                await redis.start()
                reset = await watcher.next_of("stream_reset", timeout=15)
                assert reset["data"]["last_seq"] == 30
            await publish_alerts(server, 30, 5)
            await archived_through(server, 35, timeout=15)
            async with server.client() as client:
                reply = await subscribe_since(client, 5, old_stream)
                assert (reply["recovered"], reply["replayed"]) == (True, 30)
                assert await receive_seqs(client, 30) == list(range(6, 36))


def read_export(port: int, query: str) -> tuple[str, list[dict[str, Any]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/events?{query}", timeout=10) as r:
        return r.headers["Content-Type"], [json.loads(line) for line in r.read().splitlines()]


async def test_export_streams_ndjson_filtered_by_position_topic_and_symbol(server):
    await server.publish("market_update", [{"symbol": "BTC/USDT", "price": 1.0}])
    await asyncio.sleep(0.01)  # a timestamp of its own for each event
    await server.publish("alert", {"level": "info", "message": "a"}, symbol="ETH/USDT")
    await asyncio.sleep(0.01)
    await server.publish("alert", {"level": "info", "message": "b"})
    await archived_through(server, 3)
    content_type, lines = await asyncio.to_thread(read_export, server.port, "")
    assert content_type == "application/x-ndjson"
    assert [line["seq"] for line in lines] == [1, 2, 3]
    assert lines[1] == {
        "seq": 2,
        "stream_id": server.gateway.bus.stream_id,
        "type": "alert",
        "topic": "alerts",
        "symbol": "ETH/USDT",
        "timestamp": lines[1]["timestamp"],
        "data": {"level": "info", "message": "a"},
    }
    by_query = {
        "topic=alerts": [2, 3],
        "symbol=btc/usdt": [1],
        "since=1&until=2": [2],
        "topic=market,alerts&limit=2": [1, 2],
        f"since={lines[1]['timestamp']}": [2, 3],
        f"until={lines[0]['timestamp']}": [1],
    }
    for query, seqs in by_query.items():
        _, found = await asyncio.to_thread(read_export, server.port, query)
        assert [line["seq"] for line in found] == seqs, query
    client = server.app.test_client()
    for query, code in (
        ("since=yesterday", "INVALID_POSITION"),
        ("topic=nope", "INVALID_TOPIC"),
        ("symbol=BTCUSDT", "INVALID_SYMBOL"),
        ("limit=0", "VALIDATION_ERROR"),
    ):
        response = await client.get(f"/api/events?{query}")
        assert response.status_code == 400, query
        assert (await response.get_json())["code"] == code, query


async def test_export_needs_the_read_scope():
    async with running_gateway(API_KEYS=("reader:read", "engine:publish")) as server:
        client = server.app.test_client()
        assert (await client.get("/api/events")).status_code == 401
        assert (await client.get("/api/events", headers={"X-API-Key": "engine"})).status_code == 403
        response = await client.get("/api/events", headers={"X-API-Key": "reader"})
        assert response.status_code == 200


def count_export_lines(port: int) -> tuple[int, int]:
    """Lines and bytes of a whole export, read in chunks (nothing kept)."""
    lines = size = 0
    url = f"http://127.0.0.1:{port}/api/events?limit=1000000"
    with urllib.request.urlopen(url, timeout=60) as response:
        while chunk := response.read(65536):
            lines += chunk.count(b"\n")
            size += len(chunk)
    return lines, size


async def test_export_of_100k_events_keeps_memory_bounded(database_url):
    async with running_gateway(DATABASE_URL=database_url) as server:
        for first in range(0, 100_000, 2000):
            await publish_alerts(server, first, 2000, batch=2000)
        await archived_through(server, 100_000, timeout=60)
        tracemalloc.start()
        try:
            result: list[tuple[int, int]] = []
            reader = threading.Thread(target=lambda: result.append(count_export_lines(server.port)))
            reader.start()
            while reader.is_alive():
                await asyncio.sleep(0.05)
            reader.join()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        lines, size = result[0]
        assert lines == 100_000
        # The export is far larger than what the gateway held at once to send it.
        assert size > 8_000_000
        assert peak < size / 4, (peak, size)


# -- replay -------------------------------------------------------------------------------------


async def replay(client, request_id: str = "replay-1", **data: Any) -> list[dict[str, Any]]:
    """Send a replay; every message of it (its events, then replay_complete or error)."""
    await client.send({"type": "replay", "data": data, "request_id": request_id})
    return await replayed(client, request_id)


async def replayed(client, request_id: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(30):
        while True:
            message = await client.recv_event()
            if message.get("request_id") != request_id:
                continue
            messages.append(message)
            if message["type"] in ("replay_complete", "error"):
                return messages


async def test_replay_streams_archived_events_apart_from_live_delivery(server):
    await publish_alerts(server, 0, 10)
    await server.publish("market_update", [{"symbol": "BTC/USDT", "price": 1.0}])
    await server.publish(
        "market_update",
        [{"symbol": "BTC/USDT", "price": 2.0}, {"symbol": "ETH/USDT", "price": 3.0}],
    )
    await archived_through(server, 12)
    archived = {e.seq: e for e in await server.gateway.archive.read(EventFilter())}
    async with server.subscribed(["market"]) as client:
        messages = await replay(client, since=3, until=10, topics=["alerts"])
        *events, complete = messages
        assert [e["seq"] for e in events] == list(range(4, 11))
        for event in events:  # as delivered live, tagged with the replay's request_id
            assert event == {**json.loads(archived[event["seq"]].frame), "request_id": "replay-1"}
        assert complete["type"] == "replay_complete"
        assert complete["data"] == {"count": 7, "last_seq": 10}
        # By symbol: per-symbol lists restricted to the symbols asked for.
        *by_symbol, _ = await replay(client, "replay-2", symbols=["eth/usdt"])
        assert [(e["seq"], e["data"]) for e in by_symbol] == [
            (12, [{"symbol": "ETH/USDT", "price": 3.0}])
        ]
        # The live subscription goes on beside it, untagged.
        await server.publish("market_update", [{"symbol": "SOL/USDT", "price": 4.0}])
        live = await client.next_of("market_update")
        assert live["seq"] == 13 and "request_id" not in live


async def test_replay_refuses_bad_positions_and_a_second_replay(server):
    await publish_alerts(server, 0, 3)
    await archived_through(server, 3)
    async with server.subscribed() as client:
        for data, code in (
            ({"since": "yesterday"}, "INVALID_POSITION"),
            ({"topics": ["nope"]}, "INVALID_TOPIC"),
            ({"symbols": ["BTCUSDT"]}, "INVALID_SYMBOL"),
            ({"speed": -1}, "MESSAGE_PROCESSING_ERROR"),
        ):
            (error,) = await replay(client, **data)
            assert (error["type"], error["data"]["code"]) == ("error", code), data
        # Slowly paced (0.001x): the next one is refused while it runs.
        await client.send({"type": "replay", "data": {"speed": 0.001}, "request_id": "slow"})
        (refused,) = await replay(client, "second")
        assert refused["data"]["code"] == "REPLAY_IN_PROGRESS"


async def test_replay_pacing_follows_the_requested_speed(server):
    for n in range(21):  # 20 gaps of 50 ms: a second of original time
        await publish_alerts(server, n, 1)
        await asyncio.sleep(0.05)
    await archived_through(server, 21)
    archived = await server.gateway.archive.read(EventFilter())
    original = archived[-1].created - archived[0].created
    async with server.subscribed() as client:
        for speed in (2, 0.8):
            await client.send(
                {"type": "replay", "data": {"speed": speed}, "request_id": f"at-{speed}"}
            )
            arrivals = []
            async with asyncio.timeout(10):
                while len(arrivals) < 21:
                    message = await client.recv_event()
                    if message.get("request_id") == f"at-{speed}" and "seq" in message:
                        arrivals.append(time.monotonic())
            taken = arrivals[-1] - arrivals[0]
            assert abs(taken / (original / speed) - 1) < 0.05, (speed, taken, original)
            assert (await client.next_of("replay_complete"))["data"]["count"] == 21


async def test_a_slow_reader_slows_its_replay_instead_of_being_closed(gateway_factory):
    async with gateway_factory(WS_SEND_QUEUE_SIZE=20) as server:
        note = "x" * 4000  # 4,000 events of 4 KB: more than the sockets' buffers hold
        for first in range(0, 4000, 500):
            await server.gateway.bus.publish(
                [
                    Event("alert", {"level": "info", "message": note, "n": n})
                    for n in range(first, first + 500)
                ]
            )
        await archived_through(server, 4000)
        async with server.subscribed() as client:
            await client.send({"type": "replay", "data": {}, "request_id": "all"})
            (conn,) = server.gateway.manager.connections.values()
            deepest = 0
            for _ in range(50):  # 1 s of not reading: the replay waits for room in the queue
                deepest = max(deepest, conn.queue_depth)
                await asyncio.sleep(0.02)
            # Held back, not closed: at most half the queue waiting, and most of the replay
            # still to come (what was sent is in the sockets' buffers and the client's).
            assert not conn.closing and deepest <= 10 and conn.sent < 3000
            seqs = [m["seq"] for m in await replayed(client, "all") if m["type"] == "alert"]
            assert seqs == list(range(1, 4001))


async def test_two_workers_on_redis_archive_once_and_resume_across_the_seams(
    redis_prefix, tmp_path
):
    url, prefix = redis_prefix
    sqlite_url = f"sqlite:///{tmp_path}/gateway.db"
    await migrate(sqlite_url)
    settings = dict(
        REDIS_URL=url, REDIS_PREFIX=prefix, DATABASE_URL=sqlite_url, LEADER_TTL=1.0, **SMALL_HISTORY
    )
    async with running_gateway(**settings) as a, running_gateway(**settings) as b:
        async with asyncio.timeout(10):  # one of them holds the archivist lease
            while not (a.gateway.archive.writing or b.gateway.archive.writing):
                await asyncio.sleep(0.05)
        archivist, other = (a, b) if a.gateway.archive.writing else (b, a)
        assert not other.gateway.archive.writing
        await publish_alerts(archivist, 0, 200, batch=10)
        await archived_through(other, 200)
        await resume_while_publishing(other, [(20, other), (150, archivist)])
        head = archivist.gateway.bus.head
        await archived_through(other, head)
        async with other.gateway.db.connection() as connection:
            rows = await connection.fetch_all("SELECT seq FROM events ORDER BY seq")
        assert [row["seq"] for row in rows] == list(range(1, head + 1))  # each once, no gap
        assert other.gateway.archive.written == 0  # only the archivist wrote


async def test_the_archive_has_no_gap_when_the_archivist_goes_away(redis_prefix, tmp_path):
    url, prefix = redis_prefix
    sqlite_url = f"sqlite:///{tmp_path}/gateway.db"
    await migrate(sqlite_url)
    settings = dict(REDIS_URL=url, REDIS_PREFIX=prefix, DATABASE_URL=sqlite_url, LEADER_TTL=1.0)
    first_stack = contextlib.AsyncExitStack()
    first = await first_stack.enter_async_context(running_gateway(**settings))
    try:
        async with asyncio.timeout(10):
            while not first.gateway.archive.writing:
                await asyncio.sleep(0.05)
        async with running_gateway(**settings) as second:
            assert not second.gateway.archive.writing
            n = 0

            async def publish_some() -> None:
                nonlocal n
                await publish_alerts(second, n, 10, batch=10)
                n += 10
                await asyncio.sleep(0.02)  # about 400 events/s

            for _ in range(20):
                await publish_some()
            # The archivist stops while the stream flows; the second takes the lease over and
            # takes what it did not see itself from the hot history.
            stopping = asyncio.create_task(first_stack.aclose())
            deadline = time.monotonic() + 15  # bounded: the lease runs out within LEADER_TTL
            while not second.gateway.archive.writing and time.monotonic() < deadline:
                await publish_some()
            assert second.gateway.archive.writing
            await stopping
            for _ in range(5):
                await publish_some()
            head = second.gateway.bus.head
            await archived_through(second, head)
            async with second.gateway.db.connection() as connection:
                rows = await connection.fetch_all("SELECT seq FROM events ORDER BY seq")
            assert [row["seq"] for row in rows] == list(range(1, head + 1))
            assert second.gateway.archive.written > 0
    finally:
        await first_stack.aclose()
