"""Real servers of a test's own for fault tests, on free loopback ports: a PostgreSQL that can
crash and start again, a Redis Sentinel deployment and a Redis Cluster whose masters can be
killed. Every wait is bounded; on exit every process left is SIGKILLed and its files removed,
even when the test failed. A missing binary skips the test (fails it when
SIGMAX_REQUIRE_SERVICES=1), as `helpers.unavailable` does for a service."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.helpers import REQUIRE_SERVICES, free_port, free_socket

LOOPBACK = "127.0.0.1"


def _missing(what: str) -> NoReturn:
    message = f"{what} is not installed"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message}, and SIGMAX_REQUIRE_SERVICES=1 requires it")
    pytest.skip(message)


def _binary(name: str) -> str:
    """The absolute path of `name`, on PATH or in /usr/local/bin (where PostgreSQL's tools are):
    absolute, since `runuser` resets PATH."""
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/bin"]))
    if path is None:
        _missing(name)
    return path


def _free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports where nothing listens (held open together while picked,
    so no two are the same)."""
    sockets = [free_socket() for _ in range(count)]
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class ServerExited(RuntimeError):
    """A server a test waits for has exited: waiting on is pointless."""


async def _until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll `check` every 20 ms until it returns True; raises TimeoutError saying `what` was not
    reached (and the last error `check` raised, e.g. connection refused) after `timeout` s."""
    last_error: Exception | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    if await check():
                        return
                    last_error = None
                except ServerExited:
                    raise
                except Exception as error:  # not there yet: refused, loading, reset
                    last_error = error
                await asyncio.sleep(0.02)
    except TimeoutError:
        cause = f" (last error: {last_error!r})" if last_error else ""
        raise TimeoutError(f"not {what} within {timeout} s{cause}") from None


def _tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log, to say why a server did not start."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"\n--- {path.name}:\n" + "\n".join(text)


# -- PostgreSQL ---------------------------------------------------------------------------------


def _as_postgres() -> list[str]:
    """The prefix that runs a PostgreSQL tool as the postgres OS user: they refuse root."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class OwnPostgres:
    """A PostgreSQL server of the test's own: its own data directory, on a free loopback port,
    with a database `test`. The test can crash it (`stop_immediate`) and start it again on the
    same port and data (crash recovery). The tools run in a thread: the test's event loop keeps
    serving its other tasks meanwhile."""

    def __init__(self, directory: Path, port: int, initdb: str, pg_ctl: str) -> None:
        self.directory = directory
        self.port = port
        self.data = directory / "data"
        self.log_path = directory / "postgres.log"
        self._initdb = initdb
        self._pg_ctl = pg_ctl

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/test"

    @property
    def admin_url(self) -> str:
        """The `postgres` database, there before `test` is."""
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"

    def _run(self, *command: str, timeout: float) -> None:
        done = subprocess.run(
            [*_as_postgres(), *command],
            cwd=self.directory,  # one the postgres user may enter
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
                + _tail(self.log_path)
            )

    async def create(self) -> None:
        """initdb (trust, C locale, UTF8), start, and create the database `test`."""
        import asyncpg

        await asyncio.to_thread(
            self._run,
            self._initdb,
            "--pgdata",
            str(self.data),
            "--username=postgres",
            "--auth=trust",
            "--locale=C",
            "--encoding=UTF8",
            "--no-sync",
            timeout=60,
        )
        await self.start()
        admin = await asyncpg.connect(self.admin_url, timeout=5)
        try:
            await admin.execute("CREATE DATABASE test")
        finally:
            await admin.close()

    async def start(self) -> None:
        """Start on the same port and data, and return once it accepts connections."""
        import asyncpg

        options = f"-p {self.port} -k {self.directory} -c listen_addresses={LOOPBACK} -c fsync=off"
        await asyncio.to_thread(
            self._run,
            self._pg_ctl,
            "--pgdata",
            str(self.data),
            "-o",
            options,
            "--log",
            str(self.log_path),
            "--wait",
            "--timeout=30",
            "start",
            timeout=40,
        )

        async def accepts() -> bool:
            connection = await asyncpg.connect(self.admin_url, timeout=1)
            await connection.close()
            return True

        try:
            await _until(accepts, 30, "accepting connections")
        except TimeoutError as error:
            raise TimeoutError(
                f"PostgreSQL on {self.port}: {error}{_tail(self.log_path)}"
            ) from None

    async def stop_immediate(self) -> None:
        """A crash: `pg_ctl -m immediate stop` (no checkpoint, clients cut off)."""
        await asyncio.to_thread(self._stop_immediate)

    def _stop_immediate(self) -> None:
        self._run(
            self._pg_ctl,
            "--pgdata",
            str(self.data),
            "--mode=immediate",
            "--wait",
            "--timeout=20",
            "stop",
            timeout=30,
        )

    def kill(self) -> None:
        """Stop the server if it runs (immediate), and SIGKILL what is left of it."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(OSError, subprocess.SubprocessError, RuntimeError):
                self._stop_immediate()
        pid = self._postmaster_pid()
        if pid is not None:  # still there: pg_ctl could not stop it
            # pg_ctl starts the postmaster in a session of its own, with its backends
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None


@asynccontextmanager
async def own_postgres() -> AsyncIterator[OwnPostgres]:
    """A fresh PostgreSQL server for one test (about 1 s to start), removed afterwards."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    _binary("postgres")  # pg_ctl runs the one next to it: say so when it is missing
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            _missing("the postgres OS user (PostgreSQL refuses to run as root)")
    # Under /tmp, which the postgres user can reach (TMPDIR may not be), and short enough for
    # the Unix socket's path.
    with tempfile.TemporaryDirectory(
        prefix="sigmax-postgres-", dir="/tmp", ignore_cleanup_errors=True
    ) as folder:
        if owner is not None:
            os.chown(folder, owner.pw_uid, owner.pw_gid)
        postgres = OwnPostgres(Path(folder), free_port(), initdb, pg_ctl)
        try:
            await postgres.create()
            yield postgres
        finally:
            postgres.kill()


# -- Redis --------------------------------------------------------------------------------------


async def _command(port: int, *args: Any) -> Any:
    """One command to the redis-server on `port`, on a connection of its own, its reply raw
    (RESP2, decoded): no retries, a few seconds at most even when the server hangs."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    client = aioredis.Redis(
        host=LOOPBACK,
        port=port,
        decode_responses=True,
        socket_connect_timeout=1,
        socket_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )
    client.response_callbacks = {}  # as the server replies, the same for every redis-py
    try:
        return await client.execute_command(*args)
    finally:
        await client.aclose()


def _fields(text: str) -> dict[str, str]:
    """`INFO` or `CLUSTER INFO` as {field: value}."""
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and line[0] != "#")


def _online_replicas(replication: dict[str, str]) -> int:
    """How many replicas `INFO replication` of a master shows with state=online."""
    return sum(
        1
        for field, value in replication.items()
        if field.startswith("slave") and field[5:].isdigit() and "state=online" in value.split(",")
    )


def _pairs(flat: list[Any]) -> dict[str, Any]:
    """A reply of alternating names and values (`SENTINEL replicas`' entries) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _healthy(flags: str) -> bool:
    """A Sentinel's `flags` of an instance it is connected to and does not think down."""
    return not {"s_down", "o_down", "disconnected"} & set(flags.split(","))


class _RedisProcesses:
    """redis-server processes by port, with their files in `directory`; `kill_all` ends every
    one that is left."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def start(
        self, port: int, *options: str, config: Path | None = None, directory: Path | None = None
    ) -> None:
        """redis-server on 127.0.0.1:`port` without persistence, working in `directory` (default:
        the shared one) and logging to a file of its own there; diskless replication without
        delay, so that replicas sync at once."""
        log = self.directory / f"redis-{port}.log"
        command = [self.binary, *([str(config)] if config else []), *options]
        command += ["--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
        command += ["--dir", str(directory or self.directory), "--logfile", str(log)]
        command += ["--repl-diskless-sync-delay", "0"]
        self.processes[port] = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def alive(self) -> list[int]:
        return [port for port, process in self.processes.items() if process.poll() is None]

    async def wait_answering(self, ports: Iterable[int], timeout: float = 10) -> None:
        """Until each server on `ports` answers PING; fails at once when one has exited."""

        async def answers(port: int) -> None:
            async def pong() -> bool:
                if self.processes[port].poll() is not None:
                    raise ServerExited(f"redis-server on {port} exited" + self.log_tail(port))
                return await _command(port, "PING") == "PONG"

            await _until(pong, timeout, f"answering on port {port}")

        await asyncio.gather(*(answers(port) for port in ports))

    async def kill(self, port: int) -> None:
        """SIGKILL the server on `port` (a crash: no shutdown, no save)."""
        process = self.processes[port]
        process.kill()
        await asyncio.to_thread(process.wait, 10)

    def kill_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)

    def log_tail(self, port: int) -> str:
        return _tail(self.directory / f"redis-{port}.log")


async def _role(port: int) -> str:
    return _fields(await _command(port, "INFO", "replication")).get("role", "")


async def _one_new_master(named: set[int], old_port: int) -> int:
    """The port all observers name as master, when it is not `old_port` and that server says
    it is master; else 0."""
    if len(named) != 1 or old_port in named:
        return 0
    (port,) = named
    return port if await _role(port) == "master" else 0


class SentinelDeployment:
    """A Redis master with 2 replicas, watched by 3 Sentinels as `sigmax` (quorum 2, down after
    1 s): kill the master and a replica takes over within seconds."""

    master_name = "sigmax"

    def __init__(self, redis_server: str, directory: Path) -> None:
        self.redis = _RedisProcesses(redis_server, directory)
        self.first_master_port, *self.replica_ports = _free_ports(3)
        self.sentinel_ports = _free_ports(3)

    @property
    def sentinels(self) -> str:
        """The Sentinels as a setting lists them: "127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3"."""
        return ",".join(f"{LOOPBACK}:{port}" for port in self.sentinel_ports)

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """[(host, port)] of the Sentinels, as redis-py's `Sentinel` takes them."""
        return [(LOOPBACK, port) for port in self.sentinel_ports]

    async def start(self) -> None:
        """The master and replicas first: a Sentinel sees the replicas in sync in its first INFO
        of them, instead of up to 10 s later."""
        self.redis.start(self.first_master_port)
        for port in self.replica_ports:
            self.redis.start(port, "--replicaof", LOOPBACK, str(self.first_master_port))
        await self.redis.wait_answering([self.first_master_port, *self.replica_ports])

        async def replicas_in_sync() -> bool:
            replication = _fields(await _command(self.first_master_port, "INFO", "replication"))
            return _online_replicas(replication) == len(self.replica_ports)

        await _until(replicas_in_sync, 20, "both replicas in sync")
        sentinel_ids = {port: secrets.token_hex(20) for port in self.sentinel_ports}
        for port in self.sentinel_ports:
            config = self.redis.directory / f"sentinel-{port}.conf"
            config.write_text(self._sentinel_config(port, sentinel_ids))
            self.redis.start(port, "--sentinel", config=config)
        await self.redis.wait_answering(self.sentinel_ports)
        # A Sentinel that found another not yet listening retries after its ping period (1 s):
        # 0.1 s while they start (SENTINEL DEBUG, Redis 7), the default again once ready.
        await self._set_ping_period(100)
        await self.wait_ready()
        await self._set_ping_period(1000)

    async def _set_ping_period(self, milliseconds: int) -> None:
        from redis.exceptions import ResponseError

        with contextlib.suppress(ResponseError):  # before Redis 7: the default, 1 s
            for port in self.sentinel_ports:
                await _command(port, "SENTINEL", "DEBUG", "ping-period", milliseconds)

    def _sentinel_config(self, port: int, sentinel_ids: dict[int, str]) -> str:
        """A Sentinel's config file (it rewrites it: it must be writable). It names the
        replicas and the other Sentinels it would otherwise find in up to 2 s (hello messages),
        as a restarted Sentinel's file does."""
        name, master = self.master_name, self.first_master_port
        lines = [
            f"sentinel myid {sentinel_ids[port]}",
            f"sentinel monitor {name} {LOOPBACK} {master} 2",
            f"sentinel down-after-milliseconds {name} 1000",
            f"sentinel failover-timeout {name} 5000",
            f"sentinel parallel-syncs {name} 1",
            *(f"sentinel known-replica {name} {LOOPBACK} {p}" for p in self.replica_ports),
            *(
                f"sentinel known-sentinel {name} {LOOPBACK} {other} {other_id}"
                for other, other_id in sentinel_ids.items()
                if other != port
            ),
        ]
        return "\n".join(lines) + "\n"

    async def wait_ready(self, timeout: float = 20) -> None:
        """Until every Sentinel is connected to the master, to both replicas (in sync) and to
        the other Sentinels: only then is a failover sure to follow the master's death."""

        async def knows_all(port: int) -> bool:
            master = _pairs(await _command(port, "SENTINEL", "MASTER", self.master_name))
            replicas = [
                _pairs(entry)
                for entry in await _command(port, "SENTINEL", "REPLICAS", self.master_name)
            ]
            sentinels = [
                _pairs(entry)
                for entry in await _command(port, "SENTINEL", "SENTINELS", self.master_name)
            ]
            return (
                _healthy(master["flags"])
                and len(replicas) == 2
                and all(_healthy(r["flags"]) and r["master-link-status"] == "ok" for r in replicas)
                and len(sentinels) == 2
                and all(_healthy(s["flags"]) for s in sentinels)
            )

        await asyncio.gather(
            *(
                _until(partial(knows_all, port), timeout, f"Sentinel {port} ready")
                for port in self.sentinel_ports
            )
        )

    async def _master_named_by(self, sentinel_port: int) -> int:
        _host, port = await _command(
            sentinel_port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
        )
        return int(port)

    async def master_port(self) -> int:
        """The port of the master, as the first Sentinel that answers names it."""
        errors = []
        for sentinel_port in self.sentinel_ports:
            try:
                return await self._master_named_by(sentinel_port)
            except Exception as error:
                errors.append(error)
        raise RuntimeError(f"no Sentinel named the master: {errors}")

    async def kill_master(self) -> int:
        """SIGKILL the server the Sentinels name as master; returns its port."""
        port = await self.master_port()
        await self.redis.kill(port)
        return port

    async def wait_for_new_master(self, old_port: int, timeout: float = 30) -> int:
        """Until every Sentinel names the same master other than `old_port` and that server
        says it is master; returns its port."""
        new_port = 0

        async def failed_over() -> bool:
            nonlocal new_port
            named = {await self._master_named_by(port) for port in self.sentinel_ports}
            new_port = await _one_new_master(named, old_port)
            return bool(new_port)

        await _until(failed_over, timeout, f"failed over from {old_port}")
        return new_port


@asynccontextmanager
async def own_sentinel() -> AsyncIterator[SentinelDeployment]:
    """A Sentinel deployment of the test's own, ready to fail over (about 0.3 s to start)."""
    redis_server = _binary("redis-server")
    with tempfile.TemporaryDirectory(
        prefix="sigmax-sentinel-", ignore_cleanup_errors=True
    ) as folder:
        deployment = SentinelDeployment(redis_server, Path(folder))
        try:
            await deployment.start()
            yield deployment
        finally:
            deployment.redis.kill_all()


class ClusterDeployment:
    """A Redis Cluster of 3 masters with a replica each (node timeout 1 s): kill a master and
    its replica takes over its slots within seconds."""

    def __init__(self, redis_server: str, redis_cli: str, directory: Path) -> None:
        self.redis = _RedisProcesses(redis_server, directory)
        self.redis_cli = redis_cli
        ports = _free_ports(12)
        # The cluster bus is set apart: port + 10000, its default, may be taken or past 65535.
        self.ports, self.bus_ports = ports[:6], ports[6:]

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.ports[0]}/0"

    async def start(self) -> None:
        for port, bus_port in zip(self.ports, self.bus_ports, strict=True):
            nodes_file = self.redis.directory / f"nodes-{port}.conf"
            node_directory = self.redis.directory / str(port)
            node_directory.mkdir()
            self.redis.start(
                port,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(nodes_file),
                "--cluster-node-timeout",
                "1000",
                "--cluster-port",
                str(bus_port),
                directory=node_directory,
            )
        await self.redis.wait_answering(self.ports)
        done = await asyncio.to_thread(
            subprocess.run,
            [
                self.redis_cli,
                "--cluster",
                "create",
                *(f"{LOOPBACK}:{port}" for port in self.ports),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
        await self.wait_ready()

    async def wait_ready(self, timeout: float = 30) -> None:
        """Until every node says cluster_state:ok and knows all 6 nodes, connected and none
        failing: 3 masters with slots, each with a replica in sync. Only then does the replica of
        a master killed take over: the other masters vote only for a replica they know."""

        async def node_ready(port: int) -> bool:
            if _fields(await _command(port, "CLUSTER", "INFO")).get("cluster_state") != "ok":
                return False
            masters: set[str] = set()
            replicas_of: list[str] = []  # the master of each replica
            nodes = (await _command(port, "CLUSTER", "NODES")).splitlines()
            for node in nodes:
                node_id, _address, flag_list, master_id, _, _, _, link, *slots = node.split()
                flags = set(flag_list.split(","))
                if link != "connected" or flags & {"fail", "fail?", "handshake", "noaddr"}:
                    return False
                if "master" in flags and slots:
                    masters.add(node_id)
                elif "slave" in flags:
                    replicas_of.append(master_id)
            if len(nodes) != 6 or len(masters) != 3 or sorted(replicas_of) != sorted(masters):
                return False
            replication = _fields(await _command(port, "INFO", "replication"))
            if replication["role"] == "master":
                return _online_replicas(replication) == 1
            return replication.get("master_link_status") == "up"

        await asyncio.gather(
            *(
                _until(partial(node_ready, port), timeout, f"cluster node {port} ready")
                for port in self.ports
            )
        )

    async def _master_by(self, port: int, key: str) -> int:
        """The port of the master of `key`'s slot, as the node on `port` sees it."""
        slot = await _command(port, "CLUSTER", "KEYSLOT", key)
        for start, end, master, *_replicas in await _command(port, "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise LookupError(f"node {port} knows no master of slot {slot}")

    async def master_of(self, key: str) -> int:
        """The port of the master serving `key`'s slot (`{tag}:rest` hashes as `tag`), as the
        first live node that answers sees it."""
        errors = []
        for port in self.redis.alive():
            try:
                return await self._master_by(port, key)
            except Exception as error:
                errors.append(error)
        raise RuntimeError(f"no cluster node answered: {errors}")

    async def kill_master_of(self, key: str) -> int:
        """SIGKILL the master serving `key`'s slot; returns its port."""
        port = await self.master_of(key)
        await self.redis.kill(port)
        return port

    async def wait_for_new_master_of(self, key: str, old_port: int, timeout: float = 30) -> int:
        """Until every live node says cluster_state:ok and names the same master of `key`'s
        slot other than `old_port`, and that node says it is master; returns its port."""
        new_port = 0

        async def failed_over() -> bool:
            nonlocal new_port
            alive = self.redis.alive()
            states = [_fields(await _command(p, "CLUSTER", "INFO")) for p in alive]
            if any(state.get("cluster_state") != "ok" for state in states):
                return False
            named = {await self._master_by(p, key) for p in alive}
            new_port = await _one_new_master(named, old_port)
            return bool(new_port)

        await _until(failed_over, timeout, f"failed over from {old_port}")
        return new_port


@asynccontextmanager
async def own_cluster() -> AsyncIterator[ClusterDeployment]:
    """A Redis Cluster of the test's own, ready to fail over (about 2 s to start: redis-cli
    waits a second for the nodes to join)."""
    redis_server, redis_cli = _binary("redis-server"), _binary("redis-cli")
    with tempfile.TemporaryDirectory(
        prefix="sigmax-cluster-", ignore_cleanup_errors=True
    ) as folder:
        deployment = ClusterDeployment(redis_server, redis_cli, Path(folder))
        try:
            await deployment.start()
            yield deployment
        finally:
            deployment.redis.kill_all()
