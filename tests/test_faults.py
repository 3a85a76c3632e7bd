"""Delivery guarantees under faults, against real processes: Hypercorn hosts (`hypercorn -w N` with
the repository's config), real Redis (the machine's, or a redis-server of the test's own that is
flushed or restarted empty) and real sockets. Every client's deliveries are judged against what
the publisher was acknowledged: lost, duplicated, reordered, seq reused, and whether each loss was
announced (`recovered: false` or a `stream_reset` that says so)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
import websockets
from sigmax_client import RequestError, SigmaxPublisher

from tests.helpers import (
    connect_when_up,
    free_port,
    migrate_with_cli,
    own_redis,
    start_host,
    stop_host,
)

pytestmark = pytest.mark.timeout(180)


@asynccontextmanager
async def hosts(env: dict[str, str], database: str, *workers: int) -> AsyncIterator[list[int]]:
    """Hypercorn hosts with `workers` processes each, on one database; yields their ports."""
    env = {**env, "DATABASE_URL": database, "SIMULATION": "false", "LOG_LEVEL": "WARNING"}
    migrate_with_cli(env)
    ports = [free_port() for _ in workers]
    processes = [start_host(port, count, env) for port, count in zip(ports, workers, strict=True)]
    try:
        for port in ports:
            await (await connect_when_up(port)).ws.close()
        yield ports
    finally:
        for process in processes:
            stop_host(process)


class Publisher:
    """Publishes numbered alerts through the Python client's helper (an Idempotency-Key per
    batch, retried on 503 and on no answer) and keeps what each acknowledged seq carried."""

    def __init__(self, ports: list[int], batch: int, interval: float) -> None:
        self.clients = [
            SigmaxPublisher(
                f"http://127.0.0.1:{port}", attempts=60, retry_delay=0.05, max_retry_delay=0.5
            )
            for port in ports
        ]
        self.batch, self.interval = batch, interval
        self.acknowledged: dict[int, int] = {}  # seq -> n
        self.reused: list[int] = []  # seqs acknowledged for two different batches
        self.next_n = 0
        self.longest_wait = 0.0  # the longest a batch took to be acknowledged, retries included

    async def run(self, stop: asyncio.Event) -> None:
        turn = 0
        while not stop.is_set():
            first = self.next_n
            self.next_n += self.batch
            started = time.monotonic()
            result = await self.clients[turn % len(self.clients)].publish(
                [
                    {"type": "alert", "data": {"level": "info", "message": "m", "n": n}}
                    for n in range(first, first + self.batch)
                ]
            )
            self.longest_wait = max(self.longest_wait, time.monotonic() - started)
            for offset, seq in enumerate(range(result["first_seq"], result["last_seq"] + 1)):
                if seq in self.acknowledged:
                    self.reused.append(seq)
                self.acknowledged[seq] = first + offset
            turn += 1
            await asyncio.sleep(self.interval)

    @property
    def last_seq(self) -> int:
        return max(self.acknowledged, default=0)


@dataclass
class Ledger:
    """One client's deliveries and what it was told."""

    name: str
    start: int = 0  # the client's position when it first subscribed
    position: int | None = None  # the last seq received: where it resumes
    stream_id: str | None = None
    seqs: list[int] = field(default_factory=list)
    carried: dict[int, int] = field(default_factory=dict)  # seq -> n as received
    duplicated: int = 0
    reordered: int = 0
    told: int = 0  # announcements of a loss
    resumes: int = 0
    resets: int = 0  # stream_reset notices

    def take(self, message: dict[str, Any]) -> None:
        if message["type"] == "stream_reset":
            self.resets += 1
            self.stream_id = message["data"]["stream_id"]
            self.told += message["data"]["recovered"] is False
            return
        seq = message.get("seq")
        if seq is None:
            return
        if seq in self.carried:
            self.duplicated += 1
        elif self.seqs and seq < self.seqs[-1]:
            self.reordered += 1
        self.seqs.append(seq)
        self.carried[seq] = message["data"]["n"]
        self.position = seq if self.position is None else max(self.position, seq)

    def verdict(self, publisher: Publisher) -> dict[str, Any]:
        expected = {seq for seq in publisher.acknowledged if seq > self.start}
        lost = len(expected - set(self.carried))
        wrong = sum(publisher.acknowledged.get(seq) != n for seq, n in self.carried.items())
        return {
            "client": self.name,
            "resumes": self.resumes,
            "resets": self.resets,
            "received": len(self.carried),
            "lost": lost,
            "duplicated": self.duplicated,
            "reordered": self.reordered,
            "seq_reused": wrong,
            "told": self.told,
            "silent_loss": lost if not self.told else 0,
        }


async def session(port: int, ledger: Ledger, until: float) -> None:
    """Connect, subscribe to alerts resuming from the ledger's position, read until `until`."""
    async with websockets.connect(f"ws://127.0.0.1:{port}/api/ws", open_timeout=10) as ws:
        connected = json.loads(await ws.recv())["data"]
        if ledger.position is None:  # from here on, everything (as the Python client does)
            ledger.start = ledger.position = connected["last_seq"]
            ledger.stream_id = connected["stream_id"]
        else:
            ledger.resumes += 1
        data = {"topics": ["alerts"], "since": ledger.position, "stream_id": ledger.stream_id}
        await ws.send(json.dumps({"type": "subscribe", "request_id": "s", "data": data}))
        while (remaining := until - time.monotonic()) > 0:
            try:
                message = json.loads(await asyncio.wait_for(ws.recv(), remaining))
            except TimeoutError:
                break
            if message.get("request_id") == "s":
                ledger.told += message["data"].get("recovered") is False
            elif message["type"] == "ping":
                await ws.send(json.dumps({"type": "pong"}))
            else:
                ledger.take(message)


async def sink(port: int, stop: asyncio.Event) -> None:
    """A subscriber to everything that reads and discards at the socket level: it makes the
    worker fan out (its reader then lags behind the stream, as under real load) at almost no
    cost to the test process."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /api/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    await reader.readuntil(b"\r\n\r\n")
    payload = json.dumps({"type": "subscribe", "data": {"topics": ["all"]}}).encode()
    mask = b"\0\0\0\0"  # a masked client frame; a zero mask leaves the payload as it is
    writer.write(bytes((0x81, 0x80 | len(payload))) + mask + payload)
    try:
        while not stop.is_set() and await reader.read(1 << 16):
            pass
    finally:
        writer.close()


async def drain(ports: list[int], ledger: Ledger, last_seq: int, timeout: float = 30) -> None:
    """Resume once more and read until the client has the last acknowledged seq."""
    deadline = time.monotonic() + timeout
    while (ledger.position or 0) < last_seq and time.monotonic() < deadline:
        await session(random.choice(ports), ledger, min(deadline, time.monotonic() + 2))


def judge(ledgers: list[Ledger], publisher: Publisher) -> list[dict[str, Any]]:
    verdicts = [ledger.verdict(publisher) for ledger in ledgers]
    print(
        f"\n{len(publisher.acknowledged)} events acknowledged, seqs reused by the publisher: "
        f"{len(publisher.reused)}, longest wait for an acknowledgement (retries included): "
        f"{publisher.longest_wait:.2f} s"
    )
    for verdict in verdicts:
        print("  ".join(f"{key}={value}" for key, value in verdict.items()))
    return verdicts


def totals(verdicts: list[dict[str, Any]], *keys: str) -> dict[str, int]:
    return {key: sum(v[key] for v in verdicts) for key in keys}


async def test_a_resume_storm_delivers_every_event_once_in_order(redis_prefix, tmp_path):
    """20 clients close and resume on any worker of two hosts every 0.1-0.6 s while ~700
    events/s are published: replay and live delivery must meet at exactly one seq."""
    url, prefix = redis_prefix
    # History deep enough for the whole run: a loss here can only be the seam's.
    env = {"REDIS_URL": url, "REDIS_PREFIX": prefix, "EVENT_HISTORY_SIZE": "100000"}
    async with hosts(env, f"sqlite:///{tmp_path}/storm.db", 2, 1) as ports:
        stop = asyncio.Event()
        # Load: the workers fan out to many subscribers, so their readers lag behind the stream.
        sinks = [asyncio.create_task(sink(ports[i % 2], stop)) for i in range(300)]
        staying = [Ledger(f"stay{i}") for i in range(10)]
        end = time.monotonic() + 60
        listening = [
            asyncio.create_task(session(ports[i % 2], ledger, end))
            for i, ledger in enumerate(staying)
        ]
        publisher = Publisher(ports, batch=10, interval=0.01)
        publishing = asyncio.create_task(publisher.run(stop))
        ledgers = [Ledger(f"c{i}") for i in range(20)]
        rng = random.Random(20261201)

        async def churn(ledger: Ledger) -> None:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                await session(rng.choice(ports), ledger, time.monotonic() + rng.uniform(0.1, 0.6))

        await asyncio.gather(*(churn(ledger) for ledger in ledgers))
        stop.set()
        await publishing
        await asyncio.gather(*(drain(ports, ledger, publisher.last_seq) for ledger in ledgers))
        async with asyncio.timeout(30):
            while not all((ledger.position or 0) >= publisher.last_seq for ledger in staying):
                await asyncio.sleep(0.1)
        for task in listening + sinks:
            task.cancel()
        await asyncio.gather(*listening, *sinks, return_exceptions=True)
    verdicts = judge(ledgers + staying, publisher)
    assert sum(v["resumes"] for v in verdicts) > 200
    assert len(publisher.acknowledged) > 2000
    assert publisher.reused == []
    assert totals(verdicts, "lost", "duplicated", "reordered", "seq_reused", "told") == {
        "lost": 0,
        "duplicated": 0,
        "reordered": 0,
        "seq_reused": 0,
        "told": 0,
    }


async def test_redis_that_comes_back_empty_never_reuses_a_seq_nor_loses_silently(tmp_path):
    """Clients stay connected to three workers on two hosts while events are published with
    retries; Redis is flushed, then restarted without persistence. No seq is given twice,
    every client gets every acknowledged event once in order or is told what it missed, and
    each can resume in the new stream afterwards."""
    async with own_redis() as redis:
        env = {"REDIS_URL": f"redis://127.0.0.1:{redis.port}/0"}
        async with hosts(env, f"sqlite:///{tmp_path}/empty.db", 2, 1) as ports:
            publisher = Publisher(ports, batch=5, interval=0.05)
            stop = asyncio.Event()
            ledgers = [Ledger(f"c{i}") for i in range(12)]
            end = time.monotonic() + 60  # sessions outlive the faults; cancelled below
            listening = [
                asyncio.create_task(session(ports[i % 2], ledger, end))
                for i, ledger in enumerate(ledgers)
            ]
            async with asyncio.timeout(10):
                while not all(ledger.stream_id for ledger in ledgers):
                    await asyncio.sleep(0.05)
            first_stream = ledgers[0].stream_id
            publishing = asyncio.create_task(publisher.run(stop))
            await asyncio.sleep(1.5)
            client = aioredis.from_url(f"redis://127.0.0.1:{redis.port}/0")
            await client.flushall()
            await client.aclose()
            await asyncio.sleep(5)
            redis.stop()
            await asyncio.sleep(2)
            await redis.start()
            await asyncio.sleep(6)
            stop.set()
            await publishing
            async with asyncio.timeout(30):
                while not all((ledger.position or 0) >= publisher.last_seq for ledger in ledgers):
                    await asyncio.sleep(0.1)
            for task in listening:
                task.cancel()
            await asyncio.gather(*listening, return_exceptions=True)
            # Everyone was told of both new streams, and can resume in the one there now.
            for ledger in ledgers:
                assert ledger.resets == 2 and ledger.stream_id not in (None, first_stream)
                told = ledger.told
                await session(ports[1], ledger, time.monotonic() + 0.5)
                assert ledger.told == told, f"{ledger.name} could not resume in the new stream"
    verdicts = judge(ledgers, publisher)
    assert len(publisher.acknowledged) > 150
    assert publisher.reused == []
    assert totals(verdicts, "duplicated", "reordered", "seq_reused", "silent_loss") == {
        "duplicated": 0,
        "reordered": 0,
        "seq_reused": 0,
        "silent_loss": 0,
    }


class AnswerDroppingProxy:
    """A TCP stand-in for a worker that dies after publishing: the first request is forwarded to
    the gateway and its answer thrown away (the connection closes unanswered); later ones pass
    through."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.dropped = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            upstream.write(head + await reader.readexactly(length))
            answer = await upstream_reader.read()  # urllib asks for Connection: close
            if self.dropped == 0:
                self.dropped += 1
                return  # published, but the publisher never hears of it
            writer.write(answer)
            await writer.drain()
        finally:
            upstream.close()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_a_retried_publish_is_published_once(redis_prefix, tmp_path):
    url, prefix = redis_prefix
    env = {"REDIS_URL": url, "REDIS_PREFIX": prefix}
    async with hosts(env, f"sqlite:///{tmp_path}/retry.db", 1, 1) as ports:
        listener = Ledger("listener")
        listening = asyncio.create_task(session(ports[1], listener, time.monotonic() + 30))
        async with asyncio.timeout(10):
            while listener.stream_id is None:
                await asyncio.sleep(0.05)
        batch = [
            {"type": "alert", "data": {"level": "info", "message": "m", "n": n}} for n in range(3)
        ]
        # The answer is lost: the helper retries with the same key and gets the first result.
        proxy = AnswerDroppingProxy(ports[0])
        async with proxy as proxy_port:
            result = await SigmaxPublisher(f"http://127.0.0.1:{proxy_port}").publish(batch)
        assert proxy.dropped == 1
        assert result["repeated"] is True and result["accepted"] == 3
        # The same key on the other host: the same result again, nothing published.
        again = await SigmaxPublisher(f"http://127.0.0.1:{ports[1]}").publish(
            batch, idempotency_key="batch-1"
        )
        repeat = await SigmaxPublisher(f"http://127.0.0.1:{ports[0]}").publish(
            batch, idempotency_key="batch-1"
        )
        assert (repeat["first_seq"], repeat["last_seq"], repeat["repeated"]) == (
            again["first_seq"],
            again["last_seq"],
            True,
        )
        assert again["repeated"] is False and again["first_seq"] == result["last_seq"] + 1
        with pytest.raises(RequestError) as refused:
            await SigmaxPublisher(f"http://127.0.0.1:{ports[0]}").publish(
                batch[:1], idempotency_key="batch-1"
            )
        assert refused.value.code == "IDEMPOTENCY_KEY_REUSED"
        async with asyncio.timeout(10):
            while (listener.position or 0) < again["last_seq"]:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # anything published twice would arrive meanwhile
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
    assert [listener.carried[seq] for seq in listener.seqs] == [0, 1, 2, 0, 1, 2]
    assert listener.seqs == list(range(result["first_seq"], again["last_seq"] + 1))
