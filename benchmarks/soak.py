#!/usr/bin/env python3
"""Soak test: many clients with subscribe churn, reconnects and resume, against a steady event
rate, for a long time. Reports the gateway's memory over time, its event-loop lag, and every
event lost or duplicated. Not a CI test: a 30-minute run is the point.

    .venv/bin/python benchmarks/soak.py                          # 1000 clients, 20 events/s, 30 min
    .venv/bin/python benchmarks/soak.py --minutes 3 --clients 200   # a short check
    .venv/bin/python benchmarks/soak.py --redis                  # through Redis (unique prefix)

It starts the gateway itself (`python -m app migrate`, then `python -m hypercorn --config
file:hypercorn_config.py wsgi:app`, SIMULATION=false, a fresh SQLite file, a free port on
127.0.0.1), pinned to CPU 0 when there are 2 CPUs or more, and runs the clients in a few processes
on the other CPU (raw `websockets` asyncio clients that parse only the fields they check).

- Events: `alert`s round-robin over --symbols symbols SK00/USDT.. (data {k: stream, n: counter
  per stream, t: publish time in ms, level, message}) at --rate per second, and one
  `market_update` with an entry per symbol (each carrying the market counter n) --market-rate
  times per second, through `POST /api/events`.
- Every client holds a core subscription for the whole run: a quarter the topic `alerts` (it
  checks every stream), the others one symbol (its alert stream and its entry of every
  market_update). A counter that skips is a loss; a seq not above the last one seen is a
  duplicate. Churn, spread evenly over time: per --churn-interval, --subscribe-churn of the
  clients subscribe or unsubscribe an extra topic or symbol (alerts, market, all, another
  symbol), sometimes checked with get_subscriptions; --reconnect-churn of them disconnect (half
  abruptly, without a close frame) and come back with subscribe {since: last seq seen,
  stream_id}, after which the core streams must go on with no gap and no duplicate.
- Every --sample-interval s: the gateway worker's RSS, open files and CPU, and from
  GET /api/ws/stats its event-loop lag (polled every second), connections and counters.
- At the end: publishing and churn stop, every client catches up (bounded), and the last counter
  of each stream is checked at every client (a missing tail is a loss too).

Results: benchmarks/results/<timestamp>-soak.{md,csv,png} and the gateway's log in
<timestamp>-soak-logs/. Exit status 1 when an event was lost or duplicated, a resume did not
recover, a subscription set was wrong, or RSS grew more than --max-growth-mb after warm-up.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import http.client
import json
import multiprocessing
import os
import queue
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from typing import Any

import psutil
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import (  # noqa: E402
    BENCH,
    ROOT,
    free_port_pair,
    log,
    machine_busy,
    prepare_gateway,
    stop,
    wait_ready,
)
from scale import redis_call, wait_workers, worker_pids  # noqa: E402

GATEWAY_CPU, CLIENT_CPU = 0, 1
MB = 1024 * 1024

# The frames the clients read without a JSON parser: the gateway renders stream events as
# {"type":...,"data":<data as published>,"timestamp":...,"connection_id":null,"seq":N}.
ALERT_PREFIX = '{"type":"alert","data":{"k":'
MARKET_PREFIX = '{"type":"market_update","data":[{"n":'
PING_PREFIX = '{"type":"ping"'
PONG = '{"type":"pong"}'
LATENCY_BUCKETS_MS = 10_000  # the last bucket holds everything slower
MAX_EXTRAS = 3  # extra subscriptions one client holds at most
CHECK_SHARE = 0.2  # share of subscription changes followed by get_subscriptions
CONNECTS_AT_ONCE = 50  # handshakes in flight per client process
EXAMPLES = 10  # gaps, duplicates and mismatches kept as evidence
SUBSCRIBE_TIMEOUT = 30.0  # seconds for the answer to the core subscribe


def symbol(stream: int) -> str:
    return f"SK{stream:02d}/USDT"


# ================================================================== client processes
COUNTERS = (
    "received",             # stream events (seq above the last seen)
    "core_events",          # events of the client's core alert streams
    "market_events",        # market_update events checked (symbol clients)
    "lost",                 # core alert counters skipped
    "market_lost",          # market counters skipped
    "duplicates",           # stream events whose seq was not above the last seen
    "core_duplicates",      # core counters seen again with a new seq
    "tail_lost",            # core events published but not received by the end
    "market_tail_lost",
    "never_seen",           # core streams a client never got an event of
    "reconnects",           # disconnects the client chose
    "abrupt",               # of which without a close frame
    "server_closes",        # disconnects the client did not choose
    "resumes",              # subscribes with since answered
    "replayed",
    "unrecovered",          # resumes answered recovered: false
    "subscribes",
    "unsubscribes",
    "subscription_checks",
    "subscription_mismatches",
    "connect_failures",
    "subscribe_timeouts",   # core subscribes not answered within SUBSCRIBE_TIMEOUT
    "client_errors",        # exceptions in the client (bugs of this script)
    "parse_fallbacks",      # stream events that did not have the expected layout
)


class ClientProcess:
    """One process's clients, its churn scheduler and its reports to the driver."""

    def __init__(self, number: int, indices: list[int], settings: dict[str, Any],
                 commands: Any, reports: Any) -> None:
        self.number = number
        self.settings = settings
        self.url = settings["url"]
        self.commands = commands
        self.reports = reports
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.errors: dict[str, int] = {}  # error events by code
        self.closes: dict[str, int] = {}  # server closes by code
        self.examples: list[str] = []
        self.latency = [0] * (LATENCY_BUCKETS_MS + 1)
        streams = settings["symbols"]
        self.extra_keys = ["alerts", "market", "all"] + [
            "symbol:" + symbol(k) for k in range(streams)]
        topic_every = settings["topic_every"]
        self.clients = [SoakClient(self, i, streams, topic_every > 0 and i % topic_every == 0)
                        for i in indices]
        self.churning = asyncio.Event()  # set by the driver once every client is subscribed
        self.quiesced = False
        self.stopping = False
        self.connect_slots = asyncio.Semaphore(CONNECTS_AT_ONCE)
        self.background: set[asyncio.Task[Any]] = set()

    def example(self, text: str) -> None:
        if len(self.examples) < EXAMPLES:
            self.examples.append(f"{time.strftime('%H:%M:%S')} {text}")

    def count_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def snapshot(self) -> dict[str, Any]:
        return {**self.counts, "live": sum(c.live for c in self.clients),
                "errors": dict(self.errors), "closes": dict(self.closes),
                "examples": list(self.examples)}

    async def run(self) -> None:
        tasks = [asyncio.create_task(c.run()) for c in self.clients]
        tasks += [asyncio.create_task(self.churn()), asyncio.create_task(self.report())]
        try:
            await self.obey()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def obey(self) -> None:
        """The driver's commands: churn (start), quiesce (stop churning), final (check the
        tails), stop."""
        loop = asyncio.get_running_loop()
        parent = os.getppid()
        while True:
            try:
                command, argument = await loop.run_in_executor(None, self.commands.get, True, 1.0)
            except queue.Empty:
                if os.getppid() != parent:  # the driver is gone: do not linger
                    command, argument = "stop", None
                else:
                    continue
            if command == "churn":
                self.churning.set()
            elif command == "quiesce":
                self.quiesced = True
            elif command == "final":
                self.reports.put(("final", self.number, await self.final(argument)))
            elif command == "stop":
                self.stopping = True
                closing = [asyncio.create_task(c.ws.close())
                           for c in self.clients if c.ws is not None]
                if closing:
                    await asyncio.wait(closing, timeout=15)
                return

    async def report(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.reports.put(("progress", self.number, self.snapshot()))
            now = time.monotonic()
            for c in self.clients:
                if (c.ws is not None and not c.live and not c.leaving
                        and now - c.subscribed_at > SUBSCRIBE_TIMEOUT):
                    self.counts["subscribe_timeouts"] += 1
                    self.example(f"client {c.index}: no answer to its subscribe "
                                 f"(since {c.last_seq}) within {SUBSCRIBE_TIMEOUT:g} s")
                    c.ws.transport.abort()

    async def churn(self) -> None:
        """Subscription changes and reconnects at a steady rate, each on a random live client."""
        s = self.settings
        tick = 0.2
        per_s = len(self.clients) / s["churn_interval"]
        subscribe_due = reconnect_due = 0.0
        await self.churning.wait()
        while not self.quiesced:
            await asyncio.sleep(tick)
            subscribe_due += per_s * s["subscribe_churn"] * tick
            reconnect_due += per_s * s["reconnect_churn"] * tick
            while subscribe_due >= 1:
                subscribe_due -= 1
                client = random.choice(self.clients)
                if client.live:
                    try:
                        await asyncio.wait_for(client.change_subscription(), 5)
                    except Exception:  # noqa: BLE001 - the connection went away meanwhile
                        pass
            while reconnect_due >= 1:
                reconnect_due -= 1
                random.choice(self.clients).leave(random.random() < s["abrupt_share"])

    async def final(self, published: dict[str, Any]) -> dict[str, Any]:
        """Wait (bounded) until every client is back and has caught up with the last counters
        published, then count what is still missing."""
        last_alert: list[int] = published["alerts"]
        last_market: int = published["market"]

        def behind(c: SoakClient) -> bool:
            if not c.live or c.replay_left:
                return True
            if any(c.next_n[k] and c.next_n[k] <= last_alert[k] for k in c.core_streams):
                return True
            return c.checks_market and 0 < c.market_next <= last_market

        deadline = time.monotonic() + published["timeout"]
        # A poll: the condition spans every client.
        while time.monotonic() < deadline and any(map(behind, self.clients)):  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        counts = self.counts
        not_live = 0
        for c in self.clients:
            not_live += not c.live
            for k in c.core_streams:
                if not last_alert[k]:
                    continue
                if not c.next_n[k]:
                    counts["never_seen"] += 1
                elif c.next_n[k] <= last_alert[k]:
                    counts["tail_lost"] += last_alert[k] - c.next_n[k] + 1
                    self.example(f"client {c.index}: stream {k} ends at {c.next_n[k] - 1}, "
                                 f"published up to {last_alert[k]}")
            if c.checks_market and last_market and c.market_next:
                counts["market_tail_lost"] += max(0, last_market - c.market_next + 1)
        return {**self.snapshot(), "not_live": not_live, "latency": self.latency,
                "examples": self.examples}


class SoakClient:
    """One WebSocket client: its core subscription, what it has seen, its extras."""

    __slots__ = ("process", "index", "core_keys", "core_streams", "is_core", "checks_market",
                 "next_n", "market_next", "last_seq", "stream_id", "extras", "checks", "ws",
                 "live", "leaving", "replay_left", "requests", "subscribed_at")

    def __init__(self, process: ClientProcess, index: int, streams: int, on_topic: bool) -> None:
        self.process = process
        self.index = index
        if on_topic:
            self.core_keys: tuple[str, ...] = ("alerts",)
            self.core_streams: tuple[int, ...] = tuple(range(streams))
        else:
            self.core_keys = ("symbol:" + symbol(index % streams),)
            self.core_streams = (index % streams,)
        self.is_core = [k in self.core_streams for k in range(streams)]
        # Symbol clients get every market_update (their entry of it) through their symbol.
        self.checks_market = not on_topic
        self.next_n = [0] * streams  # next expected counter per stream; 0 = none seen yet
        self.market_next = 0
        self.last_seq: int | None = None  # the stream position to resume from
        self.stream_id: str | None = None
        self.extras: set[str] = set()
        self.checks: dict[str, frozenset[str]] = {}  # get_subscriptions request -> expected
        self.ws: Any = None
        self.live = False  # core subscription acknowledged on the current connection
        self.leaving = False
        self.replay_left = 0
        self.requests = 0
        self.subscribed_at = float("inf")  # when the core subscribe was sent

    async def run(self) -> None:
        p = self.process
        counts = p.counts
        while not p.stopping:
            self.leaving = False
            try:
                async with p.connect_slots:
                    ws = await connect(p.url, compression=None, ping_interval=None, proxy=None,
                                       open_timeout=30, close_timeout=5, max_size=2 ** 22)
            except Exception as error:  # noqa: BLE001 - counted; the client tries again
                counts["connect_failures"] += 1
                p.example(f"client {self.index}: connect failed: {error!r}"[:200])
                await asyncio.sleep(1 + random.random())
                continue
            self.ws = ws
            self.subscribed_at = time.monotonic()
            try:
                await self.session(ws)
            except ConnectionClosed:
                pass
            except Exception as error:  # noqa: BLE001 - a bug of this script: counted
                counts["client_errors"] += 1
                p.example(f"client {self.index}: {error!r}"[:200])
            finally:
                self.ws = None
                self.live = False
                if ws.state is not State.CLOSED:
                    ws.transport.abort()
            if p.stopping:
                return
            if self.leaving:
                counts["reconnects"] += 1
                # Away for a moment, so that the resume has events to replay.
                await asyncio.sleep(random.uniform(0.2, 2.0))
            else:
                counts["server_closes"] += 1
                code = str(ws.close_code)
                p.closes[code] = p.closes.get(code, 0) + 1
                p.example(f"client {self.index}: closed by the server, code {code} "
                          f"{ws.close_reason or ''}")
                await asyncio.sleep(1.0)

    async def session(self, ws: Any) -> None:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if hello.get("type") != "connected":
            self.process.count_error(str((hello.get("data") or {}).get("code")))
            return
        info = hello["data"]
        subscription: dict[str, Any] = {"topics": list(self.core_keys)}
        if self.last_seq is None:  # first connection: resumes start from here
            self.last_seq, self.stream_id = info["last_seq"], info["stream_id"]
        else:
            subscription.update(since=self.last_seq, stream_id=self.stream_id)
        self.extras.clear()
        self.checks.clear()
        self.replay_left = 0
        await ws.send(json.dumps({"type": "subscribe", "data": subscription,
                                  "request_id": "core"}))
        async for message in ws:
            if self.on_message(message):
                await ws.send(PONG)

    def leave(self, abrupt: bool) -> None:
        ws = self.ws
        if ws is None or not self.live:
            return
        self.leaving, self.live = True, False
        if abrupt:
            self.process.counts["abrupt"] += 1
            ws.transport.abort()  # no close frame: the gateway sees the socket go
        else:
            self.process.spawn(ws.close())

    async def change_subscription(self) -> None:
        """Subscribe an extra topic or symbol, or unsubscribe one; sometimes check the set."""
        held = self.extras
        counts = self.process.counts
        if held and (len(held) >= MAX_EXTRAS or random.random() < 0.5):
            key = random.choice(sorted(held))
            held.discard(key)
            kind = "unsubscribe"
            counts["unsubscribes"] += 1
        else:
            key = random.choice([k for k in self.process.extra_keys
                                 if k not in held and k not in self.core_keys])
            held.add(key)
            kind = "subscribe"
            counts["subscribes"] += 1
        self.requests += 1
        ws = self.ws
        await ws.send(json.dumps({"type": kind, "data": {"topics": [key]},
                                  "request_id": f"x{self.requests}"}))
        if random.random() < CHECK_SHARE:
            request = f"q{self.requests}"
            self.checks[request] = frozenset(self.core_keys) | frozenset(held)
            await ws.send(json.dumps({"type": "get_subscriptions", "request_id": request}))

    # -- receiving ----------------------------------------------------------------------------

    def on_message(self, message: str) -> bool:
        """Check one message; True when it is a ping to answer."""
        if message.startswith(ALERT_PREFIX):
            try:
                p = len(ALERT_PREFIX)
                c = message.index(",", p)
                stream = int(message[p:c])
                p = c + 5  # ,"n":
                c = message.index(",", p)
                n = int(message[p:c])
                p = c + 5  # ,"t":
                c = message.index(",", p)
                sent_ms = int(message[p:c])
                seq = int(message[message.rindex(":") + 1:-1])
            except ValueError:
                self.process.counts["parse_fallbacks"] += 1
                return self.on_other(message)
            live = self.on_stream_event(seq)
            if live is not None and self.is_core[stream]:
                self.check_alert(stream, n, sent_ms, live)
            return False
        if message.startswith(MARKET_PREFIX):
            try:
                p = len(MARKET_PREFIX)
                c = message.index(",", p)
                n = int(message[p:c])
                seq = int(message[message.rindex(":") + 1:-1])
            except ValueError:
                self.process.counts["parse_fallbacks"] += 1
                return self.on_other(message)
            if self.on_stream_event(seq) is not None and self.checks_market:
                self.check_market(n)
            return False
        if message.startswith(PING_PREFIX):
            return True
        return self.on_other(message)

    def on_stream_event(self, seq: int) -> bool | None:
        """None for a duplicate, else whether the event came live (not from a replay)."""
        last = self.last_seq
        if last is not None and seq <= last:
            self.process.counts["duplicates"] += 1
            self.process.example(f"client {self.index}: seq {seq} after {last}")
            return None
        self.last_seq = seq
        self.process.counts["received"] += 1
        if self.replay_left:
            self.replay_left -= 1
            return False
        return True

    def check_alert(self, stream: int, n: int, sent_ms: int, live: bool) -> None:
        p = self.process
        expected = self.next_n[stream]
        if expected and n != expected:
            if n < expected:
                p.counts["core_duplicates"] += 1
                p.example(f"client {self.index}: stream {stream} counter {n} again")
                return
            p.counts["lost"] += n - expected
            p.example(f"client {self.index}: stream {stream} jumped from {expected - 1} to {n}")
        self.next_n[stream] = n + 1
        p.counts["core_events"] += 1
        if live:
            delay = time.time_ns() // 1_000_000 - sent_ms
            p.latency[min(max(delay, 0), LATENCY_BUCKETS_MS)] += 1

    def check_market(self, n: int) -> None:
        p = self.process
        expected = self.market_next
        if expected and n != expected:
            if n < expected:
                p.counts["core_duplicates"] += 1
                return
            p.counts["market_lost"] += n - expected
            p.example(f"client {self.index}: market jumped from {expected - 1} to {n}")
        self.market_next = n + 1
        p.counts["market_events"] += 1

    def on_other(self, raw: str) -> bool:
        """Replies and anything without the expected layout: parsed as JSON."""
        p = self.process
        message = json.loads(raw)
        kind = message.get("type")
        data = message.get("data") or {}
        request = message.get("request_id")
        if kind == "ping":
            return True
        if "seq" in message:  # a stream event of another layout
            live = self.on_stream_event(message["seq"])
            if live is not None and kind == "alert" and self.is_core[data.get("k", 0)]:
                self.check_alert(data["k"], data["n"], data["t"], live)
        elif kind == "subscribed" and request == "core":
            self.live = True
            if "recovered" in data:
                p.counts["resumes"] += 1
                p.counts["replayed"] += data["replayed"]
                self.replay_left = data["replayed"]
                if not data["recovered"]:
                    p.counts["unrecovered"] += 1
                    p.example(f"client {self.index}: resume from {self.last_seq} not recovered")
        elif kind == "subscriptions":
            expected = self.checks.pop(str(request), None)
            if expected is not None:
                got = set(data.get("topics", ())) | {"symbol:" + s for s in data.get("symbols", ())}
                p.counts["subscription_checks"] += 1
                if got != expected:
                    p.counts["subscription_mismatches"] += 1
                    p.example(f"client {self.index}: subscriptions {sorted(got)}, expected "
                              f"{sorted(expected)}")
        elif kind == "error":
            p.count_error(str(data.get("code")))
            p.example(f"client {self.index}: error {data.get('code')}: {data.get('details')}")
        return False


def client_process(number: int, indices: list[int], settings: dict[str, Any], commands: Any,
                   reports: Any) -> None:
    """Entry point of a client process."""
    if settings["cpus"]:
        os.sched_setaffinity(0, settings["cpus"])
    asyncio.run(ClientProcess(number, indices, settings, commands, reports).run())


# ================================================================== driver: publishing
class Publisher(threading.Thread):
    """Publishes at a steady rate (open loop, 20 ticks per second) with a counter per stream."""

    TICK = 0.05

    def __init__(self, port: int, rate: float, market_rate: float, streams: int) -> None:
        super().__init__(daemon=True, name="publisher")
        self.port = port
        self.rate = rate
        self.market_rate = market_rate
        self.streams = streams
        self.alerts = [0] * streams  # last counter published per stream
        self.market = 0
        self.published = 0
        self.errors: list[str] = []
        self.ambiguous = 0  # events of POSTs that failed without an answer
        self.seq_breaks = 0  # a batch whose first seq is not the previous last + 1
        self.last_seq: int | None = None
        self.post_ms: list[float] = []
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self._interval_ms: list[float] = []

    def take_interval(self) -> list[float]:
        with self.lock:
            out, self._interval_ms = self._interval_ms, []
        return out

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        start = time.monotonic()
        alerts_sent = market_sent = 0
        while not self.halt.is_set():
            elapsed = time.monotonic() - start
            events = []
            due_market = int(self.market_rate * elapsed) - market_sent
            for _ in range(max(due_market, 0)):
                events.append(self.market_event())
                market_sent += 1
            due_alerts = int(self.rate * elapsed) - alerts_sent
            for _ in range(max(due_alerts, 0)):
                events.append(self.alert_event(alerts_sent % self.streams))
                alerts_sent += 1
            if events:
                connection = self.post(connection, events)
            self.halt.wait(max(0.0, self.TICK - (time.monotonic() - start - elapsed)))
        connection.close()

    def alert_event(self, stream: int) -> dict[str, Any]:
        self.alerts[stream] += 1
        return {"type": "alert", "symbol": symbol(stream),
                "data": {"k": stream, "n": self.alerts[stream], "t": time.time_ns() // 1_000_000,
                         "level": "info", "message": "soak"}}

    def market_event(self) -> dict[str, Any]:
        self.market += 1
        return {"type": "market_update", "data": [
            {"n": self.market, "symbol": symbol(k), "price": 100.0 + k,
             "volume_24h": 1000.0, "change_24h": 0.0} for k in range(self.streams)]}

    def post(self, connection: http.client.HTTPConnection,
             events: list[dict[str, Any]]) -> http.client.HTTPConnection:
        body = json.dumps({"events": events})
        began = time.monotonic()
        try:
            connection.request("POST", "/api/events", body,
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as error:
            # Maybe published, maybe not: a gap there would not be the fan-out's fault.
            self.ambiguous += len(events)
            self.errors.append(f"{time.strftime('%H:%M:%S')} POST failed: {error!r}")
            connection.close()
            return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        took_ms = (time.monotonic() - began) * 1000
        with self.lock:
            self.post_ms.append(took_ms)
            self._interval_ms.append(took_ms)
        if response.status != 202:
            # Refused whole: take the counters back so that clients do not see a gap.
            self.errors.append(f"POST {response.status}: {answer[:200]!r}")
            for event in events:
                if event["type"] == "alert":
                    self.alerts[event["data"]["k"]] -= 1
                else:
                    self.market -= 1
            return connection
        result = json.loads(answer)
        if self.last_seq is not None and result["first_seq"] != self.last_seq + 1:
            self.seq_breaks += 1
        self.last_seq = result["last_seq"]
        self.published += result["accepted"]
        return connection


# ================================================================== driver: sampling
class Sampler(threading.Thread):
    """Polls GET /api/ws/stats every second (event-loop lag), and every `interval` s records a
    row: the gateway worker's memory, files and CPU, the gateway's counters, the clients'."""

    def __init__(self, port: int, pids: list[int], client_pids: list[int], interval: float,
                 publisher: Publisher, progress: dict[int, dict[str, Any]],
                 started: float) -> None:
        super().__init__(daemon=True, name="sampler")
        self.port = port
        self.processes = [psutil.Process(pid) for pid in pids]
        self.clients = [psutil.Process(pid) for pid in client_pids]
        # This driver and the client processes: the rest of the machine's CPU time is noise.
        self.ours = [psutil.Process(os.getpid()), *self.clients]
        self.interval = interval
        self.publisher = publisher
        self.progress = progress
        self.started = started
        self.rows: list[dict[str, Any]] = []
        self.lag_polls: list[float] = []  # every polled event_loop_lag_ms
        self.stats_ms: list[float] = []
        self.stats: dict[str, Any] = {}
        self.lag_available = False
        self.halt = threading.Event()
        self.phase = "run"
        self._cpu = self.cpu_now()
        self._cpu_at = time.monotonic()

    @staticmethod
    def cpu_seconds(processes: list[psutil.Process]) -> float:
        total = 0.0
        for p in processes:
            try:
                times = p.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total

    def cpu_now(self) -> tuple[float, float, float]:
        """CPU seconds so far: the gateway worker(s), ours, the whole machine."""
        return self.cpu_seconds(self.processes), self.cpu_seconds(self.ours), machine_busy()

    def poll(self, connection: http.client.HTTPConnection) -> http.client.HTTPConnection:
        began = time.monotonic()
        try:
            connection.request("GET", "/api/ws/stats")
            response = connection.getresponse()
            body = response.read()
            if response.status == 200:
                self.stats = json.loads(body)
                self.stats_ms.append((time.monotonic() - began) * 1000)
                lag = self.stats.get("event_loop_lag_ms")
                if lag is not None:
                    self.lag_available = True
                    self.lag_polls.append(float(lag))
        except (OSError, http.client.HTTPException, ValueError):
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        return connection

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        next_row = time.monotonic()
        interval_lags: list[float] = []
        while not self.halt.wait(1.0 - (time.monotonic() - self.started) % 1.0):
            polled = len(self.lag_polls)
            connection = self.poll(connection)
            interval_lags += self.lag_polls[polled:]
            if time.monotonic() >= next_row:
                self.record(interval_lags)
                interval_lags = []
                next_row += self.interval
        connection.close()

    def record(self, interval_lags: list[float]) -> None:
        rss = fds = clients_rss = 0
        for p in self.processes:
            try:
                rss += p.memory_info().rss
                fds += p.num_fds()
            except psutil.Error:
                pass
        for p in self.clients:
            try:
                clients_rss += p.memory_info().rss
            except psutil.Error:
                pass
        now = time.monotonic()
        cpu = self.cpu_now()
        gateway, ours, machine = (100 * (b - a) / max(now - self._cpu_at, 1e-6)
                                  for a, b in zip(self._cpu, cpu, strict=True))
        self._cpu, self._cpu_at = cpu, now
        s = self.stats
        clients = sum_progress(self.progress)
        posts = self.publisher.take_interval()
        self.rows.append({
            "t_s": round(now - self.started, 1),
            "phase": self.phase,
            # The worker's own figure when the gateway reports it, else psutil's (the same).
            "rss_mb": round((s.get("rss_bytes") or rss) / MB, 2),
            "rss_psutil_mb": round(rss / MB, 2),
            "open_files": fds,
            # % of one core over the interval.
            "gateway_cpu_pct": round(gateway, 1),
            "clients_cpu_pct": round(ours, 1),
            "others_cpu_pct": round(max(machine - gateway - ours, 0.0), 1),
            "clients_rss_mb": round(clients_rss / MB, 1),
            "lag_ms": s.get("event_loop_lag_ms", ""),
            "lag_interval_max_ms": round(max(interval_lags), 3) if interval_lags else "",
            "lag_max_ms": s.get("event_loop_lag_max_ms", ""),
            "post_max_ms": round(max(posts), 2) if posts else "",
            "connections": s.get("active_connections", ""),
            "connections_total": s.get("connections_total", ""),
            "events_published": s.get("events_published", ""),
            "deliveries": s.get("deliveries", ""),
            "replayed": s.get("replayed", ""),
            "slow_consumer_closes": s.get("slow_consumer_closes", ""),
            "frames_conflated": s.get("frames_conflated", ""),
            "queue_depth_max": s.get("queue_depth_max", ""),
            "published": self.publisher.published,
            "clients_live": clients.get("live", 0),
            "received": clients.get("received", 0),
            "lost": clients.get("lost", 0) + clients.get("market_lost", 0),
            "duplicates": clients.get("duplicates", 0) + clients.get("core_duplicates", 0),
            "reconnects": clients.get("reconnects", 0),
            "server_closes": clients.get("server_closes", 0),
            "resumes": clients.get("resumes", 0),
            "churn_ops": clients.get("subscribes", 0) + clients.get("unsubscribes", 0),
        })
        r = self.rows[-1]
        log(f"[{r['t_s'] / 60:5.1f} min] RSS {r['rss_mb']:.1f} MB  lag {r['lag_ms']} ms "
            f"(max {r['lag_max_ms']})  conns {r['connections']}  published {r['published']}  "
            f"received {r['received']}  lost {r['lost']}  dup {r['duplicates']}  "
            f"reconnects {r['reconnects']}  churn {r['churn_ops']}  CPU gateway "
            f"{r['gateway_cpu_pct']:.0f}% others {r['others_cpu_pct']:.0f}%")


def sum_progress(progress: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The clients' counters summed over the processes (error and close codes merged)."""
    total: dict[str, Any] = {"errors": {}, "closes": {}}
    for snapshot in list(progress.values()):
        for key, value in snapshot.items():
            if isinstance(value, dict):
                for code, n in value.items():
                    total[key][code] = total[key].get(code, 0) + n
            elif isinstance(value, int):
                total[key] = total.get(key, 0) + value
            elif key == "examples":
                total.setdefault(key, []).extend(value)
    return total


# ================================================================== driver: the run
def start_gateway(a: argparse.Namespace, env_extra: dict[str, str], workdir: str,
                  logpath: str) -> tuple[subprocess.Popen, int]:
    port = free_port_pair()
    env = dict(os.environ)
    env.update(HOST="127.0.0.1", PORT=str(port), SIMULATION="false",
               DATABASE_URL="sqlite:///" + os.path.join(workdir, "soak.db"),
               # Room for every client twice: a client's old connection may still be closing
               # when its new one arrives.
               WS_MAX_CONNECTIONS=str(2 * a.clients + 100))
    env.update(env_extra)
    cmd = [a.python, "-m", "hypercorn", "--config", "file:hypercorn_config.py", "wsgi:app"]
    if a.pin:
        cmd = ["taskset", "-c", str(GATEWAY_CPU)] + cmd
    with open(logpath, "w") as logf:
        prepare_gateway(a.python, env, workdir, logf)  # python -m app migrate
        logf.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    workers = int(env.get("WORKERS", "1"))
    if (not wait_ready(f"http://127.0.0.1:{port}/api/health", proc, timeout=60)
            or not wait_workers(logpath, proc, workers)):
        stop(proc, "gateway")
        raise RuntimeError(f"the gateway did not start (log: {logpath})")
    return proc, port


def warm_up_seconds(a: argparse.Namespace, env_extra: dict[str, str],
                    run_s: float) -> tuple[float, str]:
    """When memory should have stopped growing: after --warmup of the run, and not before the
    resume history (EVENT_HISTORY_SIZE events or EVENT_HISTORY_MAX_AGE s) is full, since it
    grows legitimately until then."""
    sys.path.insert(0, ROOT)
    from config import Config

    config = Config.from_env({**os.environ, **env_extra})  # what the gateway will read
    events_per_s = a.rate + a.market_rate
    fill_s = min(config.EVENT_HISTORY_SIZE / events_per_s, config.EVENT_HISTORY_MAX_AGE)
    share = a.warmup * run_s
    if max(share, fill_s + 60) <= 0.8 * run_s:
        return max(share, fill_s + 60), (
            f"the larger of {a.warmup:.0%} of the run and the resume history full "
            f"({config.EVENT_HISTORY_SIZE} events at {events_per_s:g}/s or "
            f"{config.EVENT_HISTORY_MAX_AGE:g} s: {fill_s / 60:.1f} min) + 1 min")
    return share, (f"{a.warmup:.0%} of the run; the resume history fills only after "
                   f"{fill_s / 60:.1f} min, so memory still grows legitimately: not judged")


def wait_for(progress: dict[int, dict[str, Any]], key: str, target: int, timeout: float,
             proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if sum_progress(progress).get(key, 0) >= target:
            return True
        time.sleep(0.2)
    return False


def main() -> int:
    a = parse_arguments()
    gateway_env = dict(item.split("=", 1) for item in a.gateway_env)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(a.results, exist_ok=True)
    logdir = os.path.join(a.results, f"{stamp}-soak-logs")
    os.makedirs(logdir, exist_ok=True)
    base = os.path.join(a.results, f"{stamp}-soak")
    prefix = None
    if a.redis:
        try:
            redis_call(a.python, a.redis_url, "ping")
        except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as error:
            sys.exit(f"Redis is not reachable at {a.redis_url}: {error}")
        prefix = f"sigmax-soak-{stamp}"
        gateway_env.update(REDIS_URL=a.redis_url, REDIS_PREFIX=prefix)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    run_s = a.minutes * 60
    warmup_s, warmup_why = warm_up_seconds(a, gateway_env, run_s)
    workdir = tempfile.mkdtemp(prefix="sigmax-soak-")
    gateway_log = os.path.join(logdir, "gateway.log")
    ctx = multiprocessing.get_context("spawn")
    reports = ctx.Queue()
    commands = [ctx.Queue() for _ in range(a.procs)]
    workers: list[Any] = []
    proc = None
    publisher = sampler = None
    progress: dict[int, dict[str, Any]] = {}
    finals: dict[int, dict[str, Any]] = {}
    notes: list[str] = []
    redis_result: dict[str, Any] | None = None
    halt_reader = threading.Event()

    def read_reports() -> None:
        while not halt_reader.is_set():
            try:
                kind, number, body = reports.get(timeout=0.5)
            except queue.Empty:
                continue
            if kind == "final":
                finals[number] = body
            progress[number] = {k: v for k, v in body.items() if k != "latency"}

    reader = threading.Thread(target=read_reports, daemon=True, name="reports")
    started = time.monotonic()
    try:
        proc, port = start_gateway(a, gateway_env, workdir, gateway_log)
        pids = worker_pids(proc.pid) or [proc.pid]
        log(f"gateway pid {proc.pid}, worker(s) {pids}, port {port}"
            + (f", pinned to CPU {GATEWAY_CPU}; clients on CPU {CLIENT_CPU}" if a.pin else ""))
        if a.pin:
            os.sched_setaffinity(0, {CLIENT_CPU})  # the driver too, away from the gateway
        settings = dict(url=f"ws://127.0.0.1:{port}/api/ws", symbols=a.symbols,
                        topic_every=a.topic_every, churn_interval=a.churn_interval,
                        subscribe_churn=a.subscribe_churn, reconnect_churn=a.reconnect_churn,
                        abrupt_share=0.5, cpus={CLIENT_CPU} if a.pin else None)
        for number in range(a.procs):
            indices = list(range(number, a.clients, a.procs))
            w = ctx.Process(target=client_process, daemon=True, name=f"soak-clients-{number}",
                            args=(number, indices, settings, commands[number], reports))
            w.start()
            workers.append(w)
        reader.start()
        if not wait_for(progress, "live", a.clients, 120, proc):
            now = sum_progress(progress)
            raise RuntimeError(f"only {now.get('live', 0)} of {a.clients} clients subscribed "
                               f"within 120 s; errors {now['errors']}, connect failures "
                               f"{now.get('connect_failures', 0)}; {now.get('examples', [])[:3]}")
        log(f"{a.clients} clients subscribed after {time.monotonic() - started:.1f} s; "
            f"running {a.minutes:g} min (warm-up {warmup_s / 60:.1f} min: {warmup_why})")

        for q in commands:
            q.put(("churn", None))
        t0 = time.monotonic()
        publisher = Publisher(port, a.rate, a.market_rate, a.symbols)
        sampler = Sampler(port, pids, [w.pid for w in workers], a.sample_interval, publisher,
                          progress, t0)
        publisher.start()
        sampler.start()
        while time.monotonic() - t0 < run_s:
            if proc.poll() is not None:
                notes.append(f"the gateway exited with {proc.returncode} during the run")
                break
            dead = [w.name for w in workers if not w.is_alive()]
            if dead:
                notes.append(f"client process(es) {dead} died")
                break
            time.sleep(0.5)

        # The end: no more churn or events; every client catches up; the tails are checked.
        for q in commands:
            q.put(("quiesce", None))
        publisher.halt.set()
        publisher.join(15)
        time.sleep(1.0)
        last = {"alerts": list(publisher.alerts), "market": publisher.market, "timeout": 30.0}
        for q in commands:
            q.put(("final", last))
        deadline = time.monotonic() + 60
        while len(finals) < len(workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        if len(finals) < len(workers):
            notes.append(f"only {len(finals)} of {len(workers)} client processes reported")
        sampler.halt.set()
        sampler.join(15)
        sampler.poll(http.client.HTTPConnection("127.0.0.1", port, timeout=10))
        sampler.phase = "end"
        sampler.record([])  # after the drain
    except KeyboardInterrupt:
        notes.append("interrupted")
    except RuntimeError as error:
        notes.append(str(error))
    finally:
        for q in commands:
            q.put(("stop", None))
        for w in workers:
            w.join(20)
            if w.is_alive():
                w.kill()
        halt_reader.set()
        if publisher is not None:
            publisher.halt.set()
        if sampler is not None:
            sampler.halt.set()
        stop(proc, "gateway")
        shutil.rmtree(workdir, ignore_errors=True)
        if prefix:
            try:
                redis_result = redis_call(a.python, a.redis_url, "clean", prefix)
            except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as error:
                notes.append(f"Redis keys {prefix}:* not deleted: {error}")

    if sampler is None or not sampler.rows:
        log("no samples: " + "; ".join(notes))
        return 1
    summary = summarize(a, sampler, publisher, finals, warmup_s, warmup_why, notes,
                        redis_result, gateway_log)
    write_csv(base + ".csv", sampler.rows)
    plotted = plot(base + ".png", sampler.rows, summary, a)
    text = report_text(a, summary, base, plotted, stamp)
    with open(base + ".md", "w") as f:
        f.write(text)
    print(text)
    log(f"written {os.path.relpath(base, ROOT)}.md, .csv" + (", .png" if plotted else ""))
    return 1 if summary["failures"] else 0


# ================================================================== report
def percentile(sorted_values: list[float], share: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(share * len(sorted_values)))]


def histogram_percentile(histogram: list[int], share: float) -> int | None:
    total = sum(histogram)
    if not total:
        return None
    running = 0
    for bucket, count in enumerate(histogram):
        running += count
        if running >= share * total:
            return bucket
    return len(histogram) - 1


def rss_trend(rows: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """RSS at the end of the warm-up and at the end, and the least-squares slope after it."""
    after = [r for r in rows if r["t_s"] >= warmup_s]
    at_warmup = after[0]["rss_mb"] if after else None
    trend: dict[str, Any] = {"at_warmup_mb": at_warmup, "end_mb": rows[-1]["rss_mb"],
                             "max_mb": max(r["rss_mb"] for r in rows),
                             "start_mb": rows[0]["rss_mb"], "slope_mb_per_10min": None,
                             "fitted_growth_mb": None, "span_min": 0.0}
    if len(after) >= 3:
        xs = [r["t_s"] for r in after]
        ys = [r["rss_mb"] for r in after]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
        trend.update(slope_mb_per_10min=slope * 600, fitted_growth_mb=slope * (xs[-1] - xs[0]),
                     span_min=(xs[-1] - xs[0]) / 60, intercept=my - slope * mx)
    return trend


def summarize(a: argparse.Namespace, sampler: Sampler, publisher: Publisher | None,
              finals: dict[int, dict[str, Any]], warmup_s: float, warmup_why: str,
              notes: list[str], redis_result: dict[str, Any] | None,
              gateway_log: str) -> dict[str, Any]:
    rows = sampler.rows
    clients = sum_progress({n: {k: v for k, v in f.items() if k not in ("latency", "examples")}
                            for n, f in finals.items()}) if finals else sum_progress(
        sampler.progress)
    latency = [0] * (LATENCY_BUCKETS_MS + 1)
    examples: list[str] = []
    for f in finals.values():
        latency = [x + y for x, y in zip(latency, f["latency"], strict=True)]
        examples += f["examples"]
    lost = clients.get("lost", 0) + clients.get("tail_lost", 0)
    market_lost = clients.get("market_lost", 0) + clients.get("market_tail_lost", 0)
    duplicates = clients.get("duplicates", 0) + clients.get("core_duplicates", 0)
    trend = rss_trend(rows, warmup_s)
    judged = "not judged" not in warmup_why and trend["fitted_growth_mb"] is not None
    lags = sorted(sampler.lag_polls)
    others = [r["others_cpu_pct"] for r in rows if r["phase"] == "run"] or [0.0]
    posts = sorted(publisher.post_ms) if publisher else []
    stats = sampler.stats
    conflated = stats.get("frames_conflated", 0) or 0

    failures = list(notes)
    if lost:
        failures.append(f"{lost} core events lost")
    if market_lost and not conflated:
        failures.append(f"{market_lost} market_update events lost (none conflated)")
    if duplicates:
        failures.append(f"{duplicates} duplicates")
    for key, what in (("unrecovered", "resumes not recovered"),
                      ("subscription_mismatches", "wrong subscription sets"),
                      ("never_seen", "core streams never received by a client"),
                      ("not_live", "clients not subscribed at the end"),
                      ("client_errors", "client exceptions"),
                      ("subscribe_timeouts", "core subscribes not answered")):
        if clients.get(key):
            failures.append(f"{clients[key]} {what}")
    if (redis_result is not None and publisher is not None
            and redis_result.get("seq") != publisher.last_seq):
        failures.append(f"Redis stream counter {redis_result.get('seq')}, last seq published "
                        f"{publisher.last_seq}")
    if publisher is not None and (publisher.errors or publisher.seq_breaks):
        failures.append(f"{len(publisher.errors)} POST errors, {publisher.seq_breaks} seq breaks")
    if judged and trend["fitted_growth_mb"] > a.max_growth_mb:
        failures.append(f"RSS grew {trend['fitted_growth_mb']:.1f} MB after warm-up "
                        f"(limit {a.max_growth_mb:g})")
    gateway_problems: list[str] = []
    gateway_warnings = 0
    try:
        with open(gateway_log, errors="replace") as log_file:
            for line in log_file:
                if any(word in line for word in ("Traceback", " ERROR ", "[ERROR]",
                                                 " CRITICAL ")):
                    gateway_problems.append(line.rstrip()[:300])
                gateway_warnings += " WARNING " in line or "[WARNING]" in line
    except OSError:
        pass
    return {
        "rows": rows, "trend": trend, "judged": judged, "warmup_s": warmup_s,
        "warmup_why": warmup_why, "clients": clients, "lost": lost, "market_lost": market_lost,
        "duplicates": duplicates, "conflated": conflated, "stats": stats,
        "lag_available": sampler.lag_available,
        "lag_p50": percentile(lags, 0.50), "lag_p99": percentile(lags, 0.99),
        "lag_max_polled": lags[-1] if lags else None,
        "lag_max": stats.get("event_loop_lag_max_ms"),
        "lag_polls": len(lags),
        "post_p50": percentile(posts, 0.50), "post_p99": percentile(posts, 0.99),
        "post_max": posts[-1] if posts else None,
        "latency_p50": histogram_percentile(latency, 0.50),
        "latency_p99": histogram_percentile(latency, 0.99),
        "latency_max": max((i for i, n in enumerate(latency) if n), default=None),
        "published": publisher.published if publisher else 0,
        "publisher_errors": publisher.errors[:EXAMPLES] if publisher else [],
        "ambiguous": publisher.ambiguous if publisher else 0,
        "examples": examples[:EXAMPLES], "redis": redis_result,
        "others_mean": statistics.fmean(others), "others_max": max(others),
        "gateway_cpu_mean": statistics.fmean(
            [r["gateway_cpu_pct"] for r in rows if r["phase"] == "run"] or [0.0]),
        "gateway_problems": gateway_problems, "gateway_warnings": gateway_warnings,
        "failures": failures,
    }


def fmt(value: Any, digits: int = 1, unit: str = "") -> str:
    if value is None or value == "":
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value:,}{unit}"


def report_text(a: argparse.Namespace, s: dict[str, Any], base: str, plotted: bool,
                stamp: str) -> str:
    t, c, st = s["trend"], s["clients"], s["stats"]
    rows = s["rows"]
    minutes = rows[-1]["t_s"] / 60
    verdict = "PASS" if not s["failures"] else "FAIL: " + "; ".join(s["failures"])
    memory = (f"{fmt(t['slope_mb_per_10min'], 2)} MB per 10 min after warm-up "
              f"(fitted growth {fmt(t['fitted_growth_mb'], 2)} MB over {t['span_min']:.1f} min; "
              f"limit {a.max_growth_mb:g} MB)")
    if not s["judged"]:
        memory += " - not judged"
    lag = (f"p50 {fmt(s['lag_p50'], 2)} ms, p99 {fmt(s['lag_p99'], 2)} ms, max polled "
           f"{fmt(s['lag_max_polled'], 2)} ms over {s['lag_polls']} polls; max since start "
           f"{fmt(s['lag_max'], 2)} ms" if s["lag_available"] else
           "unavailable (the gateway's /api/ws/stats has no event_loop_lag_ms)")
    lines = [
        f"# Soak {stamp}: {verdict}",
        "",
        f"{a.clients} clients in {a.procs} processes, {a.rate:g} alerts/s over {a.symbols} "
        f"symbols + {a.market_rate:g} market_update/s, {minutes:.1f} min"
        f"{' through Redis' if a.redis else ' in memory'}; churn every {a.churn_interval:g} s: "
        f"{a.subscribe_churn:.0%} subscription changes, {a.reconnect_churn:.0%} reconnects"
        f"{'; gateway on CPU 0, clients on CPU 1' if a.pin else ''}.",
        "",
        "| | |",
        "|---|---|",
        f"| RSS start / warm-up end / end / max | {fmt(t['start_mb'])} / "
        f"{fmt(t['at_warmup_mb'])} / {fmt(t['end_mb'])} / {fmt(t['max_mb'])} MB |",
        f"| warm-up | {s['warmup_s'] / 60:.1f} min: {s['warmup_why']} |",
        f"| RSS slope | {memory} |",
        f"| event-loop lag (polled every s) | {lag} |",
        f"| POST /api/events round trip | p50 {fmt(s['post_p50'], 2)} ms, p99 "
        f"{fmt(s['post_p99'], 2)} ms, max {fmt(s['post_max'], 2)} ms |",
        f"| delivery latency (live core alerts) | p50 {fmt(s['latency_p50'])} ms, p99 "
        f"{fmt(s['latency_p99'])} ms, max {fmt(s['latency_max'])} ms |",
        f"| events published | {fmt(s['published'])} (gateway: "
        f"{fmt(st.get('events_published'))}) |",
        f"| deliveries | clients received {fmt(c.get('received'))} stream events "
        f"(gateway counted {fmt(st.get('deliveries'))} fan-out deliveries + "
        f"{fmt(st.get('replayed'))} replayed) |",
        f"| lost | {s['lost']} core alerts (gaps {c.get('lost', 0)}, tails "
        f"{c.get('tail_lost', 0)}), {s['market_lost']} market_update "
        f"(frames conflated by the gateway: {s['conflated']}) |",
        f"| duplicated | {s['duplicates']} (seq {c.get('duplicates', 0)}, counter "
        f"{c.get('core_duplicates', 0)}) |",
        f"| reconnects | {fmt(c.get('reconnects'))} ({fmt(c.get('abrupt'))} without close "
        f"frame), closed by the server: {fmt(c.get('server_closes'))} "
        f"{c.get('closes') or ''} |",
        f"| resumes | {fmt(c.get('resumes'))}, {fmt(c.get('replayed'))} events replayed, "
        f"{c.get('unrecovered', 0)} not recovered |",
        f"| churn | {fmt(c.get('subscribes'))} subscribes, {fmt(c.get('unsubscribes'))} "
        f"unsubscribes, {fmt(c.get('subscription_checks'))} get_subscriptions checked "
        f"({c.get('subscription_mismatches', 0)} wrong) |",
        f"| gateway at the end | {fmt(st.get('active_connections'))} connections, "
        f"{fmt(st.get('connections_total'))} accepted in all, slow-consumer closes "
        f"{fmt(st.get('slow_consumer_closes'))}, timeouts {fmt(st.get('timeouts'))}, "
        f"open files {rows[-1]['open_files']} |",
        f"| CPU, % of a core | gateway worker {s['gateway_cpu_mean']:.0f} on average; other "
        f"processes on the machine {s['others_mean']:.0f} on average, {s['others_max']:.0f} at "
        f"most{', Redis included' if a.redis else ''} (noise: lag and latency spikes may be "
        f"theirs) |",
        f"| errors | clients got {c.get('errors') or 'none'}; connect failures "
        f"{c.get('connect_failures', 0)}; POST errors {len(s['publisher_errors'])} "
        f"({s['ambiguous']} events maybe published); gateway log: "
        f"{len(s['gateway_problems'])} errors, {s['gateway_warnings']} warnings |",
    ]
    if s["redis"] is not None:
        lines.append(f"| Redis | stream counter {s['redis'].get('seq')}, keys deleted: "
                     f"{', '.join(s['redis'].get('keys', []))} |")
    lines.append("")
    for title, items in (("Evidence (first of each kind)", s["examples"]),
                         ("POST errors", s["publisher_errors"]),
                         ("Gateway log errors", s["gateway_problems"][:EXAMPLES])):
        if items:
            lines += [f"{title}:", ""] + [f"    {x}" for x in items] + [""]
    lines.append(f"Samples: {os.path.relpath(base, ROOT)}.csv"
                 + (f"; plot: {os.path.relpath(base, ROOT)}.png" if plotted else
                    "; no plot (pip install -r benchmarks/requirements-soak.txt)"))
    return "\n".join(lines) + "\n"


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(path: str, rows: list[dict[str, Any]], s: dict[str, Any],
         a: argparse.Namespace) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no plot: matplotlib missing (pip install -r benchmarks/requirements-soak.txt)")
        return False
    run_rows = [r for r in rows if r["phase"] == "run"] or rows  # not the drain at the end
    minutes = [r["t_s"] / 60 for r in run_rows]
    warm = s["warmup_s"] / 60
    every = f"{a.sample_interval:g} s"

    def series(key: str) -> tuple[list[float], list[float]]:
        pairs = [(r["t_s"] / 60, float(r[key])) for r in run_rows if r[key] != ""]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    fig, axes = plt.subplots(4, 1, figsize=(11, 12), sharex=True,
                             gridspec_kw={"height_ratios": [3, 2, 2, 1.6]})
    ax_rss, ax_lag, ax_load, ax_cpu = axes
    verdict = "PASS" if not s["failures"] else f"FAIL ({'; '.join(s['failures'])[:70]})"
    fig.suptitle(f"SIGMAX soak: {a.clients} clients, {a.rate:g} alerts/s + "
                 f"{a.market_rate:g} market_update/s, {minutes[-1]:.0f} min"
                 f"{', Redis' if a.redis else ''}\n{verdict}: lost {s['lost']}, "
                 f"duplicated {s['duplicates']}, {s['clients'].get('reconnects', 0):,} "
                 f"reconnects, {s['clients'].get('resumes', 0):,} resumes", fontsize=12)
    for ax in axes:
        ax.axvspan(0, warm, color="0.92", zorder=0)
        ax.grid(alpha=0.3)

    t = s["trend"]
    ax_rss.plot(*series("rss_mb"), color="tab:blue", lw=1.5, label="gateway worker RSS")
    ax_rss.axvspan(0, 0, color="0.92", label=f"warm-up ({warm:.1f} min)")
    if t["slope_mb_per_10min"] is not None:
        xs = [m for m in minutes if m >= warm]
        ax_rss.plot(xs, [t["intercept"] + t["slope_mb_per_10min"] / 10 * m for m in xs], "--",
                    color="tab:red", lw=1.2,
                    label=f"fit after warm-up: {t['slope_mb_per_10min']:+.2f} MB / 10 min"
                          + ("" if s["judged"] else " (not judged)"))
    rss = series("rss_mb")[1] or [0.0]
    low, high = min(rss), max(rss)
    pad = max(5.0, 0.1 * (high - low))
    ax_rss.set_ylim(max(0.0, low - pad), high + pad)
    ax_rss.set_ylabel("RSS (MB)")
    ax_rss.legend(loc="lower right", fontsize=9)

    if s["lag_available"]:
        ax_lag.plot(*series("lag_interval_max_ms"), color="tab:orange", lw=1.2,
                    label=f"event-loop lag: max of the 1 s polls per {every}")
        ax_lag.plot(*series("lag_max_ms"), color="tab:red", lw=1, ls=":",
                    label="event-loop lag: max since start (every 100 ms tick)")
    else:
        ax_lag.text(0.01, 0.9, "event-loop lag not reported by this gateway",
                    transform=ax_lag.transAxes, fontsize=9)
    ax_lag.plot(*series("post_max_ms"), color="tab:green", lw=1,
                label=f"POST /api/events round trip: max per {every}")
    ax_lag.set_ylabel("ms")
    ax_lag.set_ylim(bottom=0)
    ax_lag.legend(loc="upper left", fontsize=9)

    ax_load.plot(*series("connections"), color="tab:blue", lw=1.2, label="open connections")
    ax_load.set_ylabel("connections")
    ax_load.set_ylim(0, max(series("connections")[1] or [1]) * 1.25)
    rate_ax = ax_load.twinx()
    rate_x, rate_y = [], []
    for before, after in zip(run_rows, run_rows[1:], strict=False):
        dt = after["t_s"] - before["t_s"]
        if dt > 0 and "" not in (after["deliveries"], before["deliveries"]):
            rate_x.append(after["t_s"] / 60)
            rate_y.append((after["deliveries"] - before["deliveries"]) / dt)
    rate_ax.plot(rate_x, rate_y, color="tab:purple", lw=1, label="deliveries / s (gateway)")
    rate_ax.set_ylabel("deliveries / s")
    rate_ax.set_ylim(0, max(rate_y or [1]) * 1.25)
    handles, labels = ax_load.get_legend_handles_labels()
    more_handles, more_labels = rate_ax.get_legend_handles_labels()
    ax_load.legend(handles + more_handles, labels + more_labels, loc="lower right", fontsize=9)

    ax_cpu.plot(*series("gateway_cpu_pct"), color="tab:blue", lw=1.2, label="gateway worker")
    ax_cpu.plot(*series("clients_cpu_pct"), color="tab:gray", lw=1,
                label="clients and driver")
    ax_cpu.plot(*series("others_cpu_pct"), color="tab:red", lw=1,
                label="everything else on the machine (noise)")
    ax_cpu.set_ylabel("CPU, % of a core")
    ax_cpu.set_ylim(bottom=0)
    ax_cpu.set_xlabel("minutes")
    ax_cpu.legend(loc="upper left", fontsize=9, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ================================================================== options
def parse_arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30, help="run length (default 30)")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--rate", type=float, default=20, help="alert events per second (default 20)")
    ap.add_argument("--market-rate", type=float, default=1,
                    help="market_update events per second, 0 = none (default 1)")
    ap.add_argument("--symbols", type=int, default=10, help="alert streams (default 10)")
    ap.add_argument("--topic-every", type=int, default=4,
                    help="every Nth client's core subscription is the topic alerts, the others "
                         "one symbol; 0 = all on symbols (default 4)")
    ap.add_argument("--churn-interval", type=float, default=5, help="seconds (default 5)")
    ap.add_argument("--subscribe-churn", type=float, default=0.1,
                    help="share of clients changing a subscription per interval (default 0.1)")
    ap.add_argument("--reconnect-churn", type=float, default=0.02,
                    help="share of clients reconnecting per interval (default 0.02)")
    ap.add_argument("--sample-interval", type=float, default=10, help="seconds (default 10)")
    ap.add_argument("--warmup", type=float, default=0.2,
                    help="share of the run before memory must be flat (default 0.2; never "
                         "before the resume history is full)")
    ap.add_argument("--max-growth-mb", type=float, default=5,
                    help="allowed RSS growth after warm-up, from the fitted slope (default 5)")
    ap.add_argument("--redis", action="store_true",
                    help="share the stream through Redis, under a REDIS_PREFIX of its own")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin the gateway to CPU 0 and the clients to CPU 1")
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv", "bin", "python"),
                    help="the gateway's interpreter (default the project venv)")
    ap.add_argument("--results", default=os.path.join(BENCH, "results"))
    ap.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for the gateway (repeatable)")
    a = ap.parse_args()
    if not 0 < a.minutes <= 24 * 60:
        ap.error("--minutes must be in (0, 1440]")
    if not 1 <= a.clients <= 20_000 or not 1 <= a.procs <= 16 or a.procs > a.clients:
        ap.error("--clients 1..20000, --procs 1..16 and at most --clients")
    if a.rate <= 0 or a.market_rate < 0 or not 1 <= a.symbols <= 100:
        ap.error("--rate > 0, --market-rate >= 0, --symbols 1..100")
    if not urls_are_local(a.redis_url):
        ap.error("--redis-url must point to 127.0.0.1 or localhost")
    for item in a.gateway_env:
        if "=" not in item or item.startswith("="):
            ap.error(f"--gateway-env {item!r}: expected NAME=VALUE")
    for name in ("HOST", "PORT", "REDIS_URL", "REDIS_PREFIX"):
        if any(item.startswith(name + "=") for item in a.gateway_env):
            ap.error(f"--gateway-env {name}: set by the script")
    a.python = os.path.abspath(a.python)
    if not os.path.exists(a.python):
        ap.error(f"{a.python} not found: run `make test` first")
    a.pin = a.pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    return a


def urls_are_local(url: str) -> bool:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")


if __name__ == "__main__":
    sys.exit(main())
