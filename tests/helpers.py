"""Test helpers: a real Hypercorn serving a fresh app on a free loopback port, a JSON client,
Hypercorn host processes, a redis-server of a test's own, and the services the suite needs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import pytest
import websockets
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from prometheus_client.parser import text_string_to_metric_families
from quart import Quart

from app import create_app
from app.services.database import migrate
from app.services.events import Event
from app.services.gateway import Gateway
from config import Config


@dataclass
class RunningGateway:
    app: Quart
    port: int

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/ws"

    @property
    def gateway(self) -> Gateway:
        return self.app.extensions["gateway"]

    async def publish(self, type_: str, data: Any, **routing: Any) -> Event:
        event = Event(type_, data, **routing)
        await self.gateway.bus.publish([event])
        return event

    @asynccontextmanager
    async def client(self, query: str = "", **options: Any) -> AsyncIterator[Client]:
        async with websockets.connect(self.url + query, **options) as ws:
            yield Client(ws)

    @asynccontextmanager
    async def subscribed(
        self, topics: list[str] | None = None, symbols: list[str] | None = None
    ) -> AsyncIterator[Client]:
        """A client past its greeting, subscribed and acknowledged."""
        async with self.client() as client:
            await client.greeting()
            await client.request("subscribe", {"topics": topics or [], "symbols": symbols or []})
            yield client


class Client:
    """A `websockets` connection speaking JSON, with helpers that read strictly in order."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._request_ids = 0
        self._skipped: list[dict[str, Any]] = []  # read while waiting for a reply

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        if self._skipped:
            return self._skipped.pop(0)
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def recv_event(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next message that is not a server heartbeat."""
        while True:
            message = await self.recv(timeout)
            if message["type"] != "ping":
                return message

    async def next_of(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next message of `type_`, skipping others (bounded by `timeout` overall)."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.recv(timeout)
                if message["type"] == type_:
                    return message

    async def command(self, name: str, **args: Any) -> dict[str, Any]:
        return await self.request("command", {"command": name, **args})

    async def greeting(self) -> dict[str, Any]:
        connected = await self.recv()
        assert connected["type"] == "connected", connected
        status = await self.recv()
        assert status["type"] == "system_status", status
        return connected

    async def request(self, type_: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a message with a fresh request_id and return the reply that echoes it."""
        self._request_ids += 1
        request_id = f"r{self._request_ids}"
        message: dict[str, Any] = {"type": type_, "request_id": request_id}
        if data is not None:
            message["data"] = data
        await self.send(message)
        while True:
            reply = json.loads(await asyncio.wait_for(self.ws.recv(), 5.0))
            if reply.get("request_id") == request_id:
                return reply
            self._skipped.append(reply)

    async def no_message(self, within: float = 0.3) -> None:
        with pytest.raises(asyncio.TimeoutError):
            message = await self.recv(within)
            raise AssertionError(f"unexpected message {message}")


def metric_families(text: str) -> dict[str, tuple[str, str, dict[tuple[str, tuple], float]]]:
    """A /metrics page as {name: (type, help, {(sample, sorted labels): value})}."""
    families = {}
    for family in text_string_to_metric_families(text):
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for sample in family.samples
        }
        families[family.name] = (family.type, family.documentation, samples)
    return families


def metric_value(
    families: dict[str, Any], name: str, sample: str | None = None, **labels: str
) -> float:
    """The sum of `name`'s samples (`sample`: e.g. its `_total`) whose labels include `labels`."""
    _, _, samples = families[name]
    wanted = sample or name
    return sum(
        v
        for (sample_name, sample_labels), v in samples.items()
        if sample_name == wanted and set(labels.items()) <= set(sample_labels)
    )


def free_socket(port: int = 0) -> socket.socket:
    """A listening loopback socket, on `port` or (0) on a free one."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    return sock


def free_port() -> int:
    """A loopback port where nothing listens (free when asked)."""
    sock = free_socket()
    port: int = sock.getsockname()[1]
    sock.close()
    return port


@asynccontextmanager
async def running_gateway(
    *, port: int | None = None, **settings: Any
) -> AsyncIterator[RunningGateway]:
    """A gateway on a fresh, migrated database (a new SQLite file unless DATABASE_URL is given),
    with the simulation off unless asked: tests publish what they need."""
    with tempfile.TemporaryDirectory() as folder:
        if "DATABASE_URL" not in settings:
            settings["DATABASE_URL"] = f"sqlite:///{folder}/gateway.db"
            await migrate(settings["DATABASE_URL"])
        settings.setdefault("SIMULATION", False)
        async with _serving(replace(Config(), **settings), port) as running:
            yield running


@asynccontextmanager
async def _serving(config: Config, port: int | None) -> AsyncIterator[RunningGateway]:
    """Serve on `port`, or on a free one: a gateway restarted on the port of the one before
    it finds its clients reconnecting."""
    app = create_app(config)
    sock = free_socket(port or 0)
    port = sock.getsockname()[1]
    hypercorn_config = HypercornConfig.from_mapping(
        {**config.hypercorn_settings(), "bind": [f"fd://{sock.detach()}"], "graceful_timeout": 1.0}
    )
    stop = asyncio.Event()
    server = asyncio.create_task(serve(app, hypercorn_config, shutdown_trigger=stop.wait))
    running = RunningGateway(app, port)
    async with asyncio.timeout(10):
        while not running.gateway.running:
            if server.done():
                server.result()  # the start-up failed: raise why
            await asyncio.sleep(0.005)
    try:
        yield running
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)


# Every end-to-end test runs on both write paths: straight to the transport, and ASGI send.
WRITE_PATHS = [pytest.param(True, id="fast-path"), pytest.param(False, id="asgi-send")]


# -- databases ---------------------------------------------------------------------------------

POSTGRES_URL = os.environ.get(
    "SIGMAX_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
# CI sets this: a test that needs PostgreSQL or Redis then fails instead of skipping.
REQUIRE_SERVICES = os.environ.get("SIGMAX_REQUIRE_SERVICES") == "1"


def unavailable(service: str, error: Exception) -> None:
    message = f"{service} is not reachable ({error})"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message}, and SIGMAX_REQUIRE_SERVICES=1 requires it")
    pytest.skip(message)


@asynccontextmanager
async def fresh_postgres() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    import asyncpg

    try:
        admin = await asyncpg.connect(POSTGRES_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as error:
        unavailable("PostgreSQL at " + POSTGRES_URL, error)
    name = f"sigmax_test_{uuid.uuid4().hex[:12]}"
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


REDIS_URL = os.environ.get("SIGMAX_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


# -- real Hypercorn processes -------------------------------------------------------------------

REPOSITORY = Path(__file__).resolve().parents[1]


def migrate_with_cli(env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app", "migrate"],
        cwd=REPOSITORY,
        env={**os.environ, **env},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def start_host(
    port: int, workers: int, env: dict[str, str], log: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    """`hypercorn -w N` with the repository's config, as a deployment runs it; its output goes
    to `log` (default: nowhere)."""
    output = log or subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "hypercorn", "--config", "file:hypercorn_config.py", "wsgi:app"],
        cwd=REPOSITORY,
        env={**os.environ, **env, "PORT": str(port), "WORKERS": str(workers)},
        stdout=output,
        stderr=output,
        start_new_session=True,
    )


@contextlib.contextmanager
def supervised(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m app supervise` with `env` (PORT, WORKERS, SIGMAX_RUN_DIR, ...), stopped as
    systemd stops it (SIGTERM to the group) when done."""
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "app", "supervise"],
        cwd=REPOSITORY,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield supervisor
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(supervisor.pid, signal.SIGTERM)
        try:
            supervisor.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait(timeout=10)


def rolling_restart(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m app rolling-restart` against the supervised workers of `env`."""
    return subprocess.run(
        [sys.executable, "-m", "app", "rolling-restart"],
        cwd=REPOSITORY,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def stop_host(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


async def connect_when_up(port: int) -> Client:
    """A client of the gateway on `port`, once it accepts connections (within 20 s)."""
    async with asyncio.timeout(20):
        while True:
            try:
                return Client(await websockets.connect(f"ws://127.0.0.1:{port}/api/ws"))
            except OSError:
                await asyncio.sleep(0.1)


class OwnRedis:
    """A redis-server of the test's own on `port`, which it can stop and start again; with a
    `directory`, it starts from the snapshot there (written by SAVE), if any."""

    def __init__(self, port: int, directory: Path | None = None) -> None:
        self.port = port
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        import redis.asyncio as aioredis

        snapshot = ["--dir", str(self.directory)] if self.directory is not None else []
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                *snapshot,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = aioredis.from_url(f"redis://127.0.0.1:{self.port}/0")
        try:
            async with asyncio.timeout(10):
                while True:
                    try:
                        await client.ping()
                        return
                    except Exception:
                        await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def kill(self) -> None:
        """SIGKILL: what was not saved is gone."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@asynccontextmanager
async def own_redis(directory: Path | None = None):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    redis = OwnRedis(port, directory)
    await redis.start()
    try:
        yield redis
    finally:
        redis.stop()


@asynccontextmanager
async def reader_paused(server):
    """The worker's stream reader stops (as when its process is descheduled or busy), then
    reads on from where it was."""
    bus = server.gateway.bus
    reader = bus._tasks[0]
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    try:
        yield
    finally:
        bus._tasks[0] = asyncio.create_task(bus._consume())


def install_npm_packages(npm: str, folder: Path) -> None:
    """`npm ci` in `folder` when its node_modules is missing or older than package-lock.json."""
    lock = folder / "package-lock.json"
    installed = folder / "node_modules" / ".package-lock.json"  # written by every npm install
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
