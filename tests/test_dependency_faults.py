"""Riding through the faults of the services the gateway depends on, against real processes: a
PostgreSQL of the test's own stopped with `-m immediate` and started again, a Redis under
Sentinel and a Redis Cluster whose master is SIGKILLed, a Redis that comes back empty. Under
load: a publisher with Idempotency-Keys and clients that drop and resume, each judged on what
it lost, got twice, out of order or under a reused seq, and whether a loss was told."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import IO, Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import websockets
from sigmax_client import RequestError, SigmaxPublisher

from app.services import store
from app.services.auth import hash_key, new_key
from app.services.database import migrate, standalone_connection
from tests.dependencies import own_cluster, own_postgres, own_sentinel
from tests.helpers import (
    REPOSITORY,
    metric_families,
    metric_value,
    own_redis,
    running_gateway,
)
from tests.standins.control import standin
from tests.verdicts import Ledger, Publisher, assert_none, drain, hosts, judge, session, totals

pytestmark = pytest.mark.timeout(240)


async def stored_key(url: str, scopes: str) -> tuple[str, str]:
    """A key created as `python -m app keys create` does: (the key, its id)."""
    key, key_id = new_key(), uuid.uuid4().hex[:12]
    async with standalone_connection(url) as connection:
        await store.insert_api_key(connection, key_id, hash_key(key), scopes, "test", time.time())
    return key, key_id


class Churn:
    """Clients that connect (to any of `ports`), resume and drop every 0.3-1 s; every
    connection the gateway refuses is counted, with the longest time no attempt got through."""

    def __init__(self, ports: list[int], api_key: str | None, count: int) -> None:
        self.ports, self.api_key = ports, api_key
        self.ledgers = [Ledger(f"churn{i}") for i in range(count)]
        self.refused = 0
        self.connects = 0
        self.longest_refusal = 0.0
        self._refused_since: float | None = None

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._client(ledger, stop) for ledger in self.ledgers))

    async def _client(self, ledger: Ledger, stop: asyncio.Event) -> None:
        rng = random.Random(ledger.name)
        while not stop.is_set():
            until = time.monotonic() + rng.uniform(0.3, 1.0)
            try:
                await session(rng.choice(self.ports), ledger, until, api_key=self.api_key)
            except (OSError, KeyError, websockets.WebSocketException, TimeoutError):
                self.refused += 1
                self._refused_since = self._refused_since or time.monotonic()
                await asyncio.sleep(0.1)
                continue
            self.connects += 1
            if self._refused_since is not None:
                self.longest_refusal = max(
                    self.longest_refusal, time.monotonic() - self._refused_since
                )
                self._refused_since = None


async def get(http: aiohttp.ClientSession, url: str, **options: Any) -> tuple[int, Any, Any]:
    async with http.request(options.pop("method", "GET"), url, **options) as response:
        body = await response.read()
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = body.decode()
        return response.status, parsed, response.headers


async def test_a_database_outage_locks_no_client_out(redis_prefix, tmp_path):
    """PostgreSQL stops (-m immediate) for 8 s under load on a host of 2 workers on Redis, with
    keys stored in the database: clients go on connecting, subscribing and resuming with the
    keys as last read, ingest goes on, reads answer 503 DATABASE_UNAVAILABLE with Retry-After,
    readiness says why and liveness stays 200; one WARNING and one INFO per worker, no
    traceback; afterwards the archive has every event and a key revoked meanwhile is refused."""
    redis_url, prefix = redis_prefix
    async with own_postgres() as postgres:
        env = {
            "REDIS_URL": redis_url,
            "REDIS_PREFIX": prefix,
            "LOG_LEVEL": "INFO",
            "API_KEY_REFRESH_INTERVAL": "1",
        }
        await migrate(postgres.url)
        key, _ = await stored_key(postgres.url, "read+trade+publish")
        doomed_key, doomed_id = await stored_key(postgres.url, "read")
        log_path = tmp_path / "host.log"
        with log_path.open("wb") as log:
            async with (
                hosts(env, postgres.url, 2, log=log) as (port,),
                aiohttp.ClientSession(
                    f"http://127.0.0.1:{port}", headers={"X-API-Key": key}
                ) as http,
            ):
                doomed = Ledger("doomed")
                doomed_session = asyncio.create_task(
                    session(port, doomed, time.monotonic() + 60, api_key=doomed_key)
                )
                publisher = Publisher([port], batch=5, interval=0.05, api_key=key)
                churn = Churn([port], key, 8)
                stop = asyncio.Event()
                running = [
                    asyncio.create_task(publisher.run(stop)),
                    asyncio.create_task(churn.run(stop)),
                ]
                await asyncio.sleep(2)
                assert churn.connects > 0 and publisher.acknowledged

                await postgres.stop_immediate()
                stopped = time.monotonic()
                await asyncio.sleep(2)  # every worker's key refresh has met the outage
                connects_before = churn.connects
                during: dict[str, Any] = {}
                for path in ("/api/proposals", "/api/trades", "/api/events?since=0"):
                    during[path] = await get(http, path)
                during["pause"] = await get(http, "/api/pause", method="POST")
                during["others"] = [
                    (await get(http, path))[0] for path in ("/api/status", "/api/portfolio")
                ]
                during["ready"] = [await get(http, "/api/health") for _ in range(6)]
                during["live"] = [await get(http, "/api/health/live") for _ in range(6)]
                during["metrics"] = metric_families((await get(http, "/metrics"))[1])
                await asyncio.sleep(max(0.0, 8 - (time.monotonic() - stopped)))
                during["connects"] = churn.connects - connects_before

                await postgres.start()
                restarted = time.monotonic()
                async with standalone_connection(postgres.url) as connection:
                    assert await store.revoke_api_key(connection, doomed_id, time.time())
                ready_after = None
                async with asyncio.timeout(20):
                    streak = 0
                    while streak < 6:  # both workers, most likely, several times over
                        status, _, _ = await get(http, "/api/health")
                        streak = streak + 1 if status == 200 else 0
                        ready_after = ready_after or (status == 200 and time.monotonic())
                        await asyncio.sleep(0.05)
                with pytest.raises(websockets.ConnectionClosedError) as closed:
                    await asyncio.wait_for(doomed_session, 10)  # its key was revoked
                assert closed.value.rcvd.code == 1008
                with pytest.raises((KeyError, websockets.WebSocketException)):
                    await session(port, Ledger("again"), time.monotonic() + 2, api_key=doomed_key)
                await asyncio.sleep(2)
                stop.set()
                await asyncio.gather(*running)
                await asyncio.gather(
                    *(
                        drain([port], ledger, publisher.last_seq, api_key=key)
                        for ledger in churn.ledgers
                    )
                )
                async with asyncio.timeout(20):  # the archive catches up
                    while True:
                        status, lines, _ = await get(http, "/api/events?topic=alerts&limit=100000")
                        archived = {json.loads(line)["seq"] for line in lines.splitlines() if line}
                        if status == 200 and set(publisher.acknowledged) <= archived:
                            break
                        await asyncio.sleep(0.5)
    print(
        f"\noutage 8 s: {during['connects']} connects during it, {churn.refused} refused "
        f"(longest {churn.longest_refusal:.2f} s), ready again "
        f"{ready_after - restarted:.2f} s after PostgreSQL accepted connections, "
        f"longest publish {publisher.longest_wait:.2f} s"
    )
    for path in ("/api/proposals", "/api/trades", "/api/events?since=0", "pause"):
        status, body, headers = during[path]
        assert (status, body["code"]) == (503, "DATABASE_UNAVAILABLE"), (path, body)
        assert int(headers["Retry-After"]) >= 1
    for status, body, _ in during["ready"]:
        assert status == 503 and "database unreachable" in body["reason"], body
        assert body["database_available"] is False and body["api_keys_age_seconds"] >= 1
    assert all(status == 200 for status, _, _ in during["live"])
    assert all(status in (200, 503) for status in during["others"]), during["others"]
    assert metric_value(during["metrics"], "sigmax_database_up", backend="postgresql") == 0
    assert during["connects"] > 20 and churn.refused == 0
    assert doomed.resumes == 0 and doomed.position is not None

    verdicts = judge(churn.ledgers, publisher)
    assert publisher.reused == []
    assert_none(verdicts, "lost", "duplicated", "reordered", "seq_reused", "told")
    text = log_path.read_text()
    went = re.findall(
        r"\[(\d+)\] WARNING app\.services\.database: the database is unreachable", text
    )
    back = re.findall(
        r"\[(\d+)\] INFO app\.services\.database: the database is reachable again", text
    )
    assert 1 <= len(went) <= 2 and len(set(went)) == len(went), went
    assert sorted(went) == sorted(back)
    assert "Traceback" not in text


async def failover_under_load(
    env: dict[str, str],
    database: str,
    fail: Callable[[], Awaitable[float]],
    log: IO[bytes],
) -> dict[str, Any]:
    """Two hosts (2 + 1 workers) on the Redis of `env`, 6 clients that stay and 10 that drop
    and resume on any worker, a publisher of 5 events every 20 ms with an Idempotency-Key per
    batch; `fail` breaks Redis after 2 s and returns once it is whole again (its duration).
    Publishing goes on for 300 events more. Returns the verdicts and what was measured."""
    async with hosts(env, database, 2, 1, log=log) as ports:
        publisher = Publisher(ports, batch=5, interval=0.02)
        stop = asyncio.Event()
        staying = [Ledger(f"stay{i}") for i in range(6)]
        end = time.monotonic() + 120  # cancelled below
        listening = [
            asyncio.create_task(session(ports[i % 2], ledger, end))
            for i, ledger in enumerate(staying)
        ]
        churn = Churn(ports, None, 10)
        running = [
            asyncio.create_task(publisher.run(stop)),
            asyncio.create_task(churn.run(stop)),
        ]
        await asyncio.sleep(2)
        acknowledged_before = len(publisher.acknowledged)
        failover = await fail()
        async with asyncio.timeout(30):  # publishing goes on: 300 events more
            while len(publisher.acknowledged) < acknowledged_before + 300:
                await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*running)
        ledgers = churn.ledgers + staying
        await asyncio.gather(
            *(drain(ports, ledger, publisher.last_seq) for ledger in churn.ledgers)
        )
        async with asyncio.timeout(30):
            while not all((ledger.position or 0) >= publisher.last_seq for ledger in staying):
                await asyncio.sleep(0.1)
        for task in listening:
            task.cancel()
        await asyncio.gather(*listening, return_exceptions=True)
    verdicts = judge(ledgers, publisher)
    lost = totals(verdicts, "lost")["lost"]
    told = sum(1 for v in verdicts if v["told"])
    print(
        f"failover {failover:.2f} s; longest publish (retries included) "
        f"{publisher.longest_wait:.2f} s; {churn.connects} connects, {churn.refused} refused; "
        f"{lost} deliveries lost over {sum(1 for v in verdicts if v['lost'])} clients, "
        f"{told} clients told of a loss"
    )
    assert acknowledged_before > 50
    assert publisher.reused == []
    assert churn.refused == 0
    assert_none(verdicts, "duplicated", "reordered", "seq_reused", "silent_loss")
    return {"verdicts": verdicts, "publisher": publisher, "failover": failover}


async def test_every_worker_follows_a_master_promoted_by_sentinel(tmp_path):
    """The Sentinels' master is SIGKILLed under load: a replica is promoted and every worker
    follows it without a restart; no seq is given twice, nothing is delivered twice or out of
    order, and whatever the promoted replica lacked is told to the clients that miss it."""
    async with own_sentinel() as redis:
        env = {"REDIS_SENTINELS": redis.sentinels, "REDIS_SENTINEL_MASTER": redis.master_name}

        async def fail() -> float:
            killed = time.monotonic()
            old = await redis.kill_master()
            await redis.wait_for_new_master(old)
            return time.monotonic() - killed

        with (tmp_path / "hosts.log").open("wb") as log:
            await failover_under_load(env, f"sqlite:///{tmp_path}/sentinel.db", fail, log)


async def test_a_redis_cluster_fails_over_the_deployments_slot(tmp_path):
    """The deployment's keys share one slot ({sigmax}); its master is SIGKILLed under load and
    the cluster promotes its replica: as with Sentinel, every worker goes on."""
    async with own_cluster() as redis:
        env = {"REDIS_URL": redis.url, "REDIS_CLUSTER": "true"}

        async def fail() -> float:
            killed = time.monotonic()
            old = await redis.kill_master_of("{sigmax}:events")
            await redis.wait_for_new_master_of("{sigmax}:events", old)
            return time.monotonic() - killed

        with (tmp_path / "hosts.log").open("wb") as log:
            await failover_under_load(env, f"sqlite:///{tmp_path}/cluster.db", fail, log)


async def worker_pids(port: int, count: int) -> list[int]:
    """The pids of the `count` workers serving `port` (asked until each has answered)."""
    pids: set[int] = set()
    # A connection per request: a kept-alive one would ask the same worker every time.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http, asyncio.timeout(20):
        while len(pids) < count:
            _, health, _ = await get(http, f"http://127.0.0.1:{port}/api/health")
            pids.add(int(health["worker"].rsplit(":", 1)[1]))
            await asyncio.sleep(0.01)
    return sorted(pids)


def signal_all(pids: list[int], number: signal.Signals) -> None:
    for pid in pids:
        os.kill(pid, number)


async def test_a_redis_behind_what_workers_saw_reuses_no_seq_and_tells_the_loss(tmp_path):
    """What a promoted replica that lags does, made certain: Redis is SIGKILLed and restarts
    from a snapshot taken 1.5 s earlier (the same stream id, its counter and stream behind what
    the workers saw and gave). One worker was stopped (SIGSTOP) since the snapshot, so it never
    read the events after it; it runs again first, and publishes from what it saw, before the
    other workers run again half a second later. No seq is given twice; that worker's clients
    are told what they missed (stream_reset, recovered: false); the others miss nothing."""
    async with own_redis(tmp_path) as redis:
        env = {"REDIS_URL": f"redis://127.0.0.1:{redis.port}/0", "LOG_LEVEL": "INFO"}
        with (tmp_path / "hosts.log").open("wb") as log:
            async with hosts(env, f"sqlite:///{tmp_path}/snapshot.db", 2, 1, log=log) as ports:
                (lagging,) = await worker_pids(ports[1], 1)
                others = await worker_pids(ports[0], 2)
                publisher = Publisher(ports, batch=5, interval=0.02)
                to_others, to_lagging = publisher.clients
                publisher.clients = [to_others]
                stop = asyncio.Event()
                kept = [Ledger(f"kept{i}") for i in range(4)]
                behind = [Ledger(f"behind{i}") for i in range(4)]
                end = time.monotonic() + 120  # cancelled below
                listening = [
                    asyncio.create_task(session(ports[0], ledger, end)) for ledger in kept
                ] + [asyncio.create_task(session(ports[1], ledger, end)) for ledger in behind]
                async with asyncio.timeout(10):
                    while not all(ledger.stream_id for ledger in kept + behind):
                        await asyncio.sleep(0.05)
                publishing = asyncio.create_task(publisher.run(stop))
                await asyncio.sleep(1.5)
                client = aioredis.from_url(f"redis://127.0.0.1:{redis.port}/0")
                await client.save()
                await client.aclose()
                os.kill(lagging, signal.SIGSTOP)
                saved_through = publisher.last_seq
                await asyncio.sleep(1.5)
                # The next publish waits in the stopped worker's socket: it is the first thing
                # that worker does when it runs again.
                publisher.clients = [to_lagging]
                await asyncio.sleep(0.3)
                signal_all(others, signal.SIGSTOP)
                redis.kill()
                lost_through = publisher.last_seq
                await redis.start()
                os.kill(lagging, signal.SIGCONT)
                await asyncio.sleep(0.5)
                signal_all(others, signal.SIGCONT)
                publisher.clients = [to_others, to_lagging]
                async with asyncio.timeout(30):  # publishing goes on: 200 events more
                    while publisher.last_seq < lost_through + 200:
                        await asyncio.sleep(0.1)
                stop.set()
                await publishing
                async with asyncio.timeout(30):
                    while not all(
                        (ledger.position or 0) >= publisher.last_seq for ledger in kept + behind
                    ):
                        await asyncio.sleep(0.1)
                for task in listening:
                    task.cancel()
                await asyncio.gather(*listening, return_exceptions=True)
    verdicts = judge(kept + behind, publisher)
    print(f"snapshot through about seq {saved_through}; acknowledged through {lost_through}")
    assert lost_through > saved_through + 20
    assert publisher.reused == []
    assert_none(verdicts, "duplicated", "reordered", "seq_reused", "silent_loss")
    assert_none(verdicts[: len(kept)], "lost", "told")
    for verdict in verdicts[len(kept) :]:
        assert verdict["lost"] > 0 and verdict["told"], verdict


async def test_an_idempotency_key_outlives_redis_losing_its_data(tmp_path):
    """A batch published with an Idempotency-Key, then Redis restarted empty: a retry inside
    the window answers the first result (repeated, the same seqs) and publishes nothing; the
    key with another batch is still refused. Likewise across a restart of an in-memory
    gateway."""
    batch = [{"type": "alert", "data": {"level": "info", "message": "m", "n": n}} for n in range(3)]
    other = batch[:1]
    async with own_redis() as redis:
        settings = {"REDIS_URL": f"redis://127.0.0.1:{redis.port}/0"}
        async with running_gateway(**settings) as server:
            publisher = SigmaxPublisher(f"http://127.0.0.1:{server.port}", attempts=80)
            first = await publisher.publish(batch, idempotency_key="k-1")
            await asyncio.sleep(1)  # the key is written to the database (every 0.5 s)
            redis.stop()
            await redis.start()
            async with server.subscribed(["alerts"]) as client:
                again = await publisher.publish(batch, idempotency_key="k-1")
                with pytest.raises(RequestError) as refused:
                    await publisher.publish(other, idempotency_key="k-1")
                fresh = await publisher.publish(other, idempotency_key="k-2")
                received = [
                    (await client.next_of("alert", timeout=10))["data"]["n"] for _ in range(1)
                ]
                await client.no_message(0.5)
    assert first["repeated"] is False
    assert (again["first_seq"], again["last_seq"], again["repeated"]) == (
        first["first_seq"],
        first["last_seq"],
        True,
    )
    assert refused.value.code == "IDEMPOTENCY_KEY_REUSED"
    assert fresh["repeated"] is False and fresh["first_seq"] > first["last_seq"]
    assert received == [0]  # only the new key's batch was published after the restart

    database = f"sqlite:///{tmp_path}/memory.db"
    await migrate(database)
    async with running_gateway(DATABASE_URL=database) as server:
        publisher = SigmaxPublisher(f"http://127.0.0.1:{server.port}")
        first = await publisher.publish(batch, idempotency_key="k-3")
    async with running_gateway(DATABASE_URL=database) as server:
        publisher = SigmaxPublisher(f"http://127.0.0.1:{server.port}")
        again = await publisher.publish(batch, idempotency_key="k-3")
        assert server.gateway.bus.head == first["last_seq"]  # nothing published again
    assert (again["first_seq"], again["last_seq"], again["repeated"]) == (
        first["first_seq"],
        first["last_seq"],
        True,
    )


async def test_liveness_holds_through_a_redis_outage_while_readiness_says_why(tmp_path):
    """Redis goes away: readiness (GET /api/health) answers 503 naming Redis, liveness
    (GET /api/health/live) stays 200; both are 200 again once Redis is back."""
    async with own_redis() as redis:
        async with running_gateway(REDIS_URL=f"redis://127.0.0.1:{redis.port}/0") as server:
            http = server.app.test_client()
            assert (await http.get("/api/health")).status_code == 200
            redis.stop()
            async with asyncio.timeout(10):
                while (ready := await http.get("/api/health")).status_code == 200:
                    await asyncio.sleep(0.1)
            live = await http.get("/api/health/live")
            down = await ready.get_json()
            await redis.start()
            async with asyncio.timeout(15):
                while (await http.get("/api/health")).status_code != 200:
                    await asyncio.sleep(0.1)
            assert (await http.get("/api/health/live")).status_code == 200
    assert ready.status_code == 503 and "Redis unavailable" in down["reason"], down
    assert down["redis_connected"] is False and down["redis_mode"] == "standalone"
    assert live.status_code == 200 and (await live.get_json())["status"] == "ok"


def test_a_starting_worker_exports_no_health_gauge_until_it_knows():
    """prometheus_client writes 0 for an unlabelled gauge when it is made: a worker that has
    not yet looked at Redis, the database or the engine would report them unreachable. In a
    fresh process with the multiprocess directory, the health gauges have no sample at all."""
    probe = (
        "from app.services import metrics\n"
        "body, _ = metrics.exposition(None)\n"
        "print(body.decode())\n"
    )
    with tempfile.TemporaryDirectory() as folder:
        shown = subprocess.run(
            [sys.executable, "-c", probe],
            cwd=REPOSITORY,
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": folder},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    samples = {line.split("{")[0].split(" ")[0] for line in shown.splitlines() if line[:1] != "#"}
    assert "sigmax_ws_connections" in samples  # 0 is true of a new worker's connections
    for gauge in (
        "sigmax_redis_connected",
        "sigmax_database_up",
        "sigmax_engine_reachable",
        "sigmax_worker_receiving",
    ):
        assert gauge not in samples, shown


async def test_stored_keys_outlive_a_database_outage_for_their_cache_age_only(tmp_path):
    """With PostgreSQL stopped, a stored key keeps working for API_KEY_CACHE_MAX_AGE, then is
    refused until the database answers; a key of API_KEYS never depends on it."""
    async with own_postgres() as postgres:
        await migrate(postgres.url)
        stored, _ = await stored_key(postgres.url, "read")
        settings = {
            "DATABASE_URL": postgres.url,
            "API_KEYS": ("env-key:read",),
            "API_KEY_REFRESH_INTERVAL": 0.2,
            "API_KEY_CACHE_MAX_AGE": 2.0,
        }
        async with running_gateway(**settings) as server:
            http = server.app.test_client()

            async def status(key: str) -> int:
                return (await http.get("/api/market", headers={"X-API-Key": key})).status_code

            assert (await status(stored), await status("env-key")) == (200, 200)
            await postgres.stop_immediate()
            await asyncio.sleep(0.5)
            during = (await status(stored), await status("env-key"))
            await asyncio.sleep(2.5)
            stale = (await status(stored), await status("env-key"))
            health = await (await http.get("/api/health")).get_json()
            await postgres.start()
            async with asyncio.timeout(10):
                while await status(stored) != 200:
                    await asyncio.sleep(0.1)
    assert during == (200, 200)
    assert stale == (401, 200)
    assert health["api_keys_age_seconds"] > 2 and health["database_available"] is False


async def test_a_remote_engine_is_reached_through_a_database_outage():
    """With ENGINE_URL, user actions go to the engine (a stand-in process) while PostgreSQL is
    stopped: the WebSocket command and the REST action are carried out; reads of the read
    model answer 503 DATABASE_UNAVAILABLE meanwhile."""
    async with own_postgres() as postgres, standin("tests.standins.engine") as engine:
        await migrate(postgres.url)
        settings = {"DATABASE_URL": postgres.url, "ENGINE_URL": engine.url}
        async with running_gateway(**settings) as server:
            http = server.app.test_client()
            async with server.client() as client:
                await client.greeting()
                await postgres.stop_immediate()
                reply = await client.command("approve_proposal", proposal_id="prop_1")
                paused = await http.post("/api/pause")
                read = await http.get("/api/proposals")
                await postgres.start()
    assert reply["type"] == "command_result", reply
    assert reply["data"]["result"]["proposal"]["proposal_id"] == "prop_1"
    assert paused.status_code == 200, await paused.get_json()
    assert read.status_code == 503
    assert (await read.get_json())["code"] == "DATABASE_UNAVAILABLE"
