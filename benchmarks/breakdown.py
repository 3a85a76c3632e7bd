#!/usr/bin/env python3
"""Where a connection's bytes, objects and garbage come from, and what a full collection costs.

    python benchmarks/breakdown.py                    # 1000 clients
    python benchmarks/breakdown.py --clients 5000 --history 10000

Runs one gateway (Hypercorn's asyncio worker, the real app, SIMULATION off, a fresh SQLite file)
inside this script's child process with tracemalloc on, and drives it from this process with
plain `websockets` clients on loopback. Measured in the server, after `gc.collect()` each time:

- bytes per idle subscribed connection, by the package that allocated them (tracemalloc: the
  innermost frame outside the standard library), and the GC-tracked objects it added, by type;
- what the closed connections left: objects freed only by a full collection (reference cycles)
  per closed connection, and the tracked objects still there after that;
- the pause of one full collection with the connections open and the resume history full.

Not a pass/fail benchmark: the numbers for benchmarks/README.md (PERF notes).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = (os.path.dirname(os.__file__), "<frozen", "<unknown>")


def package_of(filename: str) -> str:
    """`quart`, `hypercorn`, `app/services`, ... for a source file; `stdlib:<module>` else."""
    if "site-packages" in filename:
        return filename.split("site-packages" + os.sep, 1)[1].split(os.sep, 1)[0]
    if filename == os.path.abspath(__file__):
        return ""
    if filename.startswith(ROOT):
        return os.path.dirname(os.path.relpath(filename, ROOT)) or os.path.basename(filename)
    return ""


def owner(trace: tracemalloc.Traceback) -> tuple[str, str]:
    """The innermost frame that is not the standard library, who asked for the memory: its
    package and its line."""
    for frame in reversed(trace):  # the most recent call first
        package = package_of(frame.filename)
        if package:
            return package, f"{os.path.basename(frame.filename)}:{frame.lineno}"
    frame = trace[-1]
    name = os.path.basename(frame.filename)
    return "stdlib:" + name, f"{name}:{frame.lineno}"


def tracked_counts() -> collections.Counter[str]:
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


# -- the server (child process) ------------------------------------------------------------


async def serve(port: int) -> None:
    sys.path.insert(0, ROOT)
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config as HypercornConfig

    from config import Config
    from wsgi import app

    settings = Config.from_env().hypercorn_settings()
    settings["bind"] = [f"127.0.0.1:{port}"]
    settings["workers"] = 1
    config = HypercornConfig.from_mapping(settings)
    stop = asyncio.Event()
    server = asyncio.create_task(hypercorn_serve(app, config, shutdown_trigger=stop.wait))
    loop = asyncio.get_running_loop()
    marks: dict[str, tuple[tracemalloc.Snapshot, collections.Counter[str], int]] = {}

    def answer(value: object) -> None:
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()

    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
        if not line or line[0] == "quit":
            break
        command, args = line[0], line[1:]
        if command == "mark":
            if not tracemalloc.is_tracing():
                # From the first mark on: a snapshot of every start-up allocation takes a minute.
                tracemalloc.start(12)
            gc.collect()
            counts, tracked = tracked_counts(), len(gc.get_objects())  # before the snapshot exists
            marks[args[0]] = (tracemalloc.take_snapshot(), counts, tracked)
            answer({"ok": True})
        elif command == "diff":  # diff BEFORE AFTER PER [DROP...]
            before, after, per = marks[args[0]], marks[args[1]], int(args[2])
            by_owner: collections.Counter[str] = collections.Counter()
            by_line: collections.Counter[str] = collections.Counter()
            stats = after[0].compare_to(before[0], "traceback")
            biggest = [
                {"bytes_per": round(stat.size_diff / per), "count_per": stat.count_diff / per,
                 "at": [f"{os.path.basename(f.filename)}:{f.lineno}" for f in stat.traceback][-6:]}
                for stat in stats[:8]
            ]
            for stat in stats:
                package, line = owner(stat.traceback)
                by_owner[package] += stat.size_diff
                by_line[line] += stat.size_diff
            types = after[1] - before[1]
            # A snapshot holds a tuple per trace: none may be alive in a timed collection.
            for name in args[1:2] + args[3:]:
                del marks[name]
            answer(
                {
                    "bytes_per": {k: round(v / per) for k, v in by_owner.most_common(14)},
                    "total_bytes_per": round(sum(by_owner.values()) / per),
                    "lines_per": {k: round(v / per) for k, v in by_line.most_common(40)},
                    "biggest": biggest,
                    "tracked_per": round((after[2] - before[2]) / per, 1),
                    "types_per": {k: round(v / per, 2) for k, v in types.most_common(25)},
                }
            )
        elif command == "gcoff":  # until `garbage`: cycles stay for it to count
            gc.collect()
            gc.disable()
            answer({"ok": True})
        elif command == "garbage":  # objects in cycles, freed only by a collection
            gc.set_debug(gc.DEBUG_SAVEALL)
            found = gc.collect()
            kinds = collections.Counter(type(o).__qualname__ for o in gc.garbage)
            gc.garbage.clear()
            gc.set_debug(0)
            gc.enable()
            answer({"unreachable": found, "types": dict(kinds.most_common(25))})
        elif command == "pause":  # one full collection, timed (a collection allocates nothing)
            gc.collect()
            started = time.perf_counter()
            gc.collect()
            pause = time.perf_counter() - started
            answer({"full_collection_ms": round(pause * 1000, 2), "tracked": len(gc.get_objects())})
        elif command == "rss":
            import psutil

            answer({"rss": psutil.Process().memory_info().rss})
    stop.set()
    await server


# -- the driver --------------------------------------------------------------------------


class Server:
    def __init__(self, port: int, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

    def ask(self, *words: object) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        try:
            self.ask("quit")
        except (BrokenPipeError, ValueError):
            pass
        self.proc.wait(30)


async def connect(url: str, count: int, deflate: bool, concurrency: int = 100) -> list:
    from websockets.asyncio.client import connect as ws_connect

    gate = asyncio.Semaphore(concurrency)

    async def one(i: int):
        async with gate:
            ws = await ws_connect(url, max_queue=None, ping_interval=None, open_timeout=60,
                                  compression="deflate" if deflate else None)
            await ws.recv()  # connected
            await ws.recv()  # system_status
            await ws.send(json.dumps({"type": "subscribe", "data": {"topics": ["market"]},
                                      "request_id": i}))
            while json.loads(await ws.recv())["type"] != "subscribed":
                pass
            return ws

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def publish(base: str, count: int) -> None:
    """`count` market_updates with three entries each, the shape of the simulator's."""
    for start in range(0, count, 500):
        events = [
            {
                "type": "market_update",
                "data": [
                    {"symbol": s, "price": 100.0 + n, "volume_24h": 1e6, "change_24h": 0.5}
                    for s in ("BTC/USDT", "ETH/USDT", "SOL/USDT")
                ],
            }
            for n in range(start, min(count, start + 500))
        ]
        request = urllib.request.Request(
            base + "/api/events",
            data=json.dumps({"events": events}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=30).read()


def wait_up(base: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(base + "/api/health", timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the gateway did not start")


def wait_connections(base: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = json.loads(urllib.request.urlopen(base + "/api/ws/stats", timeout=5).read())
        if stats["active_connections"] == count:
            return
        time.sleep(0.2)
    raise SystemExit(f"the gateway did not reach {count} connections")


async def drive(args: argparse.Namespace) -> dict:
    sys.path.insert(0, ROOT)
    from tests.helpers import free_port

    port = free_port()
    base, url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/api/ws"
    workdir = tempfile.mkdtemp(prefix="sigmax-breakdown-")
    env = dict(os.environ, SIMULATION="false", HOST="127.0.0.1", PORT=str(port),
               WS_MAX_CONNECTIONS=str(args.clients + 100), GC_INTERVAL="0",
               DATABASE_URL=f"sqlite:///{workdir}/gateway.db", LOG_LEVEL="WARNING")
    env.update(kv.split("=", 1) for kv in args.gateway_env)
    subprocess.run([sys.executable, "-m", "app", "migrate"], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    server = Server(port, env)
    report: dict = {"clients": args.clients, "history": args.history, "deflate": args.deflate}
    try:
        wait_up(base)
        warm = await connect(url, 20, args.deflate)  # one-time costs of a first connection
        for ws in warm:
            await ws.close()
        wait_connections(base, 0)
        # The history first: the clients need not read it, and it is not theirs to count.
        publish(base, args.history)
        server.ask("mark", "empty")
        clients = await connect(url, args.clients, args.deflate)
        wait_connections(base, args.clients)
        server.ask("mark", "open")
        report["open"] = server.ask("diff", "empty", "open", args.clients)
        report["pause_open"] = server.ask("pause")
        server.ask("gcoff")
        for ws in clients:
            await ws.close()
        wait_connections(base, 0)
        await asyncio.sleep(0.5)
        garbage = server.ask("garbage")
        per = args.clients
        report["closed"] = {
            "unreachable_per_closed": round(garbage["unreachable"] / per, 1),
            "types_per_closed": {k: round(v / per, 2) for k, v in garbage["types"].items()},
        }
        server.ask("mark", "closed")
        report["left_after_close"] = server.ask("diff", "empty", "closed", args.clients, "empty")
        report["pause_closed"] = server.ask("pause")
    finally:
        server.stop()
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--history", type=int, default=10_000,
                    help="market_updates published before the timed collection (fills history)")
    ap.add_argument("--deflate", action="store_true",
                    help="clients offer permessage-deflate, as `websockets` (the Python client) "
                         "does by default; without, as the benchmark's load generator")
    ap.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    print(json.dumps(asyncio.run(drive(args)), indent=2))


if __name__ == "__main__":
    main()
