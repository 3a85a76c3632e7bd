"""The supervised deployment (python -m app supervise): each worker a process of its own under
supervisord on one listening socket. A worker killed with SIGKILL costs only its own clients,
which resume on the others with no gap; supervisord starts it again alone; a rolling restart
replaces every worker while the others serve."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from typing import Any

import pytest
import websockets

from app import supervision
from tests.helpers import (
    REPOSITORY,
    Client,
    free_port,
    migrate_with_cli,
    rolling_restart,
    supervised,
)
from tests.test_redis import open_client, post_alerts


async def alerts(client: Client, count: int, seen: dict[Client, int]) -> list[int]:
    """The `n` of the next `count` alerts `client` receives; `seen[client]`: the last seq."""
    events = [await client.recv_event(10) for _ in range(count)]
    seen[client] = events[-1]["seq"]
    return [event["data"]["n"] for event in events]


def pid_of(worker: str) -> int:
    return int(worker.rsplit(":", 1)[1])


async def supervised_workers(env: dict[str, str]) -> dict[str, tuple[str, int]]:
    """supervisord's view of the workers: {name: (state, pid)}."""
    processes = await asyncio.to_thread(supervision.workers, env["SIGMAX_RUN_DIR"])
    return {p["name"]: (p["statename"], p["pid"]) for p in processes}


async def test_a_killed_worker_costs_only_its_clients_and_comes_back_alone(redis_prefix, tmp_path):
    url, prefix = redis_prefix
    port = free_port()
    env = {
        "REDIS_URL": url,
        "REDIS_PREFIX": prefix,
        "DATABASE_URL": f"sqlite:///{tmp_path}/supervised.db",
        "SIMULATION": "false",
        "LOG_LEVEL": "WARNING",
        "PORT": str(port),
        "WORKERS": "2",
        "SIGMAX_RUN_DIR": str(tmp_path / "run"),
    }
    migrate_with_cli(env)
    with supervised(env):
        clients: dict[str, list[Client]] = {}
        seen: dict[Client, int] = {}
        try:
            for _ in range(300):  # bounded: until both workers hold two clients each
                client, worker = await open_client(port)
                clients.setdefault(worker, []).append(client)
                if len(clients) == 2 and all(len(c) >= 2 for c in clients.values()):
                    break
                await asyncio.sleep(0.05)
            assert len(clients) == 2, "both supervised workers should take connections"
            victim, survivor = sorted(clients)
            before = await supervised_workers(env)
            assert sorted(state for state, _ in before.values()) == ["RUNNING", "RUNNING"]
            assert {pid for _, pid in before.values()} == {pid_of(victim), pid_of(survivor)}

            await asyncio.to_thread(post_alerts, port, 0, 10)
            for client in clients[victim] + clients[survivor]:
                assert await alerts(client, 10, seen) == list(range(10))

            os.kill(pid_of(victim), signal.SIGKILL)
            for client in clients[victim]:
                with contextlib.suppress(websockets.ConnectionClosed):
                    async with asyncio.timeout(10):
                        while True:
                            await client.ws.recv()
            # The survivor serves on: its clients are not cut, and events published meanwhile (to
            # the shared port: only the survivor answers) reach them.
            await asyncio.to_thread(post_alerts, port, 10, 10)
            for client in clients[survivor]:
                assert await alerts(client, 10, seen) == list(range(10, 20))

            # The killed worker's clients resume on whichever worker takes them: no gap.
            resumed = []
            for client in clients[victim]:
                again, _ = await open_client(port, since=seen[client])
                resumed.append(again)
                assert await alerts(again, 10, seen) == list(range(10, 20))
            clients[victim] = resumed

            # supervisord started the victim again, alone: the survivor kept its pid.
            async with asyncio.timeout(15):
                while True:
                    after = await supervised_workers(env)
                    pids = {pid for state, pid in after.values() if state == "RUNNING"}
                    if len(pids) == 2 and pid_of(victim) not in pids:
                        break
                    await asyncio.sleep(0.2)
            assert pid_of(survivor) in pids

            # A rolling restart: every worker replaced, one at a time; the clients resume.
            done = await asyncio.to_thread(rolling_restart, env)
            assert done.returncode == 0, done.stderr
            assert done.stdout.count("healthy") == 2
            restarted = {pid for _, pid in (await supervised_workers(env)).values()}
            assert len(restarted) == 2 and not restarted & pids
        finally:
            for client in (c for group in clients.values() for c in group):
                await client.ws.close()


async def test_every_workers_log_reaches_supervisords_standard_output(tmp_path):
    """Where the platform collects logs (the journal, `docker logs`): supervisord's standard
    output carries its own lines and each worker's, and nothing is left in the run directory."""
    port = free_port()
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/logs.db",
        "SIMULATION": "false",
        "LOG_LEVEL": "INFO",
        "PORT": str(port),
        "WORKERS": "1",
        "SIGMAX_RUN_DIR": str(tmp_path / "run"),
    }
    migrate_with_cli(env)
    supervisor = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        "supervise",
        cwd=REPOSITORY,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,  # a pipe, as journald's and docker's are
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert supervisor.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(30):
            while not any(" INFO app.services.archive: " in line for line in lines):
                lines.append((await supervisor.stdout.readline()).decode())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(supervisor.pid, signal.SIGTERM)
        await asyncio.wait_for(supervisor.wait(), 30)
    spawned = next(line for line in lines if "spawned: 'sigmax_00'" in line)
    worker_pid = spawned.rsplit("pid ", 1)[1].split()[0]
    assert any(f"[{worker_pid}] INFO app.services.archive: " in line for line in lines), lines
    assert not list((tmp_path / "run").glob("*.log"))


async def all_running(env: dict[str, str], count: int, timeout: float = 30) -> None:
    """Until supervisord (once its socket is there) says `count` workers are RUNNING."""
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(OSError):
                states = [state for state, _ in (await supervised_workers(env)).values()]
                if states == ["RUNNING"] * count:
                    return
            await asyncio.sleep(0.2)


def supervised_env(redis_prefix: tuple[str, str], tmp_path: Any, workers: int) -> dict[str, str]:
    url, prefix = redis_prefix
    return {
        "REDIS_URL": url,
        "REDIS_PREFIX": prefix,
        "DATABASE_URL": f"sqlite:///{tmp_path}/supervised.db",
        "SIMULATION": "false",
        "LOG_LEVEL": "WARNING",
        "PORT": str(free_port()),
        "WORKERS": str(workers),
        "SIGMAX_RUN_DIR": str(tmp_path / "run"),
    }


@pytest.mark.parametrize("interruption", [signal.SIGINT, signal.SIGTERM])
async def test_an_interrupted_rolling_restart_leaves_every_worker_running(
    redis_prefix, tmp_path, interruption
):
    """Ctrl-C (SIGINT), or systemd's reload timeout (SIGTERM), in the middle of a rolling
    restart: when the command has exited, every worker is running or starting again."""
    env = supervised_env(redis_prefix, tmp_path, 2)
    migrate_with_cli(env)
    with supervised(env):
        await all_running(env, 2)
        restart = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app",
            "rolling-restart",
            cwd=REPOSITORY,
            env={**os.environ, **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert restart.stdout is not None
        async with asyncio.timeout(30):
            while b"stopping" not in await restart.stdout.readline():
                pass
        restart.send_signal(interruption)  # while its worker is stopped, or starting again
        await asyncio.wait_for(restart.communicate(), 60)
        left = [state for state, _ in (await supervised_workers(env)).values()]
        await all_running(env, 2, timeout=5)
    assert restart.returncode != 0
    assert set(left) <= {"RUNNING", "STARTING"}, left


async def test_a_rolling_restart_first_starts_a_worker_left_stopped(redis_prefix, tmp_path):
    """A worker left stopped (by hand, or by a restart killed outright) is started by the next
    rolling restart before it replaces the others."""
    env = supervised_env(redis_prefix, tmp_path, 2)
    migrate_with_cli(env)
    with supervised(env):
        await all_running(env, 2)
        await asyncio.to_thread(
            supervision._rpc(env["SIGMAX_RUN_DIR"]).stopProcess, f"{supervision.GROUP}:sigmax_00"
        )
        stopped = await supervised_workers(env)
        done = await asyncio.to_thread(rolling_restart, env)
        after = await supervised_workers(env)
    assert stopped["sigmax_00"][0] == "STOPPED"
    assert done.returncode == 0, done.stderr
    assert "sigmax_00: was stopped, started" in done.stdout
    assert [state for state, _ in after.values()] == ["RUNNING", "RUNNING"]
