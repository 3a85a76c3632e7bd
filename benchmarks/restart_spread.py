"""How clients spread over the supervised workers before and after a rolling restart.

    python benchmarks/restart_spread.py [--workers 3] [--clients 30]

Serves the gateway as `python -m app supervise` (WORKERS on one socket, Redis on
127.0.0.1:6379 under a prefix of its own, a fresh SQLite database), connects the clients (each
reconnects 0.5 s after its connection closes, as the Python client does), counts the clients of
each worker, runs `python -m app rolling-restart`, and counts again once every client is back.
Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import websockets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def client(port: int, where: dict[int, str], number: int, stop: asyncio.Event) -> None:
    """Stay connected; record the worker serving this client; reconnect after a close."""
    while not stop.is_set():
        try:
            async with websockets.connect(f"ws://127.0.0.1:{port}/api/ws", open_timeout=5) as ws:
                where[number] = json.loads(await ws.recv())["data"]["worker"]
                while not stop.is_set():
                    try:
                        await asyncio.wait_for(ws.recv(), 1)
                    except TimeoutError:
                        await ws.send(json.dumps({"type": "pong"}))
        except (OSError, websockets.WebSocketException, TimeoutError):
            pass
        where.pop(number, None)
        await asyncio.sleep(0.5)


async def every_worker_up(port: int, workers: int, timeout: float = 60) -> None:
    """Until `workers` distinct workers have greeted a connection."""
    seen: set[str] = set()
    async with asyncio.timeout(timeout):
        while len(seen) < workers:
            try:
                async with websockets.connect(f"ws://127.0.0.1:{port}/api/ws") as ws:
                    seen.add(json.loads(await ws.recv())["data"]["worker"])
            except (OSError, websockets.WebSocketException):
                await asyncio.sleep(0.2)


def spread(where: dict[int, str]) -> list[int]:
    return sorted(collections.Counter(where.values()).values(), reverse=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--clients", type=int, default=30)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="sigmax-spread-")
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "REDIS_PREFIX": f"spread-{uuid.uuid4().hex[:8]}",
        "DATABASE_URL": f"sqlite:///{folder}/spread.db",
        "SIMULATION": "false",
        "LOG_LEVEL": "WARNING",
        "PORT": str(port),
        "WORKERS": str(args.workers),
        "SIGMAX_RUN_DIR": f"{folder}/run",
    }
    subprocess.run([sys.executable, "-m", "app", "migrate"], cwd=ROOT, env=env, check=True)
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "app", "supervise"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    stop = asyncio.Event()
    where: dict[int, str] = {}
    tasks = []
    try:
        await every_worker_up(port, args.workers)
        for number in range(args.clients):
            tasks.append(asyncio.create_task(client(port, where, number, stop)))
            await asyncio.sleep(0.05)
        async with asyncio.timeout(30):
            while len(where) < args.clients:
                await asyncio.sleep(0.1)
        before = spread(where)
        started = time.monotonic()
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "app", "rolling-restart"],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=300,
        )
        took = time.monotonic() - started
        await asyncio.sleep(2)
        async with asyncio.timeout(30):
            while len(where) < args.clients:
                await asyncio.sleep(0.1)
        after = spread(where)
        print(f"{args.clients} clients on {args.workers} supervised workers")
        print(f"before the rolling restart: {before} clients per worker")
        print(f"after it ({took:.1f} s):      {after} clients per worker")
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        os.killpg(supervisor.pid, signal.SIGTERM)
        supervisor.wait(timeout=30)


if __name__ == "__main__":
    asyncio.run(main())
