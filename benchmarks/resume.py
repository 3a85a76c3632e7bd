"""How long a resume of 100,000 events takes from the archive, against the same resume from the
hot history (the reference, in the same run), and how long the NDJSON export of them takes.

For each source a fresh gateway (Hypercorn, one worker, pinned to CPU 0, a fresh SQLite
database) gets N alerts through POST /api/events; once the archive holds them all, one client
(pinned to CPU 1 with this script) connects, subscribes to `alerts` with `since=0` and reads
until it has every event, checking that the seqs run 1..N with no gap and no duplicate. The
hot-history run keeps all N in EVENT_HISTORY_SIZE; the archive run keeps 1,000, so the resume
reads the archive first. Loopback only; every wait is bounded.

    python benchmarks/resume.py                 # 100,000 events, each source once
    python benchmarks/resume.py --events 20000 --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import websockets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_CPU, CLIENT_CPU = "0", "1"
BATCH = 1000
TIMEOUT = 300.0  # seconds for any one phase


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_gateway(python: str, workdir: str, history_size: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WORKERS": "1",
        "SIMULATION": "0",
        "REDIS_URL": "",
        "API_KEYS": "",
        "LOG_LEVEL": "WARNING",
        "DATABASE_URL": f"sqlite:///{workdir}/gateway-{history_size}.db",
        "EVENT_HISTORY_SIZE": str(history_size),
        "EVENT_HISTORY_MAX_AGE": "3600",
        "WS_SEND_QUEUE_SIZE": "1000",
    }
    subprocess.run([python, "-m", "app", "migrate"], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, timeout=120)
    hypercorn = os.path.join(os.path.dirname(python), "hypercorn")
    process = subprocess.Popen(
        ["taskset", "-c", SERVER_CPU, hypercorn, "--config", "file:hypercorn_config.py", "wsgi:app"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                return process, port
        except OSError:
            time.sleep(0.1)
    stop(process)
    raise RuntimeError("the gateway did not start")


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


def publish(port: int, count: int) -> None:
    for first in range(0, count, BATCH):
        events = [
            {"type": "alert", "data": {"level": "info", "message": "resume bench", "n": n}}
            for n in range(first, min(first + BATCH, count))
        ]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/events",
            data=json.dumps({"events": events}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()


def wait_archived(port: int, count: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        url = f"http://127.0.0.1:{port}/api/events?since={count - 1}"
        with urllib.request.urlopen(url, timeout=10) as response:
            if response.read().strip():
                return
        time.sleep(0.2)
    raise RuntimeError("the archive did not get every event")


async def resume(port: int, count: int) -> float:
    """Seconds from the subscribe to the last replayed event, all seqs checked."""
    async with websockets.connect(f"ws://127.0.0.1:{port}/api/ws", max_size=None) as ws:
        for _ in range(2):  # connected, system_status
            await ws.recv()
        started = time.perf_counter()
        await ws.send(json.dumps({"type": "subscribe", "request_id": "r",
                                  "data": {"topics": ["alerts"], "since": 0}}))
        expected = 1
        async with asyncio.timeout(TIMEOUT):
            while expected <= count:
                message = json.loads(await ws.recv())
                if message.get("request_id") == "r":
                    if not message["data"].get("recovered"):
                        raise RuntimeError(f"not recovered: {message['data']}")
                    continue
                if "seq" not in message:
                    continue
                if message["seq"] != expected:
                    raise RuntimeError(f"seq {message['seq']} where {expected} was due")
                expected += 1
        return time.perf_counter() - started


def export(port: int, count: int) -> float:
    started = time.perf_counter()
    lines = 0
    url = f"http://127.0.0.1:{port}/api/events?limit={count}"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        while chunk := response.read(1 << 16):
            lines += chunk.count(b"\n")
    if lines != count:
        raise RuntimeError(f"the export had {lines} lines, not {count}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    args = parser.parse_args()
    os.sched_setaffinity(0, {int(CLIENT_CPU)})
    results: dict[str, list[float]] = {"hot history": [], "archive": [], "export": []}
    with tempfile.TemporaryDirectory() as workdir:
        for rep in range(args.reps):
            for source, history_size in (("hot history", args.events + 1000), ("archive", 1000)):
                process, port = start_gateway(args.python, f"{workdir}", history_size)
                try:
                    publish(port, args.events)
                    wait_archived(port, args.events)
                    seconds = asyncio.run(resume(port, args.events))
                    results[source].append(seconds)
                    print(f"rep {rep + 1} {source}: resume of {args.events} events in "
                          f"{seconds:.2f} s ({args.events / seconds:,.0f} events/s)", flush=True)
                    if source == "archive":
                        seconds = export(port, args.events)
                        results["export"].append(seconds)
                        print(f"rep {rep + 1} export: {args.events} lines in {seconds:.2f} s",
                              flush=True)
                finally:
                    stop(process)
                os.remove(f"{workdir}/gateway-{history_size}.db")
    hot, archive = (statistics.median(results[k]) for k in ("hot history", "archive"))
    print(f"median resume of {args.events} events: archive {archive:.2f} s, hot history "
          f"{hot:.2f} s (reference): {archive / hot:.2f}x; export "
          f"{statistics.median(results['export']):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
