"""The fault tests' harness: Hypercorn hosts on one database, a publisher whose every
acknowledged seq is kept, and clients whose deliveries are judged against it: lost, duplicated,
reordered, seq reused, and whether each loss was announced (`recovered: false` or a
`stream_reset` that says so)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import websockets
from sigmax_client import SigmaxPublisher

from tests.helpers import connect_when_up, free_port, migrate_with_cli, start_host, stop_host


@asynccontextmanager
async def hosts(
    env: dict[str, str], database: str, *workers: int, log: IO[bytes] | None = None
) -> AsyncIterator[list[int]]:
    """Hypercorn hosts with `workers` processes each, on one database; yields their ports.
    Their output goes to `log` (default: nowhere)."""
    env = {"SIMULATION": "false", "LOG_LEVEL": "WARNING", **env, "DATABASE_URL": database}
    migrate_with_cli(env)
    ports = [free_port() for _ in workers]
    processes = [
        start_host(port, count, env, log) for port, count in zip(ports, workers, strict=True)
    ]
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

    def __init__(
        self, ports: list[int], batch: int, interval: float, api_key: str | None = None
    ) -> None:
        self.clients = [
            SigmaxPublisher(
                f"http://127.0.0.1:{port}",
                api_key=api_key,
                attempts=60,
                retry_delay=0.05,
                max_retry_delay=0.5,
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


async def session(port: int, ledger: Ledger, until: float, api_key: str | None = None) -> None:
    """Connect, subscribe to alerts resuming from the ledger's position, read until `until`."""
    headers = {"X-API-Key": api_key} if api_key else None
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/api/ws", open_timeout=10, additional_headers=headers
    ) as ws:
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


async def drain(
    ports: list[int],
    ledger: Ledger,
    last_seq: int,
    timeout: float = 30,
    api_key: str | None = None,
) -> None:
    """Resume once more and read until the client has the last acknowledged seq."""
    deadline = time.monotonic() + timeout
    while (ledger.position or 0) < last_seq and time.monotonic() < deadline:
        await session(
            random.choice(ports), ledger, min(deadline, time.monotonic() + 2), api_key=api_key
        )


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


def assert_none(verdicts: list[dict[str, Any]], *keys: str) -> None:
    """No client lost, got twice, ... (each of `keys`) a single event."""
    assert totals(verdicts, *keys) == dict.fromkeys(keys, 0)
