"""Delivery guarantees under faults, against real processes: Hypercorn hosts (`hypercorn -w N` with
the repository's config), real Redis (the machine's, or a redis-server of the test's own that is
flushed or restarted empty) and real sockets. Every client's deliveries are judged against what
the publisher was acknowledged: lost, duplicated, reordered, seq reused, and whether each loss was
announced (`recovered: false` or a `stream_reset` that says so)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest
import redis.asyncio as aioredis
from sigmax_client import RequestError, SigmaxPublisher

from tests.helpers import own_redis
from tests.verdicts import Ledger, Publisher, assert_none, drain, hosts, judge, session, sink

pytestmark = pytest.mark.timeout(180)


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
    assert_none(verdicts, "lost", "duplicated", "reordered", "seq_reused", "told")


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
    assert_none(verdicts, "duplicated", "reordered", "seq_reused", "silent_loss")


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
